"""Audio prompts -> token ids + the per-request object the engine feeds the runner with.

Two kinds of audio model, one front end per engine (`LLMEngine.audio_frontend()`), host-only
like the image front end (it is given the model's declared interface, the tokenizer, the
processor's files and the HF config; it holds no engine and runs no encoder):

- Encoder-decoder (Whisper). The prompt is the decoder's: by default
  `<|startoftranscript|><|lang|><|task|><|notimestamps|>` as HF's `generate` builds it from
  the generation config (English-only checkpoints: `<|startoftranscript|><|notimestamps|>`).
  The audio becomes log-mel features with the checkpoint's own `WhisperFeatureExtractor`.
  The request object (`WhisperRequest`, plain data) carries the features and the tokens
  HF's generate suppresses (`suppress_tokens` always, `begin_suppress_tokens` for the first
  generated token). The engine's encoder stage gives the request a cross-attention slot
  and runs the encoder when it is first scheduled (`LLMEngine._run_cross_encoders`), and
  frees the slot when it finishes.
- Audio-in-LLM (Qwen2-Audio). Each audio becomes log-mel features as the checkpoint's HF
  processor makes them (prepared items cached by uuid or content hash, so an item sent as
  `None` with a known uuid is served from the cache), each placeholder token is expanded to
  its item's number of rows, and the engine's encoder stage encodes and splices the rows
  like images' (`jaxmm.multimodal.inputs.MultimodalRequest`). Chat audio parts arrive here through
  `chat_parts.conversation_to_mm_prompt` as token ids with one placeholder per part.


Audio items: `(samples, sample_rate)` (1-D, or 2-D channels-first or channels-last, any
rate; folded to mono when the feature extractor takes one channel, then resampled to its
rate), a bare 1-D array already at the model's rate, encoded file bytes, or `None` with a
uuid in `multi_modal_uuids` (audio-in-LLM models), or, with `enable_mm_embeds`, precomputed
audio-tower + projector rows: {"audio_embeds": (n, D) or (N, n, D)} (numpy, torch, JAX, or a
base64 .npy / torch.save payload) or a float torch / JAX tensor, shape-checked by the model
(`mm_check_embeds`) and spliced as they are. `limit_mm_per_prompt["audio"]` caps the
items per prompt. Plain Python + numpy; no JAX here (the model supplies the jitted encoder).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading

import numpy as np

from .audio import decode_audio_bytes, load_audio_item
from .cache import EncoderCache
from .hashing import content_hash
from .inputs import check_prompt_keys
from .values import _is_int_tensor, _is_tensor, decode_embeds_payload, to_numpy

logger = logging.getLogger(__name__)

TASKS = ("transcribe", "translate")


def wants_mono(feature_extractor) -> bool:
    """Whether the feature extractor takes one channel.

    Spectrogram extractors (`input_features`: Whisper, Qwen2-Audio...) are mono; waveform
    ones say how many channels they take (`audio_channels`, else `feature_size`).
    """
    channels = getattr(feature_extractor, "audio_channels", None)
    if channels is None:
        names = getattr(feature_extractor, "model_input_names", None) or ["input_features"]
        if names[0].endswith("input_features"):  # Phi-4-multimodal: audio_input_features
            return True
        channels = getattr(feature_extractor, "feature_size", 1)
    return int(channels) == 1


def audio_hash(audio: np.ndarray, *extra) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(str((audio.dtype.str, audio.shape, extra)).encode())
    h.update(np.ascontiguousarray(audio).tobytes())
    return h.hexdigest()


def _audio_items(data) -> list:
    if not isinstance(data, dict) or not data:
        raise ValueError("multi_modal_data must be a non-empty dict {modality: item(s)}")
    unknown = sorted(set(data) - {"audio", "audio_embeds"})
    if unknown:
        raise ValueError(
            "a prompt with audio takes audio items only (audio and images or video in one "
            f"prompt are not supported); got multi_modal_data keys {unknown}"
        )
    if len(data) > 1:
        raise ValueError("give audio items under one key: 'audio' (audio or its embeddings)")
    name, items = next(iter(data.items()))
    items = items if isinstance(items, list) else [items]
    out = []
    for item in items:
        if name == "audio_embeds" and not isinstance(item, dict) and item is not None:
            item = {"audio_embeds": item}
        out.extend(audio_embed_items(item) if is_audio_embeds(item) else [item])
    return out


class AudioEmbeds:
    """One audio item given as its precomputed audio-tower + projector output (n, D)."""

    def __init__(self, rows: np.ndarray):
        self.rows = rows


def is_audio_embeds(item) -> bool:
    """Whether an audio item is precomputed embeddings rather than audio.

    vLLM's forms: {"audio_embeds": ...} (numpy, torch, JAX or a base64 .npy / torch.save
    payload), or a float torch / JAX tensor of 2 (n, D) or 3 (N, n, D) dims. A numpy array
    is always audio (samples, or channels x samples).
    """
    if isinstance(item, AudioEmbeds):
        return True
    if isinstance(item, dict):
        return True  # checked in audio_embed_items: it must hold "audio_embeds"
    if isinstance(item, np.ndarray) or not hasattr(item, "shape") or len(item.shape) < 2:
        return False
    return _is_tensor(item) and not _is_int_tensor(item)


def audio_embed_items(value) -> list[AudioEmbeds]:
    """An embeddings item as given -> one AudioEmbeds per audio: (n, D) is one item,
    (N, n, D) is N items."""
    if isinstance(value, AudioEmbeds):
        return [value]
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"audio_embeds"})
        if "audio_embeds" not in value or unknown:
            raise ValueError(
                f"an audio embeddings dict holds 'audio_embeds' only; got keys {sorted(value)}"
            )
        value = value["audio_embeds"]
    if isinstance(value, str):
        rows = decode_embeds_payload(value)
    elif isinstance(value, list) and value and all(np.ndim(v) == 2 for v in value):
        return [AudioEmbeds(to_numpy(v)) for v in value]
    else:
        rows = to_numpy(value)
    if rows.ndim == 3:
        return [AudioEmbeds(r) for r in rows]
    return [AudioEmbeds(rows)]


# ---------------------------------------------------------------------------------------
# Whisper: slots and the per-request object


class WhisperRequest:
    """`Request.mm` of one transcription: the encoder's input and the decoder's suppressions.

    Plain data. The engine gives the request a cross-attention slot (`slot`) when it is
    first scheduled, runs the encoder into it, and frees it when the request finishes.
    """

    def __init__(
        self,
        features: np.ndarray,
        key: str,
        suppress_tokens: list[int],
        begin_suppress_tokens: list[int],
    ):
        self.features = features  # (mel, frames); dropped once encoded
        self.key = key
        self.suppress_tokens = suppress_tokens
        self.begin_suppress_tokens = begin_suppress_tokens
        self.slot: int | None = None  # set by the engine

    @property
    def extra_keys(self) -> tuple[tuple[int, int, str], ...]:
        # every decoder position depends on the audio (cross-attention): cover them all
        return ((0, 1 << 62, f"audio:{self.key}"),)

    def fill_step(self, step, seq, start: int, n: int) -> None:
        del start, n
        if self.slot is None:
            raise RuntimeError("a Whisper request was scheduled without a cross-attention slot")
        step.seq_inputs = {"cross_slot": np.int32(self.slot)}
        if step.sample:
            banned = list(step.banned_ids or []) + self.suppress_tokens
            if seq.num_output_tokens == 0:
                banned += self.begin_suppress_tokens
            if banned:
                step.banned_ids = banned


# ---------------------------------------------------------------------------------------
# The front end, one per engine


class AudioFrontend:
    """Audio prompts -> token ids + host items (see the module docstring).

    model: the model's declared multimodal interface; tokenizer; processor_path: the
    checkpoint directory with the feature extractor's config; config: the engine's
    `MultimodalConfig`; hf_config: the checkpoint's config (Whisper's generation defaults).
    """

    def __init__(self, model, tokenizer, processor_path: str | None, config, hf_config):
        self._tokenizer = tokenizer
        self.config = config
        self.model = model
        supported = tuple(getattr(self.model, "mm_modalities", ()))
        if "audio" not in supported:
            raise ValueError(
                f"{type(self.model).__name__} does not take 'audio' inputs; it takes: "
                + (", ".join(supported) or "text only")
            )
        path = processor_path
        if path is None:
            raise ValueError("this checkpoint carries no audio feature extractor config")
        from transformers import AutoFeatureExtractor

        self.path = path
        self.feature_extractor = AutoFeatureExtractor.from_pretrained(path, local_files_only=True)
        fe = self.feature_extractor
        self.sampling_rate = int(fe.sampling_rate)
        self.mono = wants_mono(fe)
        # the encoder's fixed window (Whisper: 30 s)
        self.max_seconds = float(getattr(fe, "chunk_length", 30))
        self.encoder_decoder = bool(getattr(self.model, "is_encoder_decoder", False))
        self._lock = threading.Lock()
        self.cache = EncoderCache()  # audio-in-LLM prepared items by uuid or content hash
        if self.encoder_decoder:
            self._init_whisper(hf_config)

    # -- audio ---------------------------------------------------------------------------------
    def load(self, item) -> np.ndarray:
        """An audio item -> float32 audio at the feature extractor's rate (mono if it wants)."""
        if isinstance(item, (bytes, bytearray, memoryview)):
            item = decode_audio_bytes(bytes(item))
        elif isinstance(item, np.ndarray):
            item = (item, self.sampling_rate)
        elif hasattr(item, "detach"):  # torch tensor at the model's rate
            item = (item.detach().cpu().numpy(), self.sampling_rate)
        elif isinstance(item, (tuple, list)) and len(item) == 2 and hasattr(item[0], "detach"):
            item = (item[0].detach().cpu().numpy(), item[1])
        if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[1], float):
            if item[1].is_integer():
                item = (item[0], int(item[1]))
        return load_audio_item(item, self.sampling_rate, mono=self.mono)

    def features(self, audio: np.ndarray) -> np.ndarray:
        """Mono audio at the model's rate -> log-mel features (mel, frames) for one window."""
        seconds = audio.shape[-1] / self.sampling_rate
        if seconds > self.max_seconds + 1e-6:
            raise ValueError(
                f"audio is {seconds:.2f} s long; this model hears at most {self.max_seconds:g} s "
                "per request: use jaxmm.transcribe.transcribe (LLM.transcribe), which splits "
                "long audio with jaxmm.multimodal.audio.split_audio"
            )
        out = self.feature_extractor(
            audio, sampling_rate=self.sampling_rate, return_tensors="np"
        ).input_features[0]
        want = self.model.num_frames
        if out.shape[-1] != want:
            raise ValueError(
                f"the feature extractor gave {out.shape[-1]} frames; the encoder takes {want}"
            )
        return np.asarray(out, np.float32)

    # -- Whisper -------------------------------------------------------------------------------
    def _init_whisper(self, cfg) -> None:
        from transformers import GenerationConfig

        if os.path.exists(os.path.join(self.path, "generation_config.json")):
            gen = GenerationConfig.from_pretrained(self.path, local_files_only=True)
        else:
            gen = GenerationConfig.from_model_config(cfg)
        self.generation_config = gen
        self.suppress_tokens = list(
            gen.suppress_tokens or getattr(cfg, "suppress_tokens", None) or []
        )
        self.begin_suppress_tokens = list(
            gen.begin_suppress_tokens or getattr(cfg, "begin_suppress_tokens", None) or []
        )
        self.max_target_positions = int(cfg.max_target_positions)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            raise ValueError("the tokenizer is off (skip_tokenizer_init); pass prompt_token_ids")
        return self._tokenizer

    def decoder_prompt(
        self, language: str | None = "en", task: str = "transcribe", prompt: str | None = None
    ) -> list[int]:
        """The decoder prompt HF's Whisper `generate` starts from (short-form, no timestamps).

        `prompt` is earlier text to condition on (OpenAI's `prompt`): it goes after
        `<|startofprev|>`, before `<|startoftranscript|>`.
        """
        gen = self.generation_config
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        ids = [gen.decoder_start_token_id]
        lang_to_id = getattr(gen, "lang_to_id", None)
        task_to_id = getattr(gen, "task_to_id", None)
        if lang_to_id:  # multilingual
            ids.append(lang_to_id[self._language_token(language or "en", lang_to_id)])
            ids.append(task_to_id[task])
        else:
            if language is not None and _language_code(language) != "en":
                raise ValueError(
                    f"this Whisper checkpoint is English-only; language={language!r} is not "
                    "supported"
                )
            if task != "transcribe":
                raise ValueError("this Whisper checkpoint is English-only: it cannot translate")
            forced = getattr(gen, "forced_decoder_ids", None) or []
            for i, (pos, tok) in enumerate(sorted(forced), 1):
                if pos != i or tok is None:
                    break
                ids.append(tok)
        no_ts = getattr(gen, "no_timestamps_token_id", None)
        if no_ts is not None and ids[-1] != no_ts:
            ids.append(no_ts)
        if prompt:
            prev = getattr(gen, "prev_sot_token_id", None)
            if prev is None:
                prev = self.tokenizer.convert_tokens_to_ids("<|startofprev|>")
            text_ids = self.tokenizer(" " + prompt.strip(), add_special_tokens=False).input_ids
            # keep the most recent text; HF keeps at most half the decoder's positions
            text_ids = text_ids[-(self.max_target_positions // 2 - 1) :]
            ids = [prev, *text_ids, *ids]
        return [int(t) for t in ids]

    @staticmethod
    def _language_token(language: str, lang_to_id: dict) -> str:
        if language in lang_to_id:
            return language
        token = f"<|{_language_code(language)}|>"
        if token not in lang_to_id:
            raise ValueError(
                f"language {language!r} is not one this Whisper checkpoint knows; it knows "
                + ", ".join(sorted(t.strip("<|>") for t in lang_to_id))
            )
        return token

    def whisper_request(self, audio: np.ndarray) -> WhisperRequest:
        return WhisperRequest(
            self.features(audio),
            audio_hash(audio, self.sampling_rate),
            self.suppress_tokens,
            self.begin_suppress_tokens,
        )

    def transcription_prompt(
        self,
        audio_item,
        *,
        language: str | None = "en",
        task: str = "transcribe",
        prompt: str | None = None,
    ) -> tuple[str | None, list[int], WhisperRequest]:
        if not self.encoder_decoder:
            make = getattr(self.model, "transcription_prompt_text", None)
            chat = getattr(self.model, "transcription_chat", None)
            if (make is None and chat is None) or task != "transcribe":
                raise ValueError(f"{type(self.model).__name__} does not {task} audio")
            # an audio-in-LLM model's own request format (Voxtral), or its request as a user
            # turn through the checkpoint's chat template (Gemma 4); `prompt` (earlier text)
            # has no place in it
            request = {"multi_modal_data": {"audio": [audio_item]}}
            if chat is not None:
                from .chat import render_chat

                text = render_chat(self.tokenizer, chat(language))
                ids = self.tokenizer(text, add_special_tokens=False).input_ids  # BOS: template's
                request |= {"prompt": text, "prompt_token_ids": ids}
            else:
                request["prompt"] = make(language)
            return self._prepare_embeds(request, [audio_item])
        audio = self.load(audio_item)
        ids = self.decoder_prompt(language, task, prompt)
        return None, ids, self.whisper_request(audio)

    # -- prompts --------------------------------------------------------------------------------
    def prepare(self, prompt: dict):
        if not isinstance(prompt, dict):
            raise TypeError(f"an audio prompt is a dict, got {type(prompt).__name__}")
        if "encoder_prompt" in prompt or "decoder_prompt" in prompt:
            prompt = _flatten_encoder_decoder(prompt)
        check_prompt_keys(prompt)
        items = _audio_items(prompt.get("multi_modal_data"))
        self._check_limit(len(items))
        if self.encoder_decoder:
            return self._prepare_whisper(prompt, items)
        return self._prepare_embeds(prompt, items)

    def resolve_items(self, data: dict, uuids: dict | None, kwargs: dict) -> list:
        """(key, prepared item) per audio item of a prompt that also holds images or video
        (the image front end places them all; `audio_in_video.split_audio`). `data` and
        `uuids` hold the prompt's audio entries only."""
        items = _audio_items(data)
        self._check_limit(len(items))
        uuids = _audio_uuids(uuids, len(items))
        with self._lock:
            return self._resolve(items, uuids, kwargs)

    def _check_limit(self, num_items: int) -> None:
        from .values import _limit

        limit = _limit(getattr(self.config, "limit_mm_per_prompt", None) or {}, "audio")
        if limit is not None and num_items > limit:
            raise ValueError(
                f"this prompt has {num_items} audio item(s), more than the {limit} allowed "
                f"per prompt (limit_mm_per_prompt={{'audio': {limit}}})"
            )

    def _prepare_whisper(self, prompt: dict, items: list):
        if len(items) != 1:
            raise ValueError(f"a Whisper prompt takes exactly one audio item, got {len(items)}")
        if isinstance(items[0], AudioEmbeds):
            raise ValueError(
                f"{type(self.model).__name__} is an encoder-decoder model: it takes audio, not "
                "precomputed audio embeddings"
            )
        text = prompt.get("prompt")
        if "prompt_token_ids" in prompt:
            ids = _check_ids(prompt["prompt_token_ids"])
        elif text:
            if not isinstance(text, str):
                raise TypeError(f"'prompt' must be a str, got {type(text).__name__}")
            ids = self.tokenizer(text, add_special_tokens=False).input_ids
        else:
            opts = dict(prompt.get("mm_processor_kwargs") or {})
            ids = self.decoder_prompt(opts.get("language", "en"), opts.get("task", "transcribe"))
        return text, ids, self.whisper_request(self.load(items[0]))

    # -- Qwen2-Audio and other audio-in-LLM models ----------------------------------------------
    def _prepare_embeds(self, prompt: dict, items: list):
        """Prompt text or ids with one audio placeholder per item -> ids with each placeholder
        expanded to its item's rows, and the rows to splice over them.

        The rows come from the encoder cache (by uuid, else by content hash) or from the
        feature extractor + the model's audio encoder. An item sent as `None` must come with
        the uuid of an item sent before. Expanding here rather than in the HF processor keeps
        `prompt_token_ids` (chat prompts, tokenized without special tokens) as given, and lets
        a cached item stand in for audio that is not sent again.
        """
        from .inputs import MultimodalRequest, PlacedItem

        text = prompt.get("prompt")
        if "prompt_token_ids" in prompt:
            ids = _check_ids(prompt["prompt_token_ids"])
        elif isinstance(text, str):
            # as the HF processor tokenizes (special tokens added): each added audio token
            # splits the text, so expanding after tokenizing gives the same ids
            ids = [int(t) for t in self.tokenizer(text).input_ids]
        else:
            raise ValueError(
                "an audio prompt for this model needs 'prompt' text (or 'prompt_token_ids') "
                f"with one audio placeholder ({self.model.mm_placeholder_text('audio')!r}) "
                "per item"
            )
        mark = getattr(self.model, "mm_mark_items", None)
        if mark is not None:  # what the processor writes around each item (Gemma 4's <boa>)
            ids = mark(ids, lambda s: self.tokenizer.encode(s, add_special_tokens=False))
        uuids = _audio_uuids(prompt.get("multi_modal_uuids"), len(items))
        kwargs = dict(prompt.get("mm_processor_kwargs") or {})
        with self._lock:
            outputs = self._resolve(items, uuids, kwargs)
        token = self.model.mm_token_id("audio")
        where = [i for i, t in enumerate(ids) if t == token]
        spans = [(i, 1) for i in where]
        if len(where) != len(items):  # maybe already expanded: one run per item
            spans = _runs(where)
        if len(spans) != len(items):
            raise ValueError(
                f"the prompt has {len(spans)} audio placeholder(s) for {len(items)} audio "
                f"item(s): put one {self.model.mm_placeholder_text('audio')!r} where each "
                "item goes (LLM.chat does this from audio content parts)"
            )
        out: list[int] = []
        placed = []
        cursor = 0
        for i, ((pos, length), (key, output)) in enumerate(zip(spans, outputs, strict=True)):
            n = output.num_rows
            if length not in (1, n):
                raise ValueError(
                    f"audio item {i} takes {n} placeholder tokens; the prompt has a run of {length}"
                )
            out.extend(ids[cursor:pos])
            placed.append(PlacedItem(len(out), len(out) + n, "audio", key, output.data))
            out.extend([token] * n)
            cursor = pos + length
        out.extend(ids[cursor:])
        return text, out, MultimodalRequest(placed, len(out), cache_salt=prompt.get("cache_salt"))

    def _resolve(self, items: list, uuids: list, kwargs: dict) -> list[tuple[str, object]]:
        """(key, prepared item) per item: from the cache, else its features (the engine's
        encoder stage runs the audio encoder when a prefill chunk needs the item)."""
        from .cache import EncoderOutput

        result: list[tuple[str, object] | None] = [None] * len(items)
        pending: dict[str, list[int]] = {}  # key -> items (the same audio twice: encoded once)
        feats: list[dict] = []
        for i, (item, uuid) in enumerate(zip(items, uuids, strict=True)):
            if isinstance(item, AudioEmbeds):
                result[i] = self._embeds_output(i, item.rows, uuid)
                continue
            if uuid is not None:
                cached = self.cache.get(uuid)
                if cached is not None:  # a uuid names its content: trust it
                    result[i] = (uuid, cached)
                    continue
            if item is None:
                if uuid is None:
                    raise ValueError(
                        f"audio item {i} is None: a None item must come with the uuid of an "
                        "item sent before (served from the encoder cache)"
                    )
                raise ValueError(
                    f"audio item {i} is None and its uuid {uuid!r} is not in the encoder cache "
                    "(never sent, or evicted): send the audio itself again"
                )
            audio = self.load(item)
            seconds = audio.shape[-1] / self.sampling_rate
            # split in windows (Voxtral) or taken whole (Qwen3-Omni, no truncation): not refused
            windows = getattr(self.model, "audio_windows", False) or (
                self._feature_kwargs().get("truncation") is False
            )
            if seconds > self.max_seconds + 1e-6 and not windows:
                raise ValueError(
                    f"audio item {i} is {seconds:.2f} s long; this model hears at most "
                    f"{self.max_seconds:g} s per item"
                )
            key = uuid or audio_hash(audio, self.sampling_rate, sorted(kwargs.items()))
            cached = None if uuid is not None else self.cache.get(key)
            if cached is not None:
                result[i] = (key, cached)
                continue
            if key not in pending:
                pending[key] = []
                feats.append(self._features(audio, kwargs))
            pending[key].append(i)
        for (key, where), f in zip(pending.items(), feats, strict=True):
            output = EncoderOutput("audio", f, self.model.mm_num_tokens("audio", f))
            self.cache.put(key, output)
            for i in where:
                result[i] = (key, output)
        return result  # type: ignore[return-value]

    def _embeds_output(self, index: int, rows: np.ndarray, uuid: str | None):
        """(key, prepared item) of precomputed audio embeddings: checked against the model,
        copied into the encoder cache by the engine as they are (no encoder runs)."""
        from .cache import EncoderOutput

        if not getattr(self.config, "enable_mm_embeds", False):
            raise ValueError(
                f"audio item {index} is a precomputed embedding; embeddings inputs are refused "
                "unless the engine is started with enable_mm_embeds=True"
            )
        if rows.ndim == 3 and rows.shape[0] == 1:
            rows = rows[0]
        check = getattr(self.model, "mm_check_embeds", None)
        if check is None:
            raise ValueError(f"{type(self.model).__name__} takes no audio embeddings")
        check("audio", rows, {})
        width = int(getattr(self.model, "mm_row_width", 0) or rows.shape[1])
        if rows.shape[1] < width:  # cached rows carry more: Qwen3-Omni's DeepStack columns,
            rows = np.pad(rows, ((0, 0), (0, width - rows.shape[1])))  # zero at audio tokens
        key = uuid or content_hash("audio", "embeds", rows)
        output = EncoderOutput("audio", rows, len(rows))
        self.cache.put(key, output)
        return key, output

    def _feature_kwargs(self) -> dict:
        """The feature extractor's padding options as the model's HF processor sets them:
        padded to the extractor's window unless the model says otherwise
        (`audio_feature_kwargs`, e.g. Qwen3-Omni: its own length, never truncated)."""
        return {"padding": "max_length", **(getattr(self.model, "audio_feature_kwargs", {}))}

    def _features(self, audio: np.ndarray, kwargs: dict) -> dict:
        """What the HF processor hands the audio tower: padded log-mel + the valid frames,
        or, for models that split audio into encoder windows (Voxtral), the log-mel of the
        clip padded to whole windows, cut into (windows, mel, frames). A model whose
        extractor's outputs are its own (Phi-4-multimodal) reads them (`mm_audio_features`)."""
        own = getattr(self.model, "mm_audio_features", None)
        if own is not None:
            return own(self.feature_extractor, audio, self.sampling_rate, kwargs)
        if getattr(self.model, "audio_windows", False):
            window = int(self.max_seconds * self.sampling_rate)
            out = self.feature_extractor(
                audio,
                sampling_rate=self.sampling_rate,
                padding=True,
                truncation=False,
                pad_to_multiple_of=window,
                return_tensors="np",
                **kwargs,
            )["input_features"][0]  # (mel, windows * frames): normalised over the whole clip
            frames = self.model.num_frames
            feats = out.reshape(out.shape[0], -1, frames).transpose(1, 0, 2)
            return {"input_features": np.ascontiguousarray(feats, np.float32)}
        out = self.feature_extractor(
            audio,
            sampling_rate=self.sampling_rate,
            return_attention_mask=True,
            return_tensors="np",
            **{**self._feature_kwargs(), **kwargs},
        )
        return {
            "input_features": out["input_features"][0],
            "feature_attention_mask": out["attention_mask"][0],
        }


def _audio_uuids(uuids, num_items: int) -> list:
    if uuids is None:
        return [None] * num_items
    if not isinstance(uuids, dict):
        raise TypeError(f"multi_modal_uuids must be a dict, got {type(uuids).__name__}")
    unknown = sorted(set(uuids) - {"audio", "audio_embeds"})
    if unknown:
        raise ValueError(f"multi_modal_uuids names {unknown}, which has no multi_modal_data")
    ids = uuids.get("audio", uuids.get("audio_embeds"))
    ids = [None] * num_items if ids is None else (ids if isinstance(ids, list) else [ids])
    if len(ids) != num_items:
        raise ValueError(
            f"multi_modal_uuids['audio'] has {len(ids)} entries for {num_items} audio item(s)"
        )
    for u in ids:
        if u is not None and not isinstance(u, str):
            raise TypeError(f"a multimodal uuid must be a str, got {type(u).__name__}")
    return ids


def _language_code(language: str) -> str:
    from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE

    lang = language.lower().strip()
    if lang.startswith("<|") and lang.endswith("|>"):
        lang = lang[2:-2]
    return TO_LANGUAGE_CODE.get(lang, lang)


def _check_ids(ids) -> list[int]:
    if not isinstance(ids, (list, tuple)) or not all(
        isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in ids
    ):
        raise ValueError("prompt_token_ids must be a list of integers")
    return [int(t) for t in ids]


def _runs(positions: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for p in positions:
        if runs and runs[-1][0] + runs[-1][1] == p:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((p, 1))
    return runs


def _flatten_encoder_decoder(prompt: dict) -> dict:
    """vLLM's explicit form {"encoder_prompt": {..., "multi_modal_data"}, "decoder_prompt": ...}."""
    enc = prompt.get("encoder_prompt") or {}
    dec = prompt.get("decoder_prompt")
    if not isinstance(enc, dict):
        raise ValueError("encoder_prompt must be a dict holding multi_modal_data")
    flat = {k: v for k, v in enc.items() if k not in ("prompt", "prompt_token_ids")}
    if isinstance(dec, str):
        flat["prompt"] = dec
    elif isinstance(dec, dict):
        flat.update({k: v for k, v in dec.items() if k in ("prompt", "prompt_token_ids")})
    elif dec is not None:
        raise ValueError("decoder_prompt must be a str or a dict")
    return flat


# ---------------------------------------------------------------------------------------
# Entry points


def audio_frontend(engine) -> AudioFrontend:
    """The engine's audio front end (`engine.audio_frontend()`, built there on first use)."""
    return engine.audio_frontend()


def is_audio_prompt(prompt) -> bool:
    """Whether a prompt dict carries audio (top level or vLLM's encoder_prompt)."""
    if not isinstance(prompt, dict):
        return False
    data = prompt.get("multi_modal_data")
    if data is None and isinstance(prompt.get("encoder_prompt"), dict):
        data = prompt["encoder_prompt"].get("multi_modal_data")
    return isinstance(data, dict) and ("audio" in data or "audio_embeds" in data)


def prepare_audio_prompt(engine, prompt: dict):
    """A prompt dict with audio in `multi_modal_data` -> (text, prompt token ids, mm)."""
    return audio_frontend(engine).prepare(prompt)


def transcription_prompt(
    engine,
    samples,
    sample_rate: int,
    language: str | None = None,
    prompt: str | None = None,
    task: str = "transcribe",
):
    """One clip (<= the encoder's window) -> (text, decoder prompt ids, WhisperRequest).

    `language` None means English (no language detection is done).
    """
    return audio_frontend(engine).transcription_prompt(
        (samples, sample_rate), language=language or "en", task=task, prompt=prompt
    )
