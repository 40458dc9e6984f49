"""Sensing data as model inputs: Wi-Fi channel state information (CSI), recorded and generated."""
