"""Multimodal prompts -> token ids + the per-request object the engine feeds the runner with.

1. Parse: `multi_modal_data` ({modality: item or [items]}), `multi_modal_uuids` (same shape,
   None entries allowed), `media_io_kwargs`, `mm_processor_kwargs`; per-prompt limits
   (`limit_mm_per_prompt`); precomputed embeddings only with `enable_mm_embeds`, their
   shapes checked against the model's.
2. Load: URLs (http(s), data:, file://), bytes and arrays become RGB images or (T, H, W, 3)
   frames through `media.py`, under the engine's MediaPolicy.
3. Key: an item's cache key is its uuid when given, else a content hash (`hashing.py`:
   BLAKE2b of the decoded pixels or embedding bytes, with the processor options).
4. Process: items found in the prepared-item cache are reused (an item sent as `None`
   must be there under its uuid); the others go through the HF processor (`processor.py`)
   and their shapes are checked against the model (`mm_num_tokens`). Nothing is encoded
   here: the host inputs travel with the request, and the engine's encoder stage runs the
   model's encoders when a prefill chunk first needs an item (and not at all when the
   item's output is still in the runner's encoder cache, or a cached prefix covers it).
5. Place: each placeholder token is expanded to its item's number of feature tokens; the
   spans, their keys (for prefix and encoder caching), host inputs and M-RoPE positions
   make up a `MultimodalRequest`: plain data, picklable, that the engine reads.

Item forms per modality:
- "image": PIL image, uint8 (H, W, C) array, URL or bytes; precomputed embeddings as a
  torch/JAX tensor or float array (n, D) / (N, n, D), or {"image_embeds": ...,
  "image_grid_thw": ...}; `None` for a cached uuid. "image_embeds" is accepted as a modality.
- "video": (T, H, W, 3) array, list of frames, URL or bytes, or (frames, {"fps": ...});
  {"video_embeds": ..., "video_grid_thw": ...}; `None` for a cached uuid.

The model side is a small duck-typed contract, its declared multimodal interface (see
`jaxmm/models/llava.py`), handed to the front end by whoever builds it; the front end holds
no engine, runner or scheduler, and this module imports no JAX.
"""

from __future__ import annotations

import threading
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .cache import EncoderCache, EncoderOutput
from .hashing import content_hash, content_hash_soon
from .media import MediaPolicy, load_image
from .values import (
    _as_list,
    _check_media_io_kwargs,
    _grid_array,
    _limit,
    _looks_like_embeds,
    _media_value,
    _split_batched_embeds,
    _split_by_grid,
    _video_list,
    decode_embeds_payload,
    to_numpy,
)
from .workers import MediaWorkers, load_video_item, num_workers

MODALITIES = ("image", "video")
_EMBED_ALIASES = {"image_embeds": "image", "video_embeds": "video"}
PROMPT_KEYS = (
    "prompt",
    "prompt_token_ids",
    "multi_modal_data",
    "multi_modal_uuids",
    "mm_processor_kwargs",
    "media_io_kwargs",
    "cache_salt",
)


def check_prompt_keys(prompt: dict) -> None:
    """A prompt dict may only hold the keys of vLLM's multimodal prompt schema."""
    unknown = sorted(set(prompt) - set(PROMPT_KEYS))
    if unknown:
        raise ValueError(f"unknown prompt keys {unknown}; known: {', '.join(PROMPT_KEYS)}")


# ---------------------------------------------------------------------------------------
# What the engine holds per request


@dataclass
class PlacedItem:
    start: int  # first placeholder position in the prompt
    end: int
    modality: str
    key: str  # uuid or content hash
    data: object  # the encoder's host input (dict), or precomputed (end - start, D) embeds
    meta: dict = field(default_factory=dict)

    @property
    def cache_key(self) -> str:
        """The item's key in the prefix and encoder caches."""
        return f"{self.modality}:{self.key}"


