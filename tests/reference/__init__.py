"""Plain PyTorch reference implementations used as parity oracles and speed baselines."""
