"""The domain, free of I/O and of torch: the apStar grid, a spectrum and its checks, the network's
labels and calibration, the result flags, the engine's per-spectrum estimate and the one place
result records are built."""