@dataclass
class MultimodalRequest:
    """`Request.mm`: embeddings to splice over placeholders, M-RoPE positions, page keys."""

    items: list[PlacedItem]
    num_prompt_tokens: int
    mrope_positions: np.ndarray | None = None  # (3, num_prompt_tokens)
    mrope_delta: int = 0  # text positions after the prompt are (index + delta) on all axes
    cache_salt: str | None = None

    def item(self, cache_key: str) -> PlacedItem:
        return next(it for it in self.items if it.cache_key == cache_key)

    @property
    def extra_keys(self) -> tuple[tuple[int, int, str], ...]:
        keys = [(it.start, it.end, it.cache_key) for it in self.items]
        if self.cache_salt is not None:  # a salt covers every page of the sequence
            keys.append((0, 1 << 62, f"salt:{self.cache_salt}"))
        return tuple(keys)

    def fill_step(self, step, seq, start: int, n: int) -> None:
        """Fill `step.mrope_positions` for tokens [start, start + n) (the engine splices the
        items' encoder outputs itself, from the encoder cache)."""
        del seq
        end = start + n
        if self.mrope_positions is not None:
            L = self.num_prompt_tokens
            if start >= L:  # after the prompt: text positions, one value on all three axes
                step.position_offset = self.mrope_delta
                return
            pos = np.empty((3, n), np.int32)
            split = min(max(L - start, 0), n)  # tokens of this step inside the prompt
            pos[:, :split] = self.mrope_positions[:, start : start + split]
            pos[:, split:] = np.arange(start + split, end, dtype=np.int64) + self.mrope_delta
            step.mrope_positions = pos


# ---------------------------------------------------------------------------------------
# Parsing helpers


@dataclass
class _Item:
    modality: str
    index: int  # within its modality
    uuid: str | None
    kind: str  # "media" | "embeds" | "cached"
    media: object = None  # PIL image, or (frames, fps) for a video
    embeds: np.ndarray | None = None
    meta: dict = field(default_factory=dict)
    key: str | None = None
    output: EncoderOutput | None = None
    source: tuple | None = None  # (media, options) for a worker to load (mm_processor_workers)
    pending: Future | None = None  # the worker's (key, processed, processor error)


