"""`jaxmm.LLM`: the offline API, shaped like vLLM's so its code runs with an import change."""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence as Seq

from jaxmm.config import CacheConfig, EngineConfig, ModelConfig, MultimodalConfig, SchedulerConfig
from jaxmm.engine.llm_engine import LLMEngine
from jaxmm.engine.pooling_engine import NOT_GENERATIVE, PoolingEngine, is_pooling_checkpoint
from jaxmm.outputs import EmbeddingRequestOutput, RequestOutput
from jaxmm.pooling import PoolingParams
from jaxmm.sampling_params import SamplingParams


class LLM:
    """An LLM over a local checkpoint (HF directory or GGUF file).

    Args mirror vLLM's `LLM`; on CPU, where there is no accelerator memory to measure,
    `kv_cache_memory_bytes` sets the KV cache budget (default 1 GiB).
    """

    def __init__(
        self,
        model: str | None = None,
        tokenizer: str | None = None,
        dtype: str = "auto",
        max_model_len: int | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int | None = None,
        block_size: int = 16,
        gpu_memory_utilization: float = 0.9,
        kv_cache_memory_bytes: int | None = None,
        num_gpu_blocks_override: int | None = None,
        enable_prefix_caching: bool = True,
        seed: int = 0,
        skip_tokenizer_init: bool = False,
        compilation_cache_dir: str | None = None,
        warmup: bool = False,
        attention_backend: str = "auto",
        tensor_parallel_size: int = 1,
        limit_mm_per_prompt: dict | None = None,
        enable_mm_embeds: bool = False,
        media_io_kwargs: dict | None = None,
        allowed_local_media_path: str | None = None,
        allowed_media_domains: list[str] | None = None,
        mm_processor_kwargs: dict | None = None,
        trust_remote_code: bool = False,
        load_format: str = "auto",
        async_scheduling: bool = True,
    ):
        args = {k: v for k, v in locals().items() if k != "self"}
        config = _engine_config(**args)
        model = config.model.model
        # an encoder-only pooling model (BertModel, ...) gets the PoolingEngine instead
        self.llm_engine: LLMEngine | None = None
        self.pooling_engine: PoolingEngine | None = None
        if is_pooling_checkpoint(model):
            self.pooling_engine = PoolingEngine(config)
        else:
            self.llm_engine = LLMEngine(config)

    # -- helpers ------------------------------------------------------------------------------
    def get_tokenizer(self):
        return self.engine.tokenizer

    @property
    def engine(self) -> LLMEngine | PoolingEngine:
        return self.llm_engine if self.llm_engine is not None else self.pooling_engine

    def _generative_engine(self) -> LLMEngine:
        if self.llm_engine is None:
            raise ValueError(NOT_GENERATIVE)
        return self.llm_engine

    def _run(
        self, prompts: list, params: list[SamplingParams], use_tqdm: bool
    ) -> list[RequestOutput]:
        engine = self._generative_engine()
        # validate every prompt before queueing any, so a bad one leaves nothing half-done
        prepared = [self._prepare(p) for p in prompts]
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
        self._generative_engine()
        if not messages:
            raise ValueError("messages must not be empty")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        prompts = []
        from jaxmm.multimodal.chat import conversation_to_prompt

        for conv in conversations:
            prompts.append(
                conversation_to_prompt(
                    self.llm_engine,
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
        """One embedding per prompt (`out.outputs.embedding`), for pooling models."""
        engine = self.pooling_engine
        if engine is None:
            raise ValueError(
                "this is a generative model; embed() needs a pooling (embedding) model such "
                "as a BertModel / sentence-transformers checkpoint"
            )
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        ids = [engine.tokenize(p) for p in prompts]
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


def engine_config(**kwargs) -> EngineConfig:
    """The EngineConfig that `LLM(**kwargs)` builds: the same arguments and defaults (the
    server hands it to an engine in another process)."""
    bound = inspect.signature(LLM.__init__).bind(None, **kwargs)
    bound.apply_defaults()
    args = dict(bound.arguments)
    del args["self"]
    return _engine_config(**args)


def _engine_config(
    *,
    model,
    tokenizer,
    dtype,
    max_model_len,
    max_num_seqs,
    max_num_batched_tokens,
    block_size,
    gpu_memory_utilization,
    kv_cache_memory_bytes,
    num_gpu_blocks_override,
    enable_prefix_caching,
    seed,
    skip_tokenizer_init,
    compilation_cache_dir,
    warmup,
    attention_backend,
    tensor_parallel_size,
    limit_mm_per_prompt,
    enable_mm_embeds,
    media_io_kwargs,
    allowed_local_media_path,
    allowed_media_domains,
    mm_processor_kwargs,
    trust_remote_code,
    load_format,
    async_scheduling,
) -> EngineConfig:
    del trust_remote_code  # nothing is executed from checkpoints
    if model is None:
        from jaxmm.default_model import default_model_path

        model = default_model_path()
    return EngineConfig(
        model=ModelConfig(
            model=model,
            tokenizer=tokenizer,
            dtype=dtype,
            max_model_len=max_model_len,
            skip_tokenizer_init=skip_tokenizer_init,
            attention_backend=attention_backend,
            load_format=load_format,
        ),
        cache=CacheConfig(
            block_size=block_size,
            gpu_memory_utilization=gpu_memory_utilization,
            kv_cache_memory_bytes=kv_cache_memory_bytes,
            num_gpu_blocks_override=num_gpu_blocks_override,
            enable_prefix_caching=enable_prefix_caching,
        ),
        scheduler=SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            async_scheduling=async_scheduling,
        ),
        multimodal=MultimodalConfig(
            limit_mm_per_prompt=dict(limit_mm_per_prompt or {}),
            enable_mm_embeds=enable_mm_embeds,
            media_io_kwargs=dict(media_io_kwargs or {}),
            allowed_local_media_path=allowed_local_media_path,
            allowed_media_domains=tuple(allowed_media_domains) if allowed_media_domains else None,
            mm_processor_kwargs=dict(mm_processor_kwargs or {}),
        ),
        seed=seed,
        compilation_cache_dir=compilation_cache_dir,
        warmup=warmup,
        tensor_parallel_size=tensor_parallel_size,
    )


def _broadcast_params(params, n: int, cls=SamplingParams) -> list:
    if params is None:
        return [cls() for _ in range(n)]
    if isinstance(params, cls):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"got {len(params)} {cls.__name__} for {n} prompts")
    return params
