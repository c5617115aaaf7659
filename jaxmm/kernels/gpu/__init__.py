"""Pallas GPU kernels behind `ragged_paged_attention.py` (the GPU wrapper: KV write, then the
prefill kernel, then the decode kernel, with static tiles chosen from the shapes).

    decode.py         flash-decoding, Triton lowering (split modes per_seq / balanced)
    decode_mgpu.py    decode over balanced work items, Mosaic GPU lowering (Hopper, opt-in)
    prefill.py        FlashAttention-2 prefill / mixed batches, Triton lowering
    prefill_mgpu.py   the same on Hopper, Mosaic GPU lowering (TMA, wgmma, warp specialised)
    mgpu.py           helpers both Mosaic GPU kernels share
"""