class MultimodalFrontend:
    """Prompts with `multi_modal_data` -> token ids + a `MultimodalRequest` of host items.

    model: the model's multimodal interface (`mm_modalities`, `mm_token_id`, ...);
    tokenizer; processor_path: the checkpoint directory with the HF processor's config;
    config: the engine's `MultimodalConfig`.
    """

    def __init__(self, model, tokenizer, processor_path: str | None, config):
        self.model = model
        if not getattr(self.model, "is_multimodal", False):
            raise ValueError(
                f"{type(self.model).__name__} is a text-only model: it takes no multi_modal_data"
            )
        self._tokenizer = tokenizer
        self.processor_path = processor_path
        self.config = config
        overrides = {}
        if self.config.allowed_local_media_path is not None:
            overrides["allowed_local_media_path"] = self.config.allowed_local_media_path
        if self.config.allowed_media_domains is not None:
            overrides["allowed_media_domains"] = self.config.allowed_media_domains
        self.policy = MediaPolicy.from_env(**overrides)
        self.media_io_kwargs = _check_media_io_kwargs(self.config.media_io_kwargs)
        self.cache = EncoderCache()  # prepared items (host), for uuids sent again as None
        self._processor = None
        self._workers: MediaWorkers | None | bool = False  # False: not decided yet
        # the server prepares prompts on worker threads: one at a time through the caches
        self._lock = threading.Lock()

    # -- lazily built pieces -----------------------------------------------------------------
    @property
    def processor(self):
        if self._processor is None:
            from .processor import MultimodalProcessor

            path = self.processor_path
            if path is None:
                raise ValueError("this checkpoint carries no image processor config")
            self._processor = MultimodalProcessor.from_pretrained(
                path,
                dict(getattr(self.config, "mm_processor_kwargs", {}) or {}),
                # uint8 patches + byte table, expanded by the tower on the device
                patch_bytes=bool(getattr(self.model, "mm_patch_bytes", False)),
            )
        return self._processor

    @property
    def tokenizer(self):
        tok = self._tokenizer
        if tok is None:
            raise ValueError("multimodal prompts need the tokenizer (skip_tokenizer_init is on)")
        return tok

    def placeholder_text(self, modality: str) -> str:
        if modality == "audio":  # audio models name their placeholder as text
            return self.model.mm_placeholder_text(modality)
        ids = self.model.mm_prompt_placeholder(modality)
        return "".join(self.tokenizer.convert_ids_to_tokens(ids))

    # -- 1. parse ----------------------------------------------------------------------------
    def parse(self, prompt: dict, io: dict) -> list[_Item]:
        data = prompt.get("multi_modal_data") or {}
        if not isinstance(data, dict):
            raise TypeError(f"multi_modal_data must be a dict, got {type(data).__name__}")
        uuids = prompt.get("multi_modal_uuids") or {}
        if not isinstance(uuids, dict):
            raise TypeError(f"multi_modal_uuids must be a dict, got {type(uuids).__name__}")
        supported = tuple(self.model.mm_modalities)
        grouped: dict[str, list] = {}
        for name, value in data.items():
            modality = _EMBED_ALIASES.get(name, name)
            if modality not in supported:
                raise ValueError(
                    f"{type(self.model).__name__} does not take {name!r} inputs; it takes: "
                    + ", ".join(supported)
                )
            values = _video_list(value) if name == "video" else _as_list(value)
            values = _split_batched_embeds(values)
            if name in _EMBED_ALIASES:
                values = [v if isinstance(v, dict) else {name: v} for v in values]
            values = _split_by_grid(values, modality)
            grouped.setdefault(modality, []).extend(values)
        for name in uuids:
            if _EMBED_ALIASES.get(name, name) not in grouped:
                raise ValueError(f"multi_modal_uuids names {name!r}, which has no multi_modal_data")

        items: list[_Item] = []
        for modality, values in grouped.items():
            ids = uuids.get(modality, uuids.get(f"{modality}_embeds"))
            ids = [None] * len(values) if ids is None else _as_list(ids)
            if len(ids) != len(values):
                raise ValueError(
                    f"multi_modal_uuids[{modality!r}] has {len(ids)} entries for "
                    f"{len(values)} {modality} item(s)"
                )
            limit = _limit(self.config.limit_mm_per_prompt, modality)
            if limit is not None and len(values) > limit:
                raise ValueError(
                    f"this prompt has {len(values)} {modality} item(s), more than the "
                    f"{limit} allowed per prompt (limit_mm_per_prompt={{{modality!r}: {limit}}})"
                )
            for i, (value, uuid) in enumerate(zip(values, ids, strict=True)):
                if uuid is not None and not isinstance(uuid, str):
                    raise TypeError(f"a multimodal uuid must be a str, got {type(uuid).__name__}")
                items.append(self._classify(modality, i, value, uuid, io.get(modality, {})))
        return items

    def _classify(self, modality: str, index: int, value, uuid: str | None, io: dict) -> _Item:
        item = _Item(modality, index, uuid, "media")
        if value is None:
            if uuid is None:
                raise ValueError(
                    f"{modality} item {index} is None: a None item must come with a uuid of an "
                    "item sent before (served from the encoder cache)"
                )
            item.kind = "cached"
            return item
        if isinstance(value, dict) or _looks_like_embeds(value):
            item.kind = "embeds"
            self._parse_embeds(item, value)
            return item
        self._attach_media(item, _media_value(value), io)
        return item

    def _parse_embeds(self, item: _Item, value) -> None:
        if not self.config.enable_mm_embeds:
            raise ValueError(
                f"{item.modality} item {item.index} is a precomputed embedding; embeddings "
                "inputs are refused unless the engine is started with enable_mm_embeds=True"
            )
        meta = {}
        if isinstance(value, dict):
            key = f"{item.modality}_embeds"
            if key not in value:
                raise ValueError(
                    f"a {item.modality} embeddings dict needs {key!r}; got keys {sorted(value)}"
                )
            grid = value.get(f"{item.modality}_grid_thw")
            if grid is not None:
                grid = _grid_array(grid)
                if grid.size != 3:
                    raise ValueError(
                        f"{item.modality}_grid_thw must hold 3 ints (t, h, w) per item; "
                        f"got shape {grid.shape}"
                    )
                meta["grid_thw"] = tuple(int(g) for g in grid.reshape(-1))
            seconds = value.get("second_per_grid_t", value.get("second_per_grid_ts"))
            if seconds is not None:  # one per item: vLLM's name is second_per_grid_ts
                meta["second_per_grid_t"] = float(to_numpy(seconds).reshape(-1)[0])
            size = value.get(f"{item.modality}_sizes")
            if size is not None:  # vLLM's MiniCPM-V form: the image's (width, height)
                size = _grid_array(size).reshape(-1)
                if size.size != 2:
                    raise ValueError(
                        f"{item.modality}_sizes must hold one image's (width, height); "
                        f"got {size.size} numbers"
                    )
                meta["image_size"] = (int(size[0]), int(size[1]))
            value = value[key]
        if isinstance(value, str):
            value = decode_embeds_payload(value)
        embeds = to_numpy(value)
        if embeds.ndim == 3 and embeds.shape[0] == 1:
            embeds = embeds[0]
        item.meta = dict(self.model.mm_check_embeds(item.modality, embeds, meta))
        item.embeds = embeds

    def _attach_media(self, item: _Item, value, opts: dict) -> None:
        if item.modality == "image":
            if isinstance(value, np.ndarray):
                if value.dtype != np.uint8 or value.ndim not in (2, 3):
                    raise ValueError(
                        f"an image array must be uint8 (H, W) or (H, W, C); got {value.dtype} "
                        f"{value.shape} (float arrays (n, D) are read as embeddings)"
                    )
                value = Image.fromarray(value)
            background = opts.get("rgba_background_color", (255, 255, 255))
            if self.workers is not None:  # decoded and processed in a worker
                item.source = (value, background)
                return
            item.media = load_image(value, self.policy, rgba_background_color=background)
            return
        if self.workers is not None:  # loaded and processed in a worker
            item.source = (value, opts)
            return
        item.media = load_video_item(value, self.policy, opts)

    # -- 2-4. key, look up, encode -----------------------------------------------------------
    def _process(self, item: _Item, proc_kwargs: dict) -> dict:
        if item.modality == "image":
            own = getattr(self.model, "mm_process_image", None)
            if own is not None:  # the model's own preprocessing (Phi-4-multimodal's HD crops)
                from .processor import processor_configs

                config = processor_configs(self.processor_path or "").get("image_processor")
                kwargs = {**(getattr(self.config, "mm_processor_kwargs", None) or {})}
                return own(item.media, config, {**kwargs, **proc_kwargs})
            return self.processor.image(item.media, proc_kwargs)
        frames, fps = item.media
        return self.processor.video(frames, fps, proc_kwargs)

    def resolve(self, items: list[_Item], proc_kwargs: dict) -> None:
        duplicates: dict[str, list[_Item]] = {}
        for item in items:
            if item.kind == "embeds":
                item.key = item.uuid or content_hash(
                    item.modality, "embeds", item.embeds, item.meta
                )
                data, rows = item.embeds, len(item.embeds)
                span = self._embeds_span(item, proc_kwargs)
                if span is not None:  # rows of the span's text too: the model's encoder adds them
                    data = {f"{item.modality}_embeds": item.embeds, "span_ids": span}
                    rows = len(span)
                    item.meta = {**item.meta, "span_ids": span}
                item.output = EncoderOutput(item.modality, data, rows, item.meta)
                self.cache.put(item.key, item.output)
                continue
            if item.uuid is not None:
                cached = self.cache.get(item.uuid)
                if cached is not None:
                    if cached.modality != item.modality:
                        raise ValueError(
                            f"uuid {item.uuid!r} names a cached {cached.modality}, "
                            f"not a {item.modality}"
                        )
                    item.key, item.output = item.uuid, cached
                    continue
                if item.kind == "cached":
                    raise ValueError(
                        f"{item.modality} item {item.index} is None and its uuid {item.uuid!r} "
                        "is not in the encoder cache (never sent, or evicted): send the media "
                        "itself again"
                    )
            processed = failure = None
            if item.pending is None and item.source is not None:  # its cached copy went
                value, opts = item.source
                item.pending = self.workers.submit(
                    item.modality, value, self.policy, opts, proc_kwargs
                )
            if item.pending is not None:  # prepared by a worker
                key, processed, failure = item.pending.result()
                item.pending = None
                item.key = item.uuid if item.uuid is not None else key
            elif item.uuid is not None:
                item.key = item.uuid
            else:
                if item.modality == "image":
                    img = item.media
                    img.load()  # decoded here, once: then both threads only read it

                    def parts(img=img):
                        return ("image", img.mode, img.size, img.tobytes(), proc_kwargs)
                else:
                    frames, fps = item.media

                    def parts(frames=frames, fps=fps):
                        return ("video", frames, fps, proc_kwargs)

                # The processor runs while the key is hashed (1344^2 on the GPU machine's CPU:
                # ~5 ms of the image's bytes and their hash, against 1-3 ms of processing;
                # both drop the GIL for their large copies). A cache hit or a duplicate throws
                # the processed pixels away, and an error of the processor counts only if the
                # item needs it.
                soon = content_hash_soon(parts)
                try:
                    processed = self._process(item, proc_kwargs)
                except Exception as e:  # noqa: BLE001 - re-raised below if the item needs it
                    failure = e
                item.key = soon.result()
            cached = None if item.uuid is not None else self.cache.get(item.key)
            if cached is not None:
                item.output = cached
                continue
            if item.key in duplicates:  # the same media twice in one prompt: encode once
                duplicates[item.key].append(item)
                continue
            duplicates[item.key] = [item]
            if failure is not None:
                raise failure
            if processed is None:
                processed = self._process(item, proc_kwargs)
            spread = getattr(self.model, "mm_span_ids", None)
            if spread is not None:  # a span with text of its own (Qwen3-VL's frame times)
                span = spread(item.modality, processed, self._encode_text)
                if span is not None:
                    processed["span_ids"] = span
            want = self.model.mm_num_tokens(item.modality, processed)  # checks the shapes
            keys = ("grid_thw", "second_per_grid_t", "span_ids")
            meta = {k: processed[k] for k in keys if processed.get(k)}
            output = EncoderOutput(item.modality, processed, want, meta)
            for same in duplicates[item.key]:
                same.output = output
            self.cache.put(item.key, output)

    def _embeds_span(self, item: _Item, proc_kwargs: dict) -> list[int] | None:
        """The span of precomputed image embeddings whose placeholder text depends on the
        image's size (MiniCPM-V's slices), or None: the layout of a blank image of the given
        `image_sizes` through the processor, its image tokens one per embedding row."""
        size = item.meta.get("image_size")
        spread = getattr(self.model, "mm_span_ids", None)
        if size is None or spread is None or item.modality != "image":
            return None
        layout = self.processor.image(Image.new("RGB", size), proc_kwargs)
        span = spread(item.modality, layout, self._encode_text)
        if span is None:
            return None
        n = sum(t == self.model.mm_token_id(item.modality) for t in span)
        if n != len(item.embeds):
            raise ValueError(
                f"an image of size {size} (width, height) takes {n} embedding rows with this "
                f"checkpoint's processor; got {len(item.embeds)}"
            )
        return span

    def _encode_text(self, text: str) -> list[int]:
        """Token ids of text inside an item's span (no special tokens added)."""
        return self.tokenizer.encode(text, add_special_tokens=False)

    # -- 5. place ----------------------------------------------------------------------------
    def expand(self, ids: list[int], items: list[_Item]) -> tuple[list[int], list[PlacedItem]]:
        by_modality: dict[str, list[_Item]] = {}
        for item in items:
            by_modality.setdefault(item.modality, []).append(item)
        # (position, run length, item) for every placeholder run, in prompt order
        runs: list[tuple[int, int, _Item]] = []
        for modality, group in by_modality.items():
            token = self.model.mm_token_id(modality)
            where = [i for i, t in enumerate(ids) if t == token]
            spans = [(i, 1) for i in where]
            if len(where) != len(group):  # maybe already expanded: runs of n tokens each
                spans = _runs(where)
            if len(spans) != len(group):
                raise ValueError(
                    f"the prompt has {len(spans)} {self.placeholder_text(modality)!r} "
                    f"placeholder(s) for {len(group)} {modality} item(s): put one placeholder "
                    "where each item goes (LLM.chat does this from content parts)"
                )
            for (pos, length), item in zip(spans, group, strict=True):
                n = item.output.num_rows
                if length not in (1, n):
                    raise ValueError(
                        f"{modality} item {item.index} takes {n} placeholder tokens; the prompt "
                        f"has a run of {length}"
                    )
                runs.append((pos, length, item))
        runs.sort(key=lambda r: r[0])
        out: list[int] = []
        placed: list[PlacedItem] = []
        cursor = 0
        for pos, length, item in runs:
            out.extend(ids[cursor:pos])
            n = item.output.num_rows
            token = self.model.mm_token_id(item.modality)
            placed.append(
                PlacedItem(
                    len(out),
                    len(out) + n,
                    item.modality,
                    item.key,
                    item.output.data,
                    dict(item.output.meta),
                )
            )
            out.extend(item.output.meta.get("span_ids") or [token] * n)
            cursor = pos + length
        out.extend(ids[cursor:])
        return out, placed

    # -- the whole path ----------------------------------------------------------------------
    def prepare(self, prompt: dict, audio=None):
        """`audio`: the engine's audio front end, for a prompt whose audio sits beside
        images or video (`audio_in_video.py`)."""
        return self.finish(self.start(prompt, audio))

    def prepare_many(self, prompts: list[dict]) -> list:
        """`prepare` of each prompt, their media prepared in parallel by the workers."""
        return [self.finish(started) for started in [self.start(p) for p in prompts]]

    def start(self, prompt: dict, audio=None) -> tuple:
        """Parse a prompt and hand its media to the workers (when there are any): -> what
        `finish` takes. Raises for a malformed prompt."""
        with self._lock:
            started = self._start(prompt, audio)
        items = started[1]
        try:
            for item in items:
                if item.source is None:
                    continue
                if item.uuid is not None and self.cache.get(item.uuid) is not None:
                    continue  # served from the cache: nothing to prepare
                value, opts = item.source
                item.pending = self.workers.submit(
                    item.modality, value, self.policy, opts, started[2]
                )
        except BaseException:
            for item in items:
                if item.pending is not None:
                    item.pending.cancel()
            raise
        return started

    def finish(self, started: tuple):
        """-> (text, prompt token ids, `MultimodalRequest`), once the workers are done."""
        for item in started[1]:
            if item.pending is not None:
                try:
                    item.pending.exception()  # wait here, not inside the lock
                except CancelledError:
                    pass
        with self._lock:
            return self._finish(*started)

    @property
    def workers(self) -> MediaWorkers | None:
        """The worker processes (`mm_processor_workers`), started on first use; None: media
        are prepared in this process."""
        if self._workers is False:
            n = num_workers(self.config)
            if n <= 0 or self.processor_path is None:
                self._workers = None
            else:
                self._workers = MediaWorkers(
                    n,
                    (
                        self.processor_path,
                        dict(getattr(self.config, "mm_processor_kwargs", {}) or {}),
                        bool(getattr(self.model, "mm_patch_bytes", False)),
                    ),
                )
        return self._workers

    def close(self) -> None:
        """Stop the worker processes, if any were started."""
        if self._workers:
            self._workers.close()
        self._workers = None

    def _start(self, prompt: dict, audio=None) -> tuple:
        from .audio_in_video import pop_option, split_audio

        if not isinstance(prompt, dict):
            raise TypeError(f"a multimodal prompt is a dict, got {type(prompt).__name__}")
        check_prompt_keys(prompt)
        io_kwargs = _check_media_io_kwargs(prompt.get("media_io_kwargs"))
        io = {m: {**self.media_io_kwargs.get(m, {}), **io_kwargs.get(m, {})} for m in MODALITIES}
        proc_kwargs = dict(prompt.get("mm_processor_kwargs") or {})
        engine_kwargs = getattr(self.config, "mm_processor_kwargs", None) or {}
        in_video = pop_option(proc_kwargs, engine_kwargs.get("use_audio_in_video", False))
        # audio items (Qwen2.5-Omni), prepared by the audio front end, placed here; options
        # of the audio that depend on the prompt's other items (Phi-4-multimodal projects
        # audio beside images with its vision-speech pair) key its hash too
        audio_kwargs = proc_kwargs
        audio_context = getattr(self.model, "mm_audio_processor_kwargs", None)
        if audio_context is not None:
            data = prompt.get("multi_modal_data")
            names = list(data) if isinstance(data, dict) else []
            modalities = [_EMBED_ALIASES.get(n, n) for n in names]
            audio_kwargs = {**audio_context(modalities), **proc_kwargs}
        prompt, tracks = split_audio(prompt, audio, audio_kwargs, self._audio_item)
        items = self.parse(prompt, io)
        # options that depend on the prompt's other items (LLaVA-OneVision tiles an image
        # only when it is the prompt's one image); the prompt's own options win; they key
        # the items' hashes too
        context = getattr(self.model, "mm_prompt_processor_kwargs", None)
        if context is not None:
            proc_kwargs = {**context([it.modality for it in items]), **proc_kwargs}
        return prompt, items, proc_kwargs, tracks, in_video

    def _audio_item(self, index: int, uuid, key: str, output: EncoderOutput) -> _Item:
        return _Item("audio", index, uuid, "resolved", key=key, output=output)

    def _finish(
        self,
        prompt: dict,
        items: list[_Item],
        proc_kwargs: dict,
        tracks: list[_Item] = (),
        in_video: bool = False,
    ):
        # items first: a model's prompt text may depend on them (Gemma 3's pan-and-scan crops)
        self.resolve(items, proc_kwargs)
        if "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            if not isinstance(ids, (list, tuple)) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in ids
            ):
                raise ValueError("prompt_token_ids must be a list of integers")
            text, ids = prompt.get("prompt"), list(ids)
        elif "prompt" in prompt:
            text = prompt["prompt"]
            if not isinstance(text, str):
                raise TypeError(f"'prompt' must be a str, got {type(text).__name__}")
            # models whose processor rewrites the placeholder text itself (Gemma 3); one that
            # declares `mm_expand_with_items` gets each item's processed data, prompt order
            rewrite = getattr(self.model, "mm_expand_prompt_text", None)
            if rewrite and items:
                extra = ()
                if getattr(self.model, "mm_expand_with_items", False):
                    extra = ([it.output.data for it in items],)
                text_in = rewrite(text, self.tokenizer, *extra)
            else:
                text_in = text
            ids = self.tokenizer(text_in).input_ids
        else:
            raise ValueError("a multimodal prompt needs 'prompt' or 'prompt_token_ids'")
        # models whose processor writes text of its own before each item (MiniCPM-V's ids)
        mark = getattr(self.model, "mm_mark_items", None)
        if mark is not None and items:
            ids = mark(ids, self._encode_text)

        if in_video:  # each video with its audio track: one item over the interleaved span
            from .audio_in_video import join_audio_in_video

            items = join_audio_in_video(self.model, items, list(tracks), self._encode_text)
        else:
            items = items + list(tracks)
        ids, placed = self.expand(ids, items)
        mm = MultimodalRequest(placed, len(ids), cache_salt=prompt.get("cache_salt"))
        if getattr(self.model, "uses_mrope", False):
            spans = [(p.start, p.end, p.modality, p.meta) for p in placed]
            mm.mrope_positions, mm.mrope_delta = self.model.mrope_positions(len(ids), spans)
        return text, ids, mm


