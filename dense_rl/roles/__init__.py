"""The Ray roles. Each is a thin wrapper around the plain-PyTorch algorithm in dense_rl/*."""
