"""GenerativePoolingEngine: embeddings from a generative (vision-language) model's hidden states.

`LLM(model, runner="pooling")` on a checkpoint such as Qwen2-VL serves it the way DSE-Qwen2
is served: one vector per prompt, the final hidden state (after the model's last norm) of
its last token, L2-normalised. The pooling type comes from the checkpoint's
sentence-transformers files where present, else LAST; `pooler_config` overrides it.

The forward is the generative engine's own. An `LLMEngine` is built with the model told
(the HF-config attribute `POOLING_HIDDEN_ATTR`, through hf_overrides) to return hidden
states where it returns logits, so the runner's compiled step, the multimodal front end
(media, chat parts, placeholder expansion, M-RoPE positions) and the encoder stage (its
encoder cache, kept across calls) serve embeddings unchanged. What this engine adds is a
prefill-only loop over that engine's runner:
1. Prompts (text, token ids, multimodal dicts, chat conversations) are prepared by the
   LLMEngine's front ends into token ids + a `MultimodalRequest`.
2. Consecutive prompts are packed into steps of at most max_num_batched_tokens tokens and
   max_num_seqs sequences; a longer prompt runs alone over several chunks.
3. A step's items are encoded into the runner's encoder cache (items already there are
   reused); `runner.logits` runs the step and returns each sequence's last-token row: the
   hidden state wanted (CLS: the first chunk of each prompt is its first token alone).
4. KV pages: nothing else runs on this LLMEngine, so a step's sequences take the pool's
   first pages; the scheduler and block manager stay idle.
MEAN and MAX pooling need every token's hidden state and are refused.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import threading

import numpy as np

from jaxmm.config import EngineConfig
from jaxmm.engine.llm_engine import LLMEngine
from jaxmm.engine.prompts import check_prompt_ids
from jaxmm.outputs import EmbeddingOutput, EmbeddingRequestOutput
from jaxmm.pooling import (
    POOLING_HIDDEN_ATTR,
    PoolingParams,
    load_pooler_config,
    override_pooler_config,
)
from jaxmm.runner.model_runner import SeqStep

SUPPORTED = "Qwen2-VL, Qwen2.5-VL and Qwen3-VL checkpoints"


@dataclasses.dataclass
class EmbedPrompt:
    """A prepared prompt: token ids (placeholders expanded) and its multimodal items."""

    ids: list[int]
    mm: object | None = None  # jaxmm.multimodal.inputs.MultimodalRequest


class GenerativePoolingEngine:
    supports_embeddings = True

    def __init__(self, config: EngineConfig):
        self.config = config
        mc = config.model
        path = mc.model
        pooler = load_pooler_config(path if os.path.isdir(path) else None, "LAST")
        self.pooler_config = override_pooler_config(pooler, mc.pooler_config)
        if self.pooler_config.pooling_type not in ("LAST", "CLS"):
            raise ValueError(
                f"pooling type {self.pooler_config.pooling_type} needs every token's hidden "
                "state; a generative model served with runner='pooling' pools the LAST (or "
                "CLS) token: set pooler_config={'pooling_type': 'LAST'}"
            )
        overrides = {**mc.hf_overrides, POOLING_HIDDEN_ATTR: True}
        inner = dataclasses.replace(
            config, model=dataclasses.replace(mc, hf_overrides=overrides), warmup=False
        )
        self.engine = LLMEngine(inner)
        self.runner = self.engine.runner
        model = self.runner.model_obj
        if not getattr(model, "returns_hidden", False):
            arch = (getattr(self.engine.hf_config, "architectures", None) or ["?"])[0]
            raise ValueError(
                f"runner='pooling' does not support {arch}: embeddings from a generative "
                f"model's hidden states are served for {SUPPORTED}; encoder-only embedding "
                "models (BertModel, ...) are pooling models by themselves"
            )
        self.checkpoint = self.engine.checkpoint
        self.hf_config = self.engine.hf_config
        self.tokenizer = self.engine.tokenizer
        self.max_model_len = self.engine.max_model_len
        self.embedding_dim = self.runner.hidden_size
        self.is_multimodal = self.engine.is_multimodal
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self.stats = {"num_requests": 0, "prompt_tokens": 0, "encoder_items": 0}

    # -- input ------------------------------------------------------------------------------
    def tokenize(self, prompt) -> list[int]:
        """A str, {'prompt': str} or {'prompt_token_ids': [...]} -> token ids."""
        return self.engine.tokenize(prompt)[1]

    def prepare(self, prompt) -> EmbedPrompt:
        """Any prompt `LLM.generate` takes (multimodal dicts included) -> an EmbedPrompt."""
        from jaxmm.multimodal.audio_inputs import is_audio_prompt

        if isinstance(prompt, dict) and (prompt.get("multi_modal_data") or is_audio_prompt(prompt)):
            from jaxmm.multimodal.inputs import prepare_multimodal_prompt

            _, ids, mm = prepare_multimodal_prompt(self.engine, prompt)
            return EmbedPrompt(list(ids), mm)
        return EmbedPrompt(self.tokenize(prompt))

    def prepare_chat(self, messages: list[dict], **kwargs) -> EmbedPrompt:
        """Chat messages (content parts with media too) rendered through the chat template
        (kwargs: chat_template, add_generation_prompt, continue_final_message,
        chat_template_kwargs) -> an EmbedPrompt."""
        from jaxmm.multimodal.chat import conversation_to_prompt

        return self.prepare(conversation_to_prompt(self.engine, messages, **kwargs))

    def validate(self, ids: list[int], params: PoolingParams) -> None:
        if not isinstance(params, PoolingParams):
            raise TypeError(f"expected PoolingParams, got {type(params).__name__}")
        if params.dimensions is not None and params.dimensions != self.embedding_dim:
            raise ValueError(
                f"dimensions={params.dimensions} is not supported: this model's embeddings "
                f"have {self.embedding_dim} dimensions and it was not trained for others "
                "(no Matryoshka truncation)"
            )
        check_prompt_ids(ids, self.max_model_len, self.runner.vocab_size)

    # -- the forward ------------------------------------------------------------------------
    def embed(
        self, prompts: list, params: list[PoolingParams], progress=None
    ) -> list[EmbeddingRequestOutput]:
        """EmbedPrompts (or token-id lists) -> one EmbeddingRequestOutput each, in order."""
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} PoolingParams for {len(prompts)} prompts")
        prepared = [p if isinstance(p, EmbedPrompt) else EmbedPrompt(list(p)) for p in prompts]
        for p, sp in zip(prepared, params):
            self.validate(p.ids, sp)
        with self._lock:  # one forward at a time: the pages and encoder rows are shared
            vectors = self._run(prepared, progress)
            rids = [str(next(self._ids)) for _ in prepared]
            self.stats["num_requests"] += len(prepared)
            self.stats["prompt_tokens"] += sum(len(p.ids) for p in prepared)
        outs = []
        for rid, p, sp, v in zip(rids, prepared, params, vectors):
            normalize = self.pooler_config.normalize if sp.normalize is None else sp.normalize
            if normalize:  # torch's F.normalize: v / max(||v||, 1e-12)
                v = v / max(float(np.linalg.norm(v)), 1e-12)
            outs.append(EmbeddingRequestOutput(rid, list(p.ids), EmbeddingOutput(v.tolist())))
        return outs

    def _pages(self, n: int) -> int:
        """Pages a prompt of n tokens takes: a table of its length per page group (models
        with sliding-window layers page them in groups, block_manager.py)."""
        return -(-n // self.runner.block_size) * len(self.runner.kv_group_windows)

    def _item_blocks(self, p: EmbedPrompt) -> int:
        cache = self.engine.encoder_cache
        items = p.mm.items if p.mm is not None else ()
        return sum(cache.blocks_for(it.end - it.start) for it in items)

    def _run(self, prompts: list[EmbedPrompt], progress=None) -> np.ndarray:
        """Pack consecutive prompts into groups that one step holds (a long prompt alone)."""
        r = self.runner
        budget, cache = r.max_num_batched_tokens, self.engine.encoder_cache
        out = np.zeros((len(prompts), self.embedding_dim), np.float32)
        i = 0
        while i < len(prompts):
            group = [i]
            tokens, pages = len(prompts[i].ids), self._pages(len(prompts[i].ids))
            blocks = self._item_blocks(prompts[i]) if cache is not None else 0
            if cache is not None and blocks > cache.num_blocks:
                raise ValueError(
                    f"prompt {i}'s media take {blocks * cache.block_rows} encoder rows, more "
                    f"than the encoder cache's {cache.num_rows}: send fewer or smaller items"
                )
            j = i + 1
            while tokens <= budget and j < len(prompts) and len(group) < r.max_num_seqs:
                p = prompts[j]
                more = self._item_blocks(p) if cache is not None else 0
                if (
                    tokens + len(p.ids) > budget
                    or pages + self._pages(len(p.ids)) > r.num_pages
                    or (cache is not None and blocks + more > cache.num_blocks)
                ):
                    break
                group.append(j)
                tokens, pages, blocks = (
                    tokens + len(p.ids),
                    pages + self._pages(len(p.ids)),
                    blocks + more,
                )
                j += 1
            out[group] = self._run_group([prompts[k] for k in group])
            if progress is not None:
                progress(len(group))
            i = j
        return out

    def _run_group(self, group: list[EmbedPrompt]) -> np.ndarray:
        r = self.runner
        cls = self.pooler_config.pooling_type == "CLS"
        owner = object()  # holds this group's items in the encoder cache
        held: list[str] = []
        try:
            rows_of = self._encode(group, owner, held)
            # each prompt's chunks: [0, 1) first for CLS, then pieces of the token budget
            plans, cursor = [], 0
            for p in group:
                L = len(p.ids)
                bounds = [0, 1] if cls and L > 1 else [0]
                while bounds[-1] < L:
                    bounds.append(min(bounds[-1] + r.max_num_batched_tokens, L))
                n = -(-L // r.block_size)
                tables = [
                    list(range(cursor + g * n, cursor + (g + 1) * n))
                    for g in range(len(r.kv_group_windows))
                ]
                cursor += self._pages(L)
                plans.append((bounds, tables))
            out = np.zeros((len(group), self.embedding_dim), np.float32)
            for k in range(max(len(b) for b, _ in plans) - 1):
                steps, who = [], []
                for g, (p, (bounds, tables)) in enumerate(zip(group, plans)):
                    if k + 1 < len(bounds):
                        a, b = bounds[k], bounds[k + 1]
                        steps.append(self._step(p, a, b, tables, rows_of))
                        who.append((g, b == (1 if cls else len(p.ids))))
                hidden = r.logits(steps)  # (S, D): each chunk's last-token hidden state
                for row, (g, wanted) in enumerate(who):
                    if wanted:
                        out[g] = hidden[row]
            return out
        finally:
            for key in held:
                self.engine.encoder_cache.release(key, owner)

    def _encode(self, group: list[EmbedPrompt], owner, held: list[str]) -> dict:
        """Encoder-cache rows of every item in the group, encoding the ones not cached."""
        cache = self.engine.encoder_cache
        rows_of, jobs, new = {}, [], []
        for p in group:
            for it in p.mm.items if p.mm is not None else ():
                key = it.cache_key
                entry = cache.get(key)
                if entry is None:
                    entry = cache.allocate(key, it.end - it.start, owner)
                    jobs.append((it.modality, it.data, entry.rows))
                    new.append(entry)
                else:
                    cache.acquire(key, owner)
                held.append(key)
                rows_of[key] = entry.rows
        if jobs:
            self.runner.encode(jobs)
            for entry in new:
                entry.ready = True
            self.stats["encoder_items"] += len(jobs)
        return rows_of

    @staticmethod
    def _step(p: EmbedPrompt, a: int, b: int, tables: list[list[int]], rows_of: dict) -> SeqStep:
        step = SeqStep(p.ids[a:b], a, tables[0], sample=True, group_tables=tables[1:] or None)
        if p.mm is not None:
            p.mm.fill_step(step, None, a, b - a)
            rows = []
            for it in p.mm.items:
                lo, hi = max(it.start, a), min(it.end, b)
                if lo < hi:
                    rows.append((lo - a, rows_of[it.cache_key][lo - it.start : hi - it.start]))
            step.mm_rows = rows or None
        return step

    def get_stats(self) -> dict:
        return dict(self.stats)