def _runs(positions: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for p in positions:
        if runs and runs[-1][0] + runs[-1][1] == p:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((p, 1))
    return runs


def prepare_multimodal_prompt(engine, prompt: dict):
    """A prompt dict with `multi_modal_data` -> (text, prompt token ids, request's items).

    `engine` is whatever owns the front ends (`LLMEngine.mm_frontend()` /
    `audio_frontend()`). Audio prompts (Whisper, Qwen2-Audio) go to the audio front end;
    audio beside images or video, for a model that takes both (Qwen2.5-Omni), to this
    front end with the audio front end's help (`audio_in_video.py`).
    """
    from .audio_in_video import has_vision_items
    from .audio_inputs import is_audio_prompt, prepare_audio_prompt

    if is_audio_prompt(prompt):
        audio = engine.audio_frontend()
        takes = set(getattr(audio.model, "mm_modalities", ())) - {"audio"}
        if not (takes and has_vision_items(prompt)):
            return prepare_audio_prompt(engine, prompt)
        return engine.mm_frontend().prepare(prompt, audio)
    return engine.mm_frontend().prepare(prompt)


def transcription_prompt(engine, samples, sample_rate, **kwargs):
    """The server's /v1/audio/transcriptions hook (see audio_inputs.transcription_prompt)."""
    from .audio_inputs import transcription_prompt as make

    return make(engine, samples, sample_rate, **kwargs)
