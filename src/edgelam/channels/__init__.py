"""Wireless channels as data: DeepMIMO beams, generated CSI (TR 38.901)."""
