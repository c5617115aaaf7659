"""`jaxmm.LLM`: the offline API, shaped like vLLM's so its code runs with an import change."""

from __future__ import annotations

import inspect
import itertools
import logging
import textwrap
import time
import weakref
from collections.abc import Sequence as Seq
from typing import Any

from jaxmm.config import EngineConfig, arg_default, check_engine_args, engine_args
from jaxmm.config import engine_config as _engine_config
from jaxmm.engine.llm_engine import LLMEngine
from jaxmm.engine.pooling_engine import NOT_GENERATIVE, PoolingEngine, make_pooling_engine
from jaxmm.outputs import EmbeddingRequestOutput, RequestOutput
from jaxmm.pooling import PoolingParams
from jaxmm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class LLM:
    """An LLM over a local checkpoint (HF directory or GGUF file).

    Arguments mirror vLLM's `LLM` and are declared once, with their help, in jaxmm/config.py
    (the list below is generated from there); on CPU, where there is no accelerator memory
    to measure, `kv_cache_memory_bytes` sets the KV cache budget (default 1 GiB).
    """

    def __init__(self, model: str | None = None, **kwargs: Any):
        # the accepted names and their defaults are the config dataclasses' (jaxmm/config.py)
        check_engine_args(kwargs, "LLM()")
        config = engine_config(model=model, **kwargs)
        self.config = config
        if config.model.trust_remote_code:
            logger.info(
                "trust_remote_code has no effect: jaxmm never fetches or runs code from a "
                "checkpoint; every architecture it serves is implemented in jaxmm itself"
            )
        self._sampling_defaults = config.model.sampling_defaults()
        if self._sampling_defaults:
            logger.info(
                "default sampling parameters from the generation config: %s (generation_config="
                "'vllm' ignores them)",
                self._sampling_defaults,
            )
        model = config.model.model
        self.llm_engine: LLMEngine | None = None
        self.pooling_engine = None
        # data parallelism: replicas in engine processes of their own, one client over them
        self.dp_engine = None
        if config.data_parallel_size > 1:
            from jaxmm.engine.data_parallel import DataParallelEngine

            self.dp_engine = DataParallelEngine(config)
            self._dp_ids = itertools.count()
            weakref.finalize(self, self.dp_engine.shutdown)
            return
        # an encoder-only pooling model (BertModel, ...), or runner="pooling", gets a pooling
        # engine instead
        self.pooling_engine = make_pooling_engine(config)
        if self.pooling_engine is None:
            from jaxmm.distributed import build_engine, stop_followers, wants_distributed

            self.llm_engine = build_engine(config)
            if wants_distributed(config.parallel):  # the leader: followers stop with it
                weakref.finalize(self, stop_followers, self.llm_engine)

    # -- helpers ------------------------------------------------------------------------------
    def get_tokenizer(self):
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """vLLM's: the SamplingParams the checkpoint's generation_config.json recommends
        (temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens as max_tokens)
        when `generation_config` is 'auto' or a path; SamplingParams() for 'vllm' or when
        the checkpoint has none."""
        return SamplingParams(**self._sampling_defaults)

    def reset_prefix_cache(self) -> bool:
        """Drop every cached prefix page that no running request holds, so the next prompts
        are computed from scratch (vLLM's); True once done. A pooling model keeps no prefix
        cache: nothing to drop."""
        if self.dp_engine is not None:  # every replica's own prefix cache
            from jaxmm.engine.data_parallel import reset_prefix_cache

            return all(self.dp_engine.call(reset_prefix_cache))
        if self.llm_engine is None:
            return True
        return bool(self.llm_engine.reset_prefix_cache())

    @property
    def engine(self) -> LLMEngine | PoolingEngine:
        if self.dp_engine is not None:  # the replicas' front end: tokenizer and configs
            return self.dp_engine.engine
        return self.llm_engine if self.llm_engine is not None else self.pooling_engine

    def shutdown(self) -> None:
        """Stop the data-parallel replicas' processes, or a multi-host leader's followers
        (nothing to do otherwise)."""
        if self.dp_engine is not None:
            self.dp_engine.shutdown()
        if self.llm_engine is not None:
            from jaxmm.distributed import stop_followers

            stop_followers(self.llm_engine)

    def _generative_engine(self) -> LLMEngine:
        if self.llm_engine is None:
            raise ValueError(NOT_GENERATIVE)
        return self.llm_engine

    def _run(
        self, prompts: list, params: list[SamplingParams], use_tqdm: bool
    ) -> list[RequestOutput]:
        if self.dp_engine is not None:
            return self._run_data_parallel(prompts, params)
        engine = self._generative_engine()
        # validate every prompt before queueing any, so a bad one leaves nothing half-done
        prepared = self._prepare_all(prompts)
        for (_, ids, _), sp in zip(prepared, params):
            engine.validate(ids, sp)
        order = []
        for (text, ids, mm), sp in zip(prepared, params):
            rid = engine.next_request_id()
            engine.add_request(rid, text, sp, prompt_ids=ids, mm=mm)
            order.append(rid)
        results: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(order), desc="Processed prompts", dynamic_ncols=True)
        start = time.perf_counter()
        out_tokens = 0
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        results[out.request_id] = out
                        out_tokens += sum(len(o.token_ids) for o in out.outputs)
                        if bar is not None:
                            bar.update(1)
                            elapsed = time.perf_counter() - start
                            bar.set_postfix_str(
                                f"output: {out_tokens / max(elapsed, 1e-9):.1f} toks/s"
                            )
        except BaseException:
            engine.abort_request(order)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [results[r] for r in order]

    def _run_data_parallel(self, prompts: list, params: list[SamplingParams]) -> list:
        from jaxmm.engine.data_parallel import run_to_completion
        from jaxmm.multimodal.audio_inputs import is_audio_prompt

        front = self.dp_engine.engine
        requests = []
        for p in prompts:
            if is_audio_prompt(p) or (isinstance(p, dict) and p.get("multi_modal_data")):
                raise ValueError(
                    "LLM(data_parallel_size > 1) takes text and token-id prompts; serve "
                    "multimodal prompts with `jaxmm serve --data-parallel-size`"
                )
            requests.append(front.tokenize(p))
        ids = [str(next(self._dp_ids)) for _ in requests]
        return run_to_completion(self.dp_engine, ids, requests, params)

    def _prepare_all(self, prompts: list) -> list:
        """`_prepare` of each prompt; the media of image/video prompts are prepared together
        (in parallel, where the front end has worker processes)."""
        from jaxmm.multimodal.audio_inputs import is_audio_prompt

        def media(p) -> bool:
            return (
                isinstance(p, dict) and bool(p.get("multi_modal_data")) and not is_audio_prompt(p)
            )

        if sum(map(media, prompts)) < 2:
            return [self._prepare(p) for p in prompts]
        fe = self._generative_engine().mm_frontend()
        started = {i: fe.start(p) for i, p in enumerate(prompts) if media(p)}
        return [
            fe.finish(started[i]) if i in started else self._prepare(p)
            for i, p in enumerate(prompts)
        ]

    def _prepare(self, prompt):
        engine = self._generative_engine()
        from jaxmm.multimodal.audio_inputs import is_audio_prompt

        if is_audio_prompt(prompt) or (isinstance(prompt, dict) and prompt.get("multi_modal_data")):
            from jaxmm.multimodal.inputs import prepare_multimodal_prompt

            return prepare_multimodal_prompt(engine, prompt)
        text, ids = engine.tokenize(prompt)
        return text, ids, None

    # -- public API ---------------------------------------------------------------------------
    def generate(
        self,
        prompts,
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if prompts and all(isinstance(t, int) for t in prompts):
            raise TypeError("pass token ids as {'prompt_token_ids': [...]}")
        params = _broadcast_params(sampling_params, len(prompts))
        return self._run(prompts, params, use_tqdm)

    def chat(
        self,
        messages,
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict | None = None,
        tools: list | None = None,
    ) -> list[RequestOutput]:
        """One conversation (a list of messages) or a list of conversations."""
        # the template is rendered here; with data-parallel replicas, by their front end
        front = self.dp_engine.engine if self.dp_engine is not None else self._generative_engine()
        if not messages:
            raise ValueError("messages must not be empty")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        prompts = []
        from jaxmm.multimodal.chat import conversation_to_prompt

        for conv in conversations:
            prompts.append(
                conversation_to_prompt(
                    front,
                    conv,
                    chat_template=chat_template,
                    add_generation_prompt=add_generation_prompt,
                    continue_final_message=continue_final_message,
                    chat_template_kwargs=chat_template_kwargs,
                    tools=tools,
                )
            )
        params = _broadcast_params(sampling_params, len(prompts))
        return self._run(prompts, params, use_tqdm)

    def transcribe(self, audio, sample_rate: int, language: str | None = "en", **kwargs) -> str:
        """Speech to text with a Whisper checkpoint; audio longer than 30 s is split."""
        from jaxmm.transcribe import transcribe

        return transcribe(self, audio, sample_rate, language=language, **kwargs)

    def embed(
        self,
        prompts,
        pooling_params: PoolingParams | Seq[PoolingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[EmbeddingRequestOutput]:
        """One embedding per prompt (`out.outputs.embedding`), for pooling models: an
        embedding checkpoint, or a vision-language one under runner="pooling" (prompts may
        then carry multi_modal_data, as for generate)."""
        engine = self.pooling_engine
        if engine is None:
            raise ValueError(
                "this is a generative model; embed() needs a pooling (embedding) model such "
                "as a BertModel / sentence-transformers checkpoint, or a vision-language "
                "model started with runner='pooling'"
            )
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        ids = [engine.prepare(p) for p in prompts]
        params = _broadcast_params(pooling_params, len(ids), PoolingParams)
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(ids), desc="Processed prompts", dynamic_ncols=True)
        try:
            return engine.embed(ids, params, progress=bar.update if bar is not None else None)
        finally:
            if bar is not None:
                bar.close()


def engine_config(**kwargs: Any) -> EngineConfig:
    """The EngineConfig that `LLM(**kwargs)` builds: the same arguments and defaults (the
    server hands it to an engine in another process). No model: the embedded default."""
    if kwargs.get("model") is None:
        from jaxmm.default_model import default_model_path

        kwargs["model"] = default_model_path()
    return _engine_config(**kwargs)


def _llm_signature() -> inspect.Signature:
    """LLM.__init__'s signature as `help()` and `inspect` show it: model, then every engine
    argument keyword-only with its declared default."""
    P = inspect.Parameter
    params = [
        P("self", P.POSITIONAL_OR_KEYWORD),
        P("model", P.POSITIONAL_OR_KEYWORD, default=None, annotation="str | None"),
    ]
    for name, f in engine_args().items():
        if name != "model":
            params.append(P(name, P.KEYWORD_ONLY, default=arg_default(f), annotation=f.type))
    return inspect.Signature(params)


def _llm_doc(head: str) -> str:
    lines = [inspect.cleandoc(head), "", "Args (all but `model` keyword-only):"]
    for name, f in engine_args().items():
        default = "the embedded default model" if name == "model" else repr(arg_default(f))
        text = f"{name} ({f.type}, default {default}): {f.metadata['help']}"
        lines += textwrap.wrap(text, 92, initial_indent="    ", subsequent_indent="        ")
    return "\n".join(lines)


LLM.__init__.__signature__ = _llm_signature()
LLM.__doc__ = _llm_doc(LLM.__doc__ or "")


def _broadcast_params(params, n: int, cls=SamplingParams) -> list:
    if params is None:
        return [cls() for _ in range(n)]
    if isinstance(params, cls):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"got {len(params)} {cls.__name__} for {n} prompts")
    return params
