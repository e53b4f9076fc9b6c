"""Kernel wrappers (torch ops, AVX512 C, Triton) and their compiled sources (csrc/)."""
