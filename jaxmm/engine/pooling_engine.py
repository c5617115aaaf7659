"""PoolingEngine: prompts in, one embedding per prompt out, for encoder-only pooling models.

There is no scheduler, KV cache or decode loop: a batch of prompts is tokenized, validated
(all of them before any work), run through the PoolingRunner in length-sorted buckets, and
each vector is L2-normalised if its PoolingParams (or the model's default) asks for it.

`embed` holds a lock for the whole forward, so callers on several threads (the server's
pool) run one batch at a time; `PoolingClient` is the server's EngineClient for such a
model: it has no engine thread, and refuses generation requests.
"""

from __future__ import annotations

import itertools
import json
import os
import threading

import numpy as np

from jaxmm.config import EngineConfig
from jaxmm.engine.async_engine import EngineView
from jaxmm.engine.prompts import check_prompt_ids, tokenize_prompt
from jaxmm.models.registry import is_pooling_architecture
from jaxmm.outputs import EmbeddingOutput, EmbeddingRequestOutput
from jaxmm.pooling import PoolingParams, load_pooler_config, override_pooler_config
from jaxmm.runner.checkpoint import load_tokenizer, open_checkpoint
from jaxmm.runner.model_runner import enable_compilation_cache
from jaxmm.runner.pooling_runner import PoolingRunner

NOT_GENERATIVE = "this is an embedding model; use embed() (or /v1/embeddings)"


def make_pooling_engine(config: EngineConfig):
    """The pooling engine `config` asks for, or None for a generative engine: encoder-only
    embedding checkpoints always pool; a generative one pools with runner='pooling' (its
    last-token hidden states, `jaxmm.engine.hidden_pooling`)."""
    mc = config.model
    if is_pooling_checkpoint(mc.model):
        if mc.runner == "generate":
            raise ValueError(
                "this checkpoint is an encoder-only embedding model: it cannot generate text "
                "(use runner='pooling' or 'auto')"
            )
        return PoolingEngine(config)
    if mc.runner == "pooling":
        from jaxmm.engine.hidden_pooling import GenerativePoolingEngine

        return GenerativePoolingEngine(config)
    return None


def is_pooling_checkpoint(model: str) -> bool:
    """Whether the HF checkpoint directory `model` holds a pooling architecture (cheap: reads
    config.json only; GGUF files and anything unreadable count as generative)."""
    path = os.path.join(model, "config.json")
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as f:
        archs = json.load(f).get("architectures") or [None]
    return is_pooling_architecture(archs[0])


class PoolingEngine:
    supports_embeddings = True

    def __init__(self, config: EngineConfig):
        self.config = config
        enable_compilation_cache(config.compilation_cache_dir)
        mc = config.model
        ck = open_checkpoint(mc.model, mc.load_format, mc.hf_overrides)
        self.checkpoint = ck
        self.hf_config = ck.hf_config
        self.tokenizer = None if mc.skip_tokenizer_init else load_tokenizer(ck, mc.tokenizer)
        self.pooler_config = override_pooler_config(
            load_pooler_config(ck.path if os.path.isdir(ck.path) else None), mc.pooler_config
        )
        # sentence-transformers truncates at max_seq_length; we refuse longer prompts instead
        max_len = mc.max_model_len or self.pooler_config.max_seq_length
        self.runner = PoolingRunner(
            ck,
            self.pooler_config.pooling_type,
            dtype=mc.dtype,
            max_model_len=max_len,
            max_num_seqs=config.scheduler.max_num_seqs,
            max_num_batched_tokens=config.scheduler.max_num_batched_tokens,
            tensor_parallel_size=config.tensor_parallel_size,
            load_format=mc.load_format,
        )
        self.max_model_len = self.runner.max_model_len
        self.embedding_dim = self.runner.hidden_size
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self.stats = {"num_requests": 0, "prompt_tokens": 0}
        if config.warmup:
            self.runner.warmup()

    # -- input ------------------------------------------------------------------------------
    def tokenize(self, prompt) -> list[int]:
        """A str, {'prompt': str} or {'prompt_token_ids': [...]} -> token ids."""
        return tokenize_prompt(prompt, self.tokenizer)[1]

    def prepare(self, prompt) -> list[int]:
        """A text prompt (as `tokenize` takes it) -> token ids; media are refused."""
        if isinstance(prompt, dict) and prompt.get("multi_modal_data"):
            raise ValueError("this embedding model is text-only: it takes no multi_modal_data")
        return self.tokenize(prompt)

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
        self, prompt_ids: list[list[int]], params: list[PoolingParams], progress=None
    ) -> list[EmbeddingRequestOutput]:
        """Token-id prompts -> one EmbeddingRequestOutput each, in order (thread-safe)."""
        if len(params) != len(prompt_ids):
            raise ValueError(f"got {len(params)} PoolingParams for {len(prompt_ids)} prompts")
        for ids, p in zip(prompt_ids, params):
            self.validate(ids, p)
        with self._lock:  # one forward at a time; also guards the request-id counter
            vectors = self.runner.embed(prompt_ids, progress)
            rids = [str(next(self._ids)) for _ in prompt_ids]
            self.stats["num_requests"] += len(prompt_ids)
            self.stats["prompt_tokens"] += sum(len(ids) for ids in prompt_ids)
        outs = []
        for rid, ids, p, v in zip(rids, prompt_ids, params, vectors):
            normalize = self.pooler_config.normalize if p.normalize is None else p.normalize
            if normalize:  # torch's F.normalize: v / max(||v||, 1e-12)
                v = v / max(float(np.linalg.norm(v)), 1e-12)
            outs.append(EmbeddingRequestOutput(rid, list(ids), EmbeddingOutput(v.tolist())))
        return outs

    def get_stats(self) -> dict:
        return dict(self.stats)


class PoolingClient(EngineView):
    """The server's EngineClient over a PoolingEngine: no engine thread to start or stop;
    /v1/embeddings calls `engine.embed` from the server's thread pool."""

    def __init__(self, engine: PoolingEngine):
        self.engine = engine

    @property
    def is_running(self) -> bool:
        return True

    async def add_request(self, request_id, prompt, params, **kwargs):
        raise ValueError(NOT_GENERATIVE)

    def abort(self, request_id) -> None:
        pass

    def get_stats(self) -> dict:
        return self.engine.get_stats()

    def shutdown(self) -> None:
        pass
