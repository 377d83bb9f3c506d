"""Attention and adapter ops: Triton kernels on CUDA, torch references with the same signature elsewhere."""
