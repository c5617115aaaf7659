"""LLMEngine: requests in, RequestOutputs out, one `step()` at a time.

1. `add_request` validates and tokenizes the prompt (all errors surface here, before any
   work), and queues one Sequence per requested completion (n).
2. `step` asks the Scheduler for a batch, turns it into SeqSteps for the ModelRunner,
   appends the sampled tokens, detokenizes incrementally, applies the stop conditions and
   frees finished sequences' pages; it returns the outputs of the requests that advanced.
   With asynchronous scheduling (the default) step N+1 is scheduled and launched before
   step N's tokens are read back: each sequence sampled in step N gets a placeholder token
   -(row + 1) that the device fills from step N's output, so host work (scheduling, array
   preparation, detokenization) overlaps the device. A sequence that stops at step N has
   one wasted token computed in N+1, dropped here. Steps whose sequences use penalties
   (which need the real previous tokens on the host) run synchronously.
3. `abort_request` finishes requests early (a client went away) and frees their pages.
The server drives the same three calls from its engine thread (AsyncEngine).
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from jaxmm import progress
from jaxmm.config import EngineConfig
from jaxmm.engine.block_manager import BlockManager
from jaxmm.engine.detokenizer import detokenize_incrementally, find_stop_string, new_state
from jaxmm.engine.encoder_cache import EncoderCacheManager
from jaxmm.engine.prompts import check_prompt_ids, tokenize_prompt
from jaxmm.engine.scheduler import ScheduledBatch, Scheduler
from jaxmm.engine.sequence import Sequence
from jaxmm.engine.state_cache import StateSlots, StateSnapshots, snapshot_point
from jaxmm.engine.structured import fill_bitmasks
from jaxmm.outputs import CompletionOutput, Logprob, RequestOutput
from jaxmm.runner.checkpoint import load_tokenizer, open_checkpoint
from jaxmm.runner.model_runner import InFlight, ModelRunner, SeqStep, enable_compilation_cache
from jaxmm.sampling_params import SamplingParams


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    arrival_time: float
    first_token_time: float | None = None
    last_token_time: float | None = None
    num_cached_tokens: int = 0
    mm: object | None = None  # multimodal inputs prepared by the front end
    metrics: dict = field(default_factory=dict)
    # prompt logprobs: one entry per prompt token (the first stays None), filled per chunk
    prompt_logprobs: list | None = None

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


@dataclass
class _Pending:
    """A launched step: its batch, the device handle, and where its tokens go."""

    batch: ScheduledBatch
    handle: InFlight
    sampled: list[tuple[Sequence, int]]  # (sequence, index of its placeholder token)
    sync: bool  # a sequence uses penalties: resolve before scheduling the next step
    # (sequence, offset of its chunk in the step, chunk start, length): prompt logprobs
    prompt_rows: list = field(default_factory=list)
    # outputs when it was resolved early: by the next step's grammar-mask fill, which needs
    # its tokens, while the next step's model runs on the device
    outputs: list | None = None


class LLMEngine:
    def __init__(self, config: EngineConfig):
        t_start = time.perf_counter()
        self.config = config
        enable_compilation_cache(config.compilation_cache_dir)
        mc = config.model
        ck = open_checkpoint(mc.model, mc.load_format, mc.hf_overrides)
        self.checkpoint = ck
        self.hf_config = ck.hf_config
        self.tokenizer = None if mc.skip_tokenizer_init else load_tokenizer(ck, mc.tokenizer)
        self.eos_token_ids = list(ck.eos_token_ids)
        if not self.eos_token_ids and self.tokenizer is not None:
            if self.tokenizer.eos_token_id is not None:
                self.eos_token_ids = [self.tokenizer.eos_token_id]
        sc, cc = config.scheduler, config.cache
        self.runner = ModelRunner(ck, config)
        lim = self.runner.limits  # what the configs resolved to on this device and model
        self.max_model_len = lim.max_model_len
        self.block_manager = BlockManager(
            lim.num_pages,
            lim.block_size,
            cc.enable_prefix_caching,
            recurrent_state=bool(lim.num_state_slots),
            group_windows=lim.kv_group_windows,
        )
        # the encoder stage: which rows of the runner's encoder cache hold which item
        self.encoder_cache = (
            EncoderCacheManager(lim.encoder_cache_rows) if lim.encoder_cache_rows else None
        )
        self.scheduler = Scheduler(
            lim.max_num_seqs,
            lim.max_num_batched_tokens,
            self.block_manager,
            encoder_cache=self.encoder_cache,
            state_slots=StateSlots(lim.num_state_slots) if lim.num_state_slots else None,
            # models whose items attend within themselves (Gemma 3's bidirectional image
            # tokens) prefill each item in one chunk
            whole_mm_items=bool(getattr(self.runner.model_obj, "mm_whole_items", False)),
        )
        # hybrid models: state snapshots at cached prefixes (engine/state_cache.py)
        self.state_snapshots = None
        if lim.num_snapshot_slots and cc.enable_prefix_caching:
            self.state_snapshots = StateSnapshots(lim.num_state_slots, lim.num_snapshot_slots)
            self.block_manager.has_state_snapshot = self.state_snapshots.has
        self.requests: dict[str, Request] = {}
        self._rng = random.Random(config.seed)
        self._ids = itertools.count()
        self.stats = {
            "prompt_tokens": 0,
            "generation_tokens": 0,
            "finished": 0,
            "aborted": 0,
            "encoder_items": 0,
        }
        self.async_scheduling = sc.async_scheduling
        self._pending: _Pending | None = None
        self._mm_frontend = None
        self._audio_frontend = None
        self._frontend_lock = threading.Lock()
        # encoder-decoder models: free cross-attention slots (one per running request)
        self._free_slots = list(range(lim.cross_slots))
        if config.warmup:
            self.runner.warmup()
            self.warmup_encoders()
        else:
            progress.lazy_compile_note(len(self.runner.token_buckets))
        progress.note("engine ready in %.1f s", time.perf_counter() - t_start)

    # -- input ------------------------------------------------------------------------------
    def next_request_id(self) -> str:
        return str(next(self._ids))

    def tokenize(self, prompt) -> tuple[str | None, list[int]]:
        return tokenize_prompt(prompt, self.tokenizer)

    def grammars(self):
        """The structured-output grammar compiler, built on the first constrained request."""
        if getattr(self, "_grammars", None) is None:
            from jaxmm.engine.structured import GrammarCompiler

            eos = self.eos_token_ids[0] if self.eos_token_ids else None
            self._grammars = GrammarCompiler(self.tokenizer, self.runner.vocab_size, eos)
        return self._grammars

    def _check_logits_params(self, params: SamplingParams) -> None:
        """logit_bias ids inside the vocabulary; a structured output's grammar compiles."""
        V = self.runner.vocab_size
        bad = [t for t in params.logit_bias or () if t >= V]
        if bad:
            raise ValueError(
                f"SamplingParams.logit_bias has token id {bad[0]}, outside the vocabulary ({V})"
            )
        if params.structured_outputs is not None:
            self.grammars().compile(params.structured_outputs)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix page not in use (vLLM's `reset_prefix_cache`)."""
        self.block_manager.reset_prefix_cache()
        if self.state_snapshots is not None:
            self.state_snapshots.clear()
        return True

    @property
    def is_multimodal(self) -> bool:
        return self.runner.is_multimodal

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        check_prompt_ids(prompt_ids, self.max_model_len, self.runner.vocab_size)
        if not isinstance(params, SamplingParams):
            raise TypeError(f"expected SamplingParams, got {type(params).__name__}")
        limit = self.config.model.max_logprobs
        if params.logprobs is not None and params.logprobs > limit:
            raise ValueError(
                f"SamplingParams.logprobs must be <= {limit} (this engine's max_logprobs), "
                f"got {params.logprobs}"
            )

    def add_request(
        self,
        request_id: str,
        prompt,
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
        *,
        prompt_ids: list[int] | None = None,
        mm=None,
    ) -> None:
        params = params or SamplingParams()
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if prompt_ids is None:
            text, prompt_ids = self.tokenize(prompt)
        else:
            text = prompt if isinstance(prompt, str) else None
        self.validate(prompt_ids, params)
        spans = self._mm_spans(mm)
        self._check_logits_params(params)
        seqs = []
        base_seed = params.seed if params.seed is not None else self._rng.getrandbits(32)
        for i in range(params.n):
            seq = Sequence(
                request_id=request_id,
                token_ids=list(prompt_ids),
                num_prompt_tokens=len(prompt_ids),
                index=i,
                extra_keys=getattr(mm, "extra_keys", ()) if mm is not None else (),
                mm_spans=spans,
            )
            seq.data["seed"] = (base_seed + 0x9E3779B1 * i) & 0xFFFFFFFF
            seq.data["detok"] = new_state(len(prompt_ids))
            seq.data["logprobs"] = [] if params.logprobs is not None else None
            seq.data["cum_logprob"] = 0.0
            if params.structured_outputs is not None:  # one grammar position per sequence
                seq.data["matcher"] = self.grammars().matcher(params.structured_outputs)
            if params.prompt_logprobs is not None:
                # every prompt token must be computed: no prefix cache hit for this prompt
                salt = (0, len(prompt_ids), f"prompt_logprobs:{request_id}")
                seq.extra_keys = (*seq.extra_keys, salt)
            seqs.append(seq)
        req = Request(
            request_id=request_id,
            prompt=text,
            prompt_token_ids=list(prompt_ids),
            params=params,
            seqs=seqs,
            arrival_time=arrival_time or time.monotonic(),
            mm=mm,
        )
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = [None] * len(prompt_ids)
        self.requests[request_id] = req
        self.stats["prompt_tokens"] += len(prompt_ids)
        for seq in seqs:
            self.scheduler.add(seq)

    def _mm_spans(self, mm) -> tuple[tuple[int, int, str], ...]:
        """The prompt positions each item's encoder output replaces (encoder-stage models)."""
        items = getattr(mm, "items", None)
        if not items or self.encoder_cache is None:
            return ()
        spans = []
        for it in items:
            if it.end - it.start > self.encoder_cache.num_rows:
                raise ValueError(
                    f"a {it.modality} of {it.end - it.start} tokens exceeds the encoder cache "
                    f"({self.encoder_cache.num_rows} rows): send a smaller {it.modality}"
                )
            spans.append((it.start, it.end, it.cache_key))
        return tuple(spans)

    def mm_frontend(self):
        """The multimodal front end for this model, built on first use: host-only, given the
        model's declared multimodal interface, the tokenizer and the processor's files."""
        with self._frontend_lock:
            if self._mm_frontend is None:
                from jaxmm.multimodal.inputs import MultimodalFrontend

                self._mm_frontend = MultimodalFrontend(
                    self.runner.model_obj,
                    self.tokenizer,
                    getattr(self.checkpoint, "processor_path", None),
                    self.config.multimodal,
                )
            return self._mm_frontend

    def audio_frontend(self):
        """The audio front end (Whisper, audio-language models), built on first use."""
        with self._frontend_lock:
            if self._audio_frontend is None:
                from jaxmm.multimodal.audio_inputs import AudioFrontend

                self._audio_frontend = AudioFrontend(
                    self.runner.model_obj,
                    self.tokenizer,
                    getattr(self.checkpoint, "processor_path", None),
                    self.config.multimodal,
                    self.hf_config,
                )
            return self._audio_frontend

    def warmup_encoders(self, sizes: tuple[str, ...] | None = None) -> int:
        """Compile the vision encoder, and its writes into the encoder cache, for every batch
        of images of the warm sizes that the encoder stage may form (power-of-two counts up to
        the step's encoder budget). Returns the number of encoder calls made.

        sizes: "WxH" strings; default the engine's `mm_warmup_image_sizes`, or, for a model
        whose processor makes every image one fixed size (LLaVA), that size.
        """
        model = self.runner.model_obj
        if self.encoder_cache is None or "image" not in getattr(model, "mm_modalities", ()):
            return 0
        from PIL import Image

        fe = self.mm_frontend()
        fe.workers  # noqa: B018 - start the media worker processes while the encoder compiles
        if sizes is None:
            sizes = self.config.multimodal.mm_warmup_image_sizes
        if sizes is None:
            probe = fe.processor.image(Image.new("RGB", (64, 64)), {})
            sizes = () if "grid_thw" in probe else ("64x64",)  # fixed-size processors
        t0, calls = time.perf_counter(), 0
        rs = np.random.RandomState(0)
        for size in sizes:
            w, h = (int(v) for v in size.split("x"))
            img = Image.fromarray(rs.randint(0, 256, (h, w, 3), np.uint8))
            item = fe.processor.image(img, {})
            n = model.mm_num_tokens("image", item)
            k = 1
            while k * n <= min(max(self.scheduler.encoder_budget, n), self.encoder_cache.num_rows):
                rows = np.arange(k * n, dtype=np.int32).reshape(k, n)  # scratch rows
                self.runner.encode([("image", item, r) for r in rows])
                calls += 1
                k *= 2
        if calls:
            self.runner.sync_encoder_cache()
            progress.note(
                "warmup: %d vision-encoder batches of %s in %.1f s",
                calls,
                " ".join(sizes),
                time.perf_counter() - t0,
            )
        return calls

    def reset_mm_cache(self) -> None:
        """Forget the cached encoder outputs no running request holds."""
        if self.encoder_cache is not None:
            self.encoder_cache.reset()

    def abort_request(self, request_id) -> None:
        ids = {request_id} if isinstance(request_id, str) else set(request_id)
        self.scheduler.abort(ids)
        for rid in ids:
            req = self.requests.pop(rid, None)
            if req is not None:
                self._release(req)
                self.stats["aborted"] += 1

    def _release(self, req: Request) -> None:
        """Give back the request's cross-attention slot (encoder-decoder models)."""
        slot = getattr(req.mm, "slot", None)
        if slot is not None:
            req.mm.slot = None
            self._free_slots.append(slot)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or self._pending is not None

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    # -- the step -----------------------------------------------------------------------------
    def _seq_step(self, seq: Sequence, n: int) -> SeqStep:
        req = self.requests[seq.request_id]
        p = req.params
        start = seq.num_computed_tokens
        s = SeqStep(
            token_ids=seq.token_ids[start : start + n],
            start=start,
            block_table=seq.block_table,
            group_tables=seq.group_tables or None,
            sample=start + n == len(seq),
            temperature=p.temperature,
            top_k=p.top_k,
            top_p=p.top_p,
            min_p=p.min_p,
            seed=seq.data["seed"],
            output_pos=seq.num_output_tokens,
            presence=p.presence_penalty,
            frequency=p.frequency_penalty,
            repetition=p.repetition_penalty,
            num_logprobs=p.logprobs,
            logit_bias=p.logit_bias,
        )
        if self.scheduler.state_slots is not None:  # hybrid models
            s.state_slot = self.scheduler.state_slots.slot_of(seq.seq_id)
        if req.prompt_logprobs is not None and seq.index == 0 and start < seq.num_prompt_tokens:
            # row i predicts the token at start + i + 1 (wanted while that is a prompt token)
            nxt = range(start + 1, start + n + 1)
            s.prompt_targets = [seq.token_ids[j] if j < seq.num_prompt_tokens else -1 for j in nxt]
        if p.uses_penalties:
            s.prompt_ids = req.prompt_token_ids
            s.output_ids = seq.output_token_ids
        if seq.num_output_tokens < p.min_tokens:
            banned = list(p.stop_token_ids or [])
            if not p.ignore_eos:
                banned += self.eos_token_ids
            s.banned_ids = banned or None
        if req.mm is not None:
            req.mm.fill_step(s, seq, start, n)
        if seq.mm_spans and start < seq.mm_spans[-1][1]:  # encoder outputs over placeholders
            rows = []
            for lo, hi, key in seq.mm_spans:
                a, b = max(lo, start), min(hi, start + n)
                if a < b:
                    rows.append((a - start, self.encoder_cache.entries[key].rows[a - lo : b - lo]))
            s.mm_rows = rows or None
        return s

    def step(self) -> list[RequestOutput]:
        pending, self._pending = self._pending, None
        try:
            outputs = []
            if pending is not None and pending.sync:
                outputs += self._resolve(pending)
                pending = None
            batch = self.scheduler.schedule(exclude=self._certain_to_finish(pending))
            launched = self._launch(batch, pending) if batch.seqs else None
            if pending is not None:
                early = pending.outputs
                outputs += self._resolve(pending) if early is None else early
            if launched is not None:
                if self.async_scheduling and not launched.sync:
                    self._pending = launched
                else:
                    outputs += self._resolve(launched)
            return outputs
        except BaseException:
            self._pending = None
            raise

    def _certain_to_finish(self, pending: _Pending | None) -> set[int]:
        """Sequences whose in-flight token is their last by length: don't schedule them."""
        if pending is None:
            return set()
        done = set()
        for seq, idx in pending.sampled:
            req = self.requests.get(seq.request_id)
            if req is None or seq.is_finished:
                continue
            n_out = idx + 1 - seq.num_prompt_tokens
            max_tokens = req.params.max_tokens
            if (max_tokens is not None and n_out >= max_tokens) or idx + 1 >= self.max_model_len:
                done.add(seq.seq_id)
        return done

    def _run_encoders(self, batch: ScheduledBatch) -> None:
        """The step's encoder work: items its chunks need that the encoder cache lacks."""
        jobs = []
        for seq, key in batch.encoder_items:
            item = self.requests[seq.request_id].mm.item(key)
            jobs.append((item.modality, item.data, self.encoder_cache.entries[key].rows))
        self.runner.encode(jobs)
        for _, key in batch.encoder_items:
            self.encoder_cache.entries[key].ready = True
        self.stats["encoder_items"] += len(jobs)

    def _run_cross_encoders(self, batch: ScheduledBatch) -> None:
        """Encoder-decoder models: requests scheduled for the first time get a slot, and
        their encoders run into it together."""
        new = []
        for seq in batch.seqs:
            mm = self.requests[seq.request_id].mm
            if getattr(mm, "slot", 0) is None and mm not in new:
                if not self._free_slots:  # max_num_seqs <= slots: never, short of a bug
                    raise RuntimeError("no free cross-attention slot for a scheduled request")
                mm.slot = self._free_slots.pop()
                new.append(mm)
        if new:
            self.runner.encode_cross(np.stack([m.features for m in new]), [m.slot for m in new])
            for m in new:
                m.features = None  # the slot holds it now
            self.stats["encoder_items"] += len(new)

    def _launch(self, batch: ScheduledBatch, pending: _Pending | None) -> _Pending:
        if batch.encoder_items:
            self._run_encoders(batch)
        if self.runner.cross_slots:
            self._run_cross_encoders(batch)
        steps = [self._seq_step(seq, n) for seq, n in zip(batch.seqs, batch.num_new_tokens)]
        fill_masks = self._mask_filler(batch, pending)
        # the bookkeeping comes first: the mask fill may resolve `pending` inside dispatch,
        # and that must see this step's placeholders (a sequence that finishes drops them)
        sampled = []
        sync = False
        for row, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            seq.num_computed_tokens += n
            if seq.mm_spans:  # items its prefill has passed: no longer held for it
                self.scheduler.release_items(seq, upto=seq.num_computed_tokens)
            if seq.num_computed_tokens == len(seq):
                sampled.append((seq, len(seq)))
                seq.token_ids.append(-(row + 1))  # filled in by `_resolve`
                sync = sync or self.requests[seq.request_id].params.uses_penalties
        if self.state_snapshots is not None:
            self._restore_states(batch, steps)
        handle = self.runner.dispatch(
            steps, None if pending is None else pending.handle, fill_masks
        )
        if self.state_snapshots is not None:
            self._snapshot_states(batch)
        offsets = itertools.accumulate(batch.num_new_tokens, initial=0)
        prompt_rows = [
            (seq, off, s.start, len(s.prompt_targets))
            for seq, s, off in zip(batch.seqs, steps, offsets)
            if s.prompt_targets
        ]
        return _Pending(batch, handle, sampled, sync, prompt_rows)

    def _restore_states(self, batch: ScheduledBatch, steps: list[SeqStep]) -> None:
        """A sequence's first step after a prefix-cache hit starts from a copy of the state
        snapshot at the end of its cached prefix (hits stop where snapshots do)."""
        G = self.block_manager.block_size
        for seq, s in zip(batch.seqs, steps):
            if s.start == seq.num_cached_tokens > 0:
                snap = self.state_snapshots.get(seq.block_hashes[s.start // G - 1])
                if snap is None:  # admit and this launch are one schedule: never, short of a bug
                    raise RuntimeError("a prefix-cache hit without its state snapshot")
                self.runner.copy_state(snap, s.state_slot)

    def _snapshot_states(self, batch: ScheduledBatch) -> None:
        """Keep the state of sequences whose step ended at their prompt's snapshot point
        (queued after the step on the device)."""
        G = self.block_manager.block_size
        for seq in batch.seqs:
            cut = snapshot_point(seq.num_prompt_tokens, G)
            if cut > seq.num_cached_tokens and seq.num_computed_tokens == cut:
                self.block_manager.register_full_blocks(seq)
                snap = self.state_snapshots.put(seq.block_hashes[cut // G - 1])
                self.runner.copy_state(self.scheduler.state_slots.slot_of(seq.seq_id), snap)

    def _fill_prompt_logprobs(self, pending: _Pending, out) -> None:
        """Prompt logprobs of the chunks this step computed, into their requests."""
        if out.prompt is None:
            return
        lp, rank, top_ids, top_lp = out.prompt
        for seq, off, start, n in pending.prompt_rows:
            req = self.requests.get(seq.request_id)
            if req is None or req.prompt_logprobs is None:
                continue
            k = req.params.prompt_logprobs
            for i in range(n):
                pos = start + i + 1  # the prompt token row off + i predicts
                if pos >= seq.num_prompt_tokens:
                    break
                tid, r = seq.token_ids[pos], off + i
                entry = {tid: Logprob(float(lp[r]), int(rank[r]))}
                for j, (t, tlp) in enumerate(zip(top_ids[r][:k], top_lp[r][:k]), 1):
                    entry.setdefault(int(t), Logprob(float(tlp), j))
                if self.tokenizer is not None:
                    for t, x in entry.items():
                        x.decoded_token = self.tokenizer.decode([t])
                req.prompt_logprobs[pos] = entry

    def _mask_filler(self, batch: ScheduledBatch, pending: _Pending | None):
        """The step's grammar-mask callback (None: no constrained sequence samples in it).

        The runner calls it after launching the step's model, before its sampler. A mask
        needs the previous token of its sequence, which may still be in flight (`pending`):
        the fill resolves that step first, so the host's wait, the matchers' advance and the
        mask computation all overlap this step's model on the device.
        """
        rows = [
            (row, seq)
            for row, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens))
            if "matcher" in seq.data and seq.num_computed_tokens + n == len(seq)
        ]
        if not rows:
            return None

        def fill(bitmask) -> None:
            if pending is not None and pending.outputs is None:
                pending.outputs = self._resolve(pending)
            # a sequence that finished meanwhile keeps an open row: its token is dropped
            live = [(row, seq.data["matcher"]) for row, seq in rows if not seq.is_finished]
            fill_bitmasks(live, bitmask)

        return fill

    def _resolve(self, pending: _Pending) -> list[RequestOutput]:
        out = self.runner.resolve(pending.handle)
        self._fill_prompt_logprobs(pending, out)
        live = []
        for j, (seq, idx) in enumerate(pending.sampled):
            if seq.is_finished or seq.request_id not in self.requests:
                continue  # stopped or aborted while this token was in flight
            seq.token_ids[idx] = int(out.tokens[j])
            live.append((j, seq, idx))
        for seq in pending.batch.seqs:
            if not seq.is_finished:
                self.block_manager.register_full_blocks(seq)
        now = time.monotonic()
        touched: dict[str, Request] = {}
        for j, seq, idx in live:
            req = self.requests[seq.request_id]
            if req.first_token_time is None:
                req.first_token_time = now
                req.num_cached_tokens = seq.num_cached_tokens
            req.last_token_time = now
            self._append_token(req, seq, idx, out, j)
            touched[req.request_id] = req
        outputs = [self._make_output(req) for req in touched.values()]
        for req in touched.values():
            if req.finished:
                self.requests.pop(req.request_id, None)
                self._release(req)
                self.stats["finished"] += 1
        return outputs

    def _append_token(self, req: Request, seq: Sequence, idx: int, out, j: int) -> None:
        """Account for the token now at seq.token_ids[idx] (later ids are placeholders)."""
        p = req.params
        token = seq.token_ids[idx]
        end = idx + 1
        self.stats["generation_tokens"] += 1
        matcher = seq.data.get("matcher")
        if matcher is not None and not matcher.advance(token):
            # only a mask that allowed nothing leads here (e.g. min_tokens banning the EOS a
            # finished grammar needs): end the sequence rather than emit invalid output
            del seq.token_ids[idx:]
            self.scheduler.finish(seq, "stop", None)
            return
        if seq.data["logprobs"] is not None:
            lp = float(out.logprobs[j])
            seq.data["cum_logprob"] += lp
            entry = {token: Logprob(lp, int(out.ranks[j]))}
            if p.logprobs and out.top_ids is not None:
                for tid, tlp in zip(
                    out.top_ids[j][: p.logprobs], out.top_logprobs[j][: p.logprobs]
                ):
                    tid = int(tid)
                    if tid not in entry:
                        entry[tid] = Logprob(float(tlp), None)
                for rank, tid in enumerate(out.top_ids[j][: p.logprobs], 1):
                    entry[int(tid)].rank = rank if int(tid) != token else entry[int(tid)].rank
            if self.tokenizer is not None:
                for tid, lpo in entry.items():
                    lpo.decoded_token = self.tokenizer.decode([tid])
            seq.data["logprobs"].append(entry)

        n_out = end - seq.num_prompt_tokens
        reason, stop_reason = None, None
        can_stop = n_out >= p.min_tokens
        if can_stop and p.stop_token_ids and token in p.stop_token_ids:
            reason, stop_reason = "stop", token
        elif can_stop and not p.ignore_eos and token in self.eos_token_ids:
            reason = "stop"
        if self.tokenizer is not None and reason is None:
            st = seq.data["detok"]
            delta = detokenize_incrementally(
                self.tokenizer, seq.token_ids, st, p.skip_special_tokens, end
            )
            if p.stop_strings and delta and can_stop:
                hit = find_stop_string(st.text, len(delta), p.stop_strings)
                if hit is not None:
                    stop, idx = hit
                    st.text = (
                        st.text[: idx + len(stop)]
                        if p.include_stop_str_in_output
                        else st.text[:idx]
                    )
                    reason, stop_reason = "stop", stop
        if reason is None:
            if p.max_tokens is not None and n_out >= p.max_tokens:
                reason = "length"
            elif end >= self.max_model_len:
                reason = "length"
        if reason is not None:
            del seq.token_ids[end:]  # the next step's placeholder, if one was launched
            self.scheduler.finish(seq, reason, stop_reason)

    def _make_output(self, req: Request) -> RequestOutput:
        outs = []
        for seq in req.seqs:
            lps = seq.data["logprobs"]
            outs.append(
                CompletionOutput(
                    index=seq.index,
                    text=seq.data["detok"].text,
                    token_ids=seq.resolved_output_ids,
                    cumulative_logprob=seq.data["cum_logprob"] if lps is not None else None,
                    logprobs=list(lps) if lps is not None else None,
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                )
            )
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            outputs=outs,
            finished=req.finished,
            prompt_logprobs=req.prompt_logprobs,
            num_cached_tokens=req.num_cached_tokens,
            metrics={
                "arrival_time": req.arrival_time,
                "first_token_time": req.first_token_time,
                "last_token_time": req.last_token_time,
            },
        )

    def get_stats(self) -> dict:
        bm = self.block_manager
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "kv_cache_usage": bm.usage,
            "prefix_cache_queries": bm.prefix_queries,
            "prefix_cache_hits": bm.prefix_hits,
            "prefix_cache_hit_rate": bm.hit_rate,
            "num_preemptions": self.scheduler.num_preemptions,
            **self.stats,
        }
