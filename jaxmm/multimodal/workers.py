"""Media preprocessing in worker processes: decoding, hashing and the HF processor off the
engine's GIL. Plain Python, no JAX.

A front end with `mm_processor_workers > 0` sends each image or video that it has to prepare
(not one served from its cache by uuid) to a pool of spawned worker processes. A worker
fetches or decodes the media under the request's media policy, hashes the decoded content
(the same key the in-process path computes) and runs the checkpoint's processor; the parent
gets back (key, processed host inputs) and only looks up its caches, checks shapes against
the model and places the tokens. Threads cannot do this: decoding and the processors hold
the GIL for most of their time, so a thread pool beside the engine's own Python (the
scheduler, the step's host work) slows both down; processes scale with the host's cores.

Workers hold only the processor (built from the checkpoint directory when they start); they
never see the model, the engine or a device. Each watches its parent and exits when the
parent is gone, so a killed engine leaves no worker behind.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor

from PIL import Image

from .hashing import content_hash
from .media import MediaPolicy, load_image, load_video_with_metadata

_PROCESSOR = None  # the worker's MultimodalProcessor, built by _start


def default_num_workers() -> int:
    """Workers for `mm_processor_workers=None`: a quarter of the host's cores, at most 4,
    none on a small host (2-4 cores), where the engine's own threads need them."""
    return min(4, (os.cpu_count() or 1) // 4) if (os.cpu_count() or 1) >= 8 else 0


def num_workers(config) -> int:
    """The worker processes a `MultimodalConfig` asks for (None: `default_num_workers`)."""
    n = getattr(config, "mm_processor_workers", 0)
    return default_num_workers() if n is None else int(n)


def load_video_item(value, policy: MediaPolicy, opts: dict):
    """A video item (array, frames, URL, bytes, or (frames, metadata)) -> (frames, fps): its
    (T, H, W, 3) uint8 frames and their own rate (None: unknown, left to the processor)."""
    source_fps = None  # the rate of the frames as given
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], dict):
        value, meta = value
        source_fps = meta.get("fps")
        indices, clip = meta.get("frames_indices"), meta.get("total_num_frames")
        if source_fps and indices is not None and clip:
            # frames already sampled from `clip` frames (vLLM's / HF's video metadata):
            # their own rate, as HF's `VideoMetadata.sampled_fps`
            source_fps = source_fps * len(indices) / clip
    frames, metadata = load_video_with_metadata(
        value,
        policy,
        num_frames=opts.get("num_frames"),
        frame_recovery=bool(opts.get("frame_recovery", False)),
    )
    source_fps = source_fps or metadata.fps
    # an explicit rate of the kept frames wins; no rate at all is left to the processor
    # (HF's 24 fps)
    fps = opts.get("fps")
    if fps is None and source_fps:
        # frames sampled over the whole clip: their own, lower rate
        total = metadata.total_num_frames or len(frames)
        fps = source_fps * len(frames) / max(total, len(frames))
    return frames, fps


def image_key(image: Image.Image, proc_kwargs: dict) -> str:
    return content_hash("image", image.mode, image.size, image.tobytes(), proc_kwargs)


def video_key(frames, fps, proc_kwargs: dict) -> str:
    return content_hash("video", frames, fps, proc_kwargs)


# -- in the worker ----------------------------------------------------------------------------
def _start(parent: int, processor_args: tuple) -> None:
    global _PROCESSOR
    from .processor import MultimodalProcessor

    path, kwargs, patch_bytes = processor_args
    _PROCESSOR = MultimodalProcessor.from_pretrained(path, kwargs, patch_bytes=patch_bytes)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)  # the engine is gone: nobody will read what this worker makes


def _ready() -> int:
    return os.getpid()


def _run(job: tuple):
    """One item: -> (key, processed, processing error). A media error (unreadable, refused,
    too large) is raised: the item is unusable whatever the caches hold. A processor error is
    returned, as in the in-process path: it counts only if the item is not a cache hit."""
    modality, value, policy, opts, proc_kwargs = job
    if modality == "image":
        media = load_image(value, policy, rgba_background_color=opts)
        media.load()
        key = image_key(media, proc_kwargs)
    else:
        frames, fps = media = load_video_item(value, policy, opts)
        key = video_key(frames, fps, proc_kwargs)
    try:
        if modality == "image":
            return key, _PROCESSOR.image(media, proc_kwargs), None
        return key, _PROCESSOR.video(frames, fps, proc_kwargs), None
    except Exception as e:  # noqa: BLE001 - the parent decides whether it matters
        return key, None, e


# -- in the front end -------------------------------------------------------------------------
class MediaWorkers:
    """A pool of `num_workers` spawned processes preparing images and videos.

    processor_args: (checkpoint directory, engine-level mm_processor_kwargs, patch_bytes), as
    the front end builds its own `MultimodalProcessor` from them.
    """

    def __init__(self, num_workers: int, processor_args: tuple):
        if num_workers < 1:
            raise ValueError(f"mm_processor_workers must be >= 1 here, got {num_workers}")
        self.num_workers = num_workers
        self._pool = ProcessPoolExecutor(
            num_workers,
            # spawn: a fork of the engine would copy its threads' locks and its device state
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start,
            initargs=(os.getpid(), processor_args),
        )
        # start every worker now: each imports the processor's modules (about a second)
        self._started = [self._pool.submit(_ready) for _ in range(num_workers)]

    def submit(self, modality: str, value, policy: MediaPolicy, opts, proc_kwargs: dict) -> Future:
        """A future of (key, processed, processor error) for one image (`opts`: its RGBA
        background colour) or video (`opts`: the media_io options)."""
        return self._pool.submit(_run, (modality, value, policy, opts, dict(proc_kwargs)))

    def wait_started(self, timeout: float = 120.0) -> None:
        for f in self._started:
            f.result(timeout)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
