"""The layer-wise alpha search: the grid and its candidates, the loss engine, the approximate search."""
