"""The quantized checkpoint: save/load, storage layout, atomic file writes."""
