"""Pallas TPU (Mosaic) kernels: `ragged_paged_attention.py` (docs/tpu.md)."""
