"""The wireless edge network: channel formulas, devices, topology and per-round costs."""
