"""Data-free calibration: the driver, the FP loop, memory budget, chunked feeding, several processes."""
