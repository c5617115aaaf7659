"""Content hashes: one key per content, large buffers hashed in parallel pieces."""

from __future__ import annotations

import hashlib
import time

import numpy as np

from jaxmm.multimodal import hashing
from jaxmm.multimodal.hashing import content_hash


def test_keys_follow_every_part():
    rs = np.random.RandomState(0)
    pixels = rs.randint(0, 256, (1344, 1344, 3), np.uint8).tobytes()  # 5.4 MB: in pieces
    key = content_hash("image", "RGB", (1344, 1344), pixels, {})
    assert key == content_hash("image", "RGB", [1344, 1344], bytearray(pixels), {})
    flipped = bytearray(pixels)
    flipped[len(flipped) // 2 + 7] ^= 1  # one bit, in the middle piece
    assert content_hash("image", "RGB", (1344, 1344), bytes(flipped), {}) != key
    assert content_hash("image", "RGB", (1344, 1344), pixels, {"max_pixels": 1}) != key
    assert content_hash("image", "RGB", (1344, 1344), pixels[:-1], {}) != key  # a shorter tail
    arr = rs.standard_normal((700, 1024)).astype(np.float32)  # 2.9 MB as an array
    assert content_hash(arr) == content_hash(arr.copy()) != content_hash(arr.astype(np.float64))
    assert content_hash(arr) != content_hash(arr.reshape(1024, 700))  # the shape is hashed
    assert content_hash(np.asfortranarray(arr)) == content_hash(arr)


def test_background_hash_is_the_same_key():
    pixels = np.random.RandomState(1).randint(0, 256, (900, 900, 3), np.uint8).tobytes()
    parts = ("image", "RGB", (900, 900), pixels, {})
    futures = [hashing.content_hash_soon(lambda: parts) for _ in range(3)]
    keys = {f.result(timeout=30) for f in futures}
    assert keys == {content_hash("image", "RGB", (900, 900), pixels, {})}


def test_small_parts_hash_flat():
    data = b"x" * (hashing.PARALLEL_BYTES - 1)
    h = hashlib.blake2b(digest_size=16)
    h.update(data)
    h.update(b"\x00")
    assert content_hash(data) == h.hexdigest()


def test_a_forked_child_hashes_with_a_pool_of_its_own():
    """The parent's pool threads do not survive a fork; the child must not wait on them.
    (A fresh interpreter, so no JAX threads are forked.)"""
    import subprocess
    import sys

    code = """
import os
from jaxmm.multimodal.hashing import PARALLEL_BYTES, content_hash
data = bytes(range(256)) * (PARALLEL_BYTES // 256 + 1)
key = content_hash(data)  # the parent's pool exists now
pid = os.fork()
if pid == 0:
    os._exit(0 if content_hash(data) == key else 1)
_, status = os.waitpid(pid, 0)
raise SystemExit(os.waitstatus_to_exitcode(status))
"""
    done = subprocess.run([sys.executable, "-c", code], timeout=60)
    assert done.returncode == 0


def test_timing(capsys):
    data = np.random.RandomState(1).randint(0, 256, 1344 * 1344 * 3, np.uint8).tobytes()

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(10):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times) * 1e3

    flat = best(lambda: hashlib.blake2b(data, digest_size=16).digest())
    ours = best(lambda: content_hash(data))
    with capsys.disabled():
        print(f"\n1344x1344 RGB: one BLAKE2b {flat:.2f} ms, content_hash {ours:.2f} ms")
