"""Frozen engine configuration, validated once. Imports nothing of jaxmm."""

from __future__ import annotations

from dataclasses import dataclass, field

_DTYPES = ("auto", "bfloat16", "float16", "float32")


@dataclass(frozen=True)
class ModelConfig:
    model: str  # local checkpoint directory or .gguf file
    tokenizer: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None  # None: from the checkpoint
    skip_tokenizer_init: bool = False
    attention_backend: str = "auto"  # "auto" | "reference" | "xla" | "pallas" | "pallas_tpu"
    load_format: str = "auto"  # "auto" | "dummy" (random weights, for benchmarks)

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    # Byte budget for the KV cache; on CPU (no memory stats) this is the only budget.
    kv_cache_memory_bytes: int | None = None
    num_gpu_blocks_override: int | None = None
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # None: 1024 on CPU, 4096 on accelerators
    # schedule step N+1 while step N runs (sampled tokens stay on device)
    async_scheduling: bool = True

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )


@dataclass(frozen=True)
class MultimodalConfig:
    limit_mm_per_prompt: dict = field(default_factory=dict)
    enable_mm_embeds: bool = False
    media_io_kwargs: dict = field(default_factory=dict)
    allowed_local_media_path: str | None = None
    allowed_media_domains: tuple[str, ...] | None = None
    mm_processor_kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    multimodal: MultimodalConfig = field(default_factory=MultimodalConfig)
    seed: int = 0
    compilation_cache_dir: str | None = None
    warmup: bool = False
    tensor_parallel_size: int = 1
