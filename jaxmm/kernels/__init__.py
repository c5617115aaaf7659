"""Attention kernels. Each kernel has a pure-JAX reference with the same signature."""
