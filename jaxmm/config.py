"""Engine arguments, declared once: frozen dataclasses, validated on construction.

Every field carries its help text and, where its type does not say it all, how the command
line spells it (`arg(default, help=..., cli={...})` puts both in the field's metadata). The
rest is derived from these declarations:
- `LLM()`'s keyword arguments, their defaults and its docstring (jaxmm/llm.py);
- the engine flags of `jaxmm serve|generate|chat|bench` (jaxmm/cli.py): `--foo-bar` for
  `foo_bar`, vLLM's spellings;
- `engine_config(**kwargs)`: the EngineConfig an engine runs with, in this process or in the
  server's engine process.
Imports nothing of jaxmm.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any

# the one list of attention backends (jaxmm/kernels/__init__.py imports nothing)
from jaxmm.kernels import ATTENTION_BACKENDS, check_attention_backend

_DTYPES = ("auto", "bfloat16", "float16", "float32")
_LOAD_FORMATS = ("auto", "safetensors", "dummy")
_RUNNERS = ("auto", "generate", "pooling")
# vLLM's older --task spelling -> the runner it picks
_TASKS = {
    "auto": "auto",
    "generate": "generate",
    "transcription": "generate",
    "embed": "pooling",
    "embedding": "pooling",
}
# what a generation_config.json may set by default (vLLM takes the same keys)
_GENERATION_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
# the sampler returns at most this many logprobs per token (jaxmm.sampling_params)
MAX_LOGPROBS = 20


def arg(
    default: Any = MISSING,
    *,
    help: str,
    cli: dict | bool = True,
    default_factory: Any = MISSING,
) -> Any:
    """A config field with its help text. `cli`: False for no flag, else what the flag needs
    beyond its type: `flags` (extra spellings such as "-tp"), `type` ("size", "json",
    "limit_mm"), `choices`, `metavar`."""
    metadata = {"help": help, "cli": cli}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _set(obj: Any, name: str, value: Any) -> None:
    """Normalise a field of a frozen dataclass in its __post_init__."""
    object.__setattr__(obj, name, value)


@dataclass(frozen=True)
class ModelConfig:
    model: str = arg(
        help="checkpoint: a local directory (config.json + *.safetensors) or a .gguf file; "
        "nothing is downloaded",
        cli=False,
    )
    tokenizer: str | None = arg(None, help="tokenizer directory (default: the model's)")
    dtype: str = arg(
        "auto",
        help="weight and activation dtype; auto: the checkpoint's",
        cli={"choices": _DTYPES},
    )
    max_model_len: int | None = arg(None, help="context length in tokens (default: the model's)")
    skip_tokenizer_init: bool = arg(
        False, help="load no tokenizer: prompts must be token ids and outputs carry no text"
    )
    attention_backend: str = arg(
        "auto",
        help="paged attention implementation",
        cli={"choices": ATTENTION_BACKENDS},
    )
    load_format: str = arg(
        "auto",
        help="how weights are read: auto or safetensors (the checkpoint's files; a .gguf "
        "is read as GGUF), dummy (random weights of the right shapes, for benchmarks)",
        cli={"choices": _LOAD_FORMATS},
    )
    trust_remote_code: bool = arg(
        False,
        help="accepted for vLLM compatibility, no effect: jaxmm runs no code from a "
        "checkpoint, every architecture it serves is implemented in jaxmm itself",
    )
    runner: str = arg(
        "auto",
        help="generate (text out) or pooling (one embedding per prompt: last-token hidden "
        "states of a vision-language model such as Qwen2-VL, DSE-Qwen2 style); auto: pooling "
        "for embedding checkpoints (BertModel, ...), else generate",
        cli={"choices": _RUNNERS},
    )
    task: str | None = arg(
        None,
        help="vLLM's older spelling of --runner: embed / embedding = pooling, generate / "
        "transcription = generate",
        cli={"choices": tuple(_TASKS)},
    )
    pooler_config: dict = arg(
        help="pooling runner options as JSON over the checkpoint's sentence-transformers "
        'config, e.g. \'{"pooling_type": "LAST", "normalize": true}\'',
        default_factory=dict,
    )
    generation_config: str = arg(
        "auto",
        help="sampling defaults: 'auto' takes temperature, top_p, top_k, min_p, "
        "repetition_penalty and max_new_tokens (as max_tokens) from the checkpoint's "
        "generation_config.json; 'vllm' ignores that file; else a directory holding one (or "
        "the JSON file). A request's own values win",
    )
    hf_overrides: dict = arg(
        help="JSON object applied over the checkpoint's HF config on load, e.g. "
        "'{\"max_position_embeddings\": 4096}' (a nested object updates a sub-config such "
        "as text_config)",
        default_factory=dict,
    )
    max_logprobs: int = arg(
        MAX_LOGPROBS,
        help=f"most logprobs a request may ask for per token; larger asks are refused "
        f"(at most {MAX_LOGPROBS}, the sampler's limit; -1: that limit)",
    )
    enforce_eager: bool = arg(
        False,
        help="accepted for vLLM compatibility: jaxmm has no eager mode (every step is one "
        "compiled program per batch shape); this turns warmup off instead, so start-up is "
        "quicker and each shape compiles when first used (slow first requests)",
    )

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        check_attention_backend(self.attention_backend)
        if self.load_format not in _LOAD_FORMATS:
            raise ValueError(
                f"load_format must be one of {_LOAD_FORMATS}, got {self.load_format!r} "
                "(jaxmm reads safetensors and GGUF: convert PyTorch .bin/.pt weights first)"
            )
        if self.generation_config not in ("auto", "vllm") and not os.path.exists(
            self.generation_config
        ):
            raise ValueError(
                "generation_config must be 'auto', 'vllm' or an existing directory or JSON "
                f"file, got {self.generation_config!r}"
            )
        _set(self, "hf_overrides", dict(self.hf_overrides or {}))
        _set(self, "pooler_config", dict(self.pooler_config or {}))
        if self.runner not in _RUNNERS:
            raise ValueError(f"runner must be one of {_RUNNERS}, got {self.runner!r}")
        if self.task is not None:
            if self.task not in _TASKS:
                raise ValueError(f"task must be one of {tuple(_TASKS)}, got {self.task!r}")
            implied = _TASKS[self.task]
            if implied != "auto" and self.runner not in ("auto", implied):
                raise ValueError(
                    f"task={self.task!r} means runner={implied!r}, but runner={self.runner!r} "
                    "was given: pass one of them"
                )
            if implied != "auto":
                _set(self, "runner", implied)
        if self.max_logprobs == -1:
            _set(self, "max_logprobs", MAX_LOGPROBS)
        if not 0 <= self.max_logprobs <= MAX_LOGPROBS:
            raise ValueError(
                f"max_logprobs must be in [0, {MAX_LOGPROBS}] or -1, got {self.max_logprobs} "
                f"(jaxmm returns at most {MAX_LOGPROBS} logprobs per token)"
            )

    def sampling_defaults(self) -> dict:
        """SamplingParams defaults the generation config sets (vLLM's rule: these keys
        only, `max_new_tokens` as max_tokens); {} for 'vllm' or when there is no such file."""
        source = self.generation_config
        if source == "vllm":
            return {}
        if source == "auto":
            path = os.path.join(self.model, "generation_config.json")
            if not os.path.isfile(path):
                return {}  # a GGUF file, or a checkpoint without one
        elif os.path.isdir(source):
            path = os.path.join(source, "generation_config.json")
        else:
            path = source
        try:
            with open(path, encoding="utf-8") as f:
                values = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read the generation config {path!r}: {e}") from None
        if not isinstance(values, dict):
            raise ValueError(f"the generation config {path!r} is not a JSON object")
        out = {k: values[k] for k in _GENERATION_KEYS if values.get(k) is not None}
        if values.get("max_new_tokens") is not None:
            out["max_tokens"] = values["max_new_tokens"]
        return out


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = arg(16, help="tokens per KV page, a power of two")
    gpu_memory_utilization: float = arg(
        0.9, help="fraction of accelerator memory for weights + KV cache"
    )
    # on CPU (no memory stats) this is the only budget
    kv_cache_memory_bytes: int | None = arg(
        None,
        help="KV cache budget, e.g. 4G; overrides --gpu-memory-utilization (on CPU the "
        "default is 1G)",
        cli={"type": "size"},
    )
    num_gpu_blocks_override: int | None = arg(
        None, help="number of KV pages, overriding the count the memory budget gives"
    )
    enable_prefix_caching: bool = arg(True, help="reuse KV pages of shared prompt prefixes")
    kv_cache_dtype: str = arg(
        "auto",
        help="KV cache dtype: only auto (the model's dtype); jaxmm has no quantized KV "
        "cache yet, so fp8 and others are refused",
    )

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.kv_cache_dtype != "auto":
            raise ValueError(
                f"kv_cache_dtype {self.kv_cache_dtype!r} is not supported: jaxmm keeps the KV "
                "cache in the model's dtype (no quantized KV cache yet); use 'auto'"
            )


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = arg(256, help="most sequences in one batch")
    max_num_batched_tokens: int | None = arg(
        None, help="token budget of one step (default: 1024 on CPU, 4096 on accelerators)"
    )
    async_scheduling: bool = arg(
        True,
        help="schedule the next step while the current one runs on the device, sampled "
        "tokens staying on device",
    )
    enable_chunked_prefill: bool = arg(
        True,
        help="jaxmm always splits a long prompt into chunks that fit the step's token "
        "budget, next to running decodes; accepted when on, refused when off",
    )

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
        if not self.enable_chunked_prefill:
            raise ValueError(
                "enable_chunked_prefill=False is not supported: jaxmm always chunks prefills "
                "(a prompt longer than max_num_batched_tokens runs over several steps); raise "
                "max_num_batched_tokens to prefill longer prompts in one step"
            )


@dataclass(frozen=True)
class MultimodalConfig:
    limit_mm_per_prompt: dict = arg(
        help="most media items per prompt, as JSON ('{\"image\": 2}') or 'image=2,video=1'",
        cli={"type": "limit_mm"},
        default_factory=dict,
    )
    enable_mm_embeds: bool = arg(False, help="accept precomputed media embeddings in requests")
    media_io_kwargs: dict = arg(
        help='per-kind media loading options as JSON, e.g. \'{"video": {"num_frames": 16}}\'',
        default_factory=dict,
    )
    allowed_local_media_path: str | None = arg(
        None,
        help="absolute directory whose files requests may read as file:// URLs (default: none)",
    )
    allowed_media_domains: tuple[str, ...] | None = arg(
        None,
        help="only fetch http(s) media from these domains (and their subdomains)",
        cli={"metavar": "DOMAIN"},
    )
    mm_processor_kwargs: dict = arg(
        help="options for the HF processor as JSON", default_factory=dict
    )
    mm_processor_workers: int | None = arg(
        None,
        help="worker processes that decode, hash and process images and videos off the "
        "engine's GIL (0: in the engine process; default: a quarter of the cores, at most 4, "
        "none on hosts with fewer than 8)",
    )
    mm_warmup_image_sizes: tuple[str, ...] | None = arg(
        None,
        help="image sizes (WxH) whose vision-encoder programs warmup compiles, for every "
        "batch of them the engine may form (e.g. 448x448 1344x1344); default: the "
        "processor's fixed size where it has one (LLaVA), none for dynamic-resolution models",
        cli={"metavar": "WxH"},
    )

    def __post_init__(self) -> None:
        for name in ("limit_mm_per_prompt", "media_io_kwargs", "mm_processor_kwargs"):
            _set(self, name, dict(getattr(self, name) or {}))
        workers = self.mm_processor_workers
        if workers is not None and (isinstance(workers, bool) or int(workers) < 0):
            raise ValueError(f"mm_processor_workers must be >= 0 or None, got {workers!r}")
        sizes = self.mm_warmup_image_sizes
        if isinstance(sizes, str):
            sizes = [sizes]
        if sizes is not None:
            parsed = []
            for item in sizes:
                for text in str(item).replace(",", " ").split():
                    w, _, h = text.lower().partition("x")
                    if not (w.isdigit() and h.isdigit() and int(w) > 0 and int(h) > 0):
                        raise ValueError(
                            f"mm_warmup_image_sizes takes WxH sizes such as 448x448, got {text!r}"
                        )
                    parsed.append(f"{int(w)}x{int(h)}")
            _set(self, "mm_warmup_image_sizes", tuple(parsed))
        domains = self.allowed_media_domains
        if isinstance(domains, str):
            domains = [domains]
        if domains is not None:
            # "a.com,b.com" and "a.com b.com" alike
            split = tuple(d.strip() for item in domains for d in item.split(",") if d.strip())
            _set(self, "allowed_media_domains", split or None)


@dataclass(frozen=True)
class ParallelConfig:
    """How the model spreads over devices and hosts (docs/parallelism.md)."""

    tensor_parallel_size: int = arg(
        1,
        help="devices to shard the model over (attention heads, MLP, vocabulary)",
        cli={"flags": ("-tp",)},
    )
    data_parallel_size: int = arg(
        1,
        help="independent engine replicas, each on its own tensor_parallel_size devices with "
        "its own scheduler and KV cache; requests are balanced across them",
        cli={"flags": ("-dp",)},
    )

    # multi-host (jaxmm/distributed.py): one process per host on jax.distributed
    distributed: bool = arg(
        False,
        help="run on several hosts with jax.distributed: process 0 serves, the others "
        "follow its steps; without the three flags below JAX reads them from the cluster "
        "(TPU VM pod slices, SLURM, Open MPI, Kubernetes)",
    )
    coordinator_address: str | None = arg(
        None, help="multi-host: host:port of process 0's coordinator (implies --distributed)"
    )
    num_processes: int | None = arg(None, help="multi-host: processes (hosts) in all")
    process_id: int | None = arg(None, help="multi-host: this process's index, 0 the leader")
    distributed_timeout_s: int = arg(
        300, help="multi-host: seconds to wait for every process to join before failing"
    )

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "data_parallel_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        multihost = (
            self.distributed
            or self.coordinator_address
            or (self.num_processes or 1) > 1
            or self.process_id is not None
        )
        if multihost and self.data_parallel_size > 1:
            raise ValueError(
                "data_parallel_size > 1 runs replicas on one host; across hosts, run one "
                "multi-host deployment per replica behind a load balancer"
            )


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    multimodal: MultimodalConfig = field(default_factory=MultimodalConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    seed: int = arg(0, help="engine seed")
    compilation_cache_dir: str | None = arg(
        None, help="persistent XLA compilation cache directory (faster restarts)"
    )
    # the server has its own --warmup flag, on by default there
    warmup: bool = arg(
        False,
        help="compile every batch shape at start instead of on first use",
        cli=False,
    )

    def __post_init__(self) -> None:
        if self.model.enforce_eager and self.warmup:
            _set(self, "warmup", False)  # enforce_eager: compile on first use

    @property
    def tensor_parallel_size(self) -> int:
        return self.parallel.tensor_parallel_size

    @property
    def data_parallel_size(self) -> int:
        return self.parallel.data_parallel_size


# -- the declarations, flattened: one namespace of engine arguments -----------------------------

SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "cache": CacheConfig,
    "scheduler": SchedulerConfig,
    "multimodal": MultimodalConfig,
    "parallel": ParallelConfig,
}


def _engine_fields() -> dict[str, tuple[str | None, Field]]:
    """name -> (section of EngineConfig, or None for EngineConfig's own field; the Field)."""
    out: dict[str, tuple[str | None, Field]] = {}
    groups = [(s, cls) for s, cls in SECTIONS.items()] + [(None, EngineConfig)]
    for section, cls in groups:
        for f in fields(cls):
            if "help" not in f.metadata:
                continue  # EngineConfig's sections
            if f.name in out:
                raise TypeError(f"engine argument {f.name!r} is declared twice")
            out[f.name] = (section, f)
    return out


ENGINE_ARGS = _engine_fields()


def engine_args() -> dict[str, Field]:
    """Every engine argument (name -> its dataclass Field), in declaration order."""
    return {name: f for name, (_, f) in ENGINE_ARGS.items()}


def arg_default(f: Field) -> Any:
    if f.default_factory is not MISSING:
        return f.default_factory()
    return None if f.default is MISSING else f.default


def check_engine_args(names, where: str = "engine_config()") -> None:
    """TypeError naming an argument that no config declares (with the nearest real name)."""
    for name in names:
        if name not in ENGINE_ARGS:
            near = difflib.get_close_matches(name, ENGINE_ARGS, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise TypeError(f"{where} got an unexpected keyword argument {name!r}{hint}")


def engine_config(**kwargs: Any) -> EngineConfig:
    """The EngineConfig of these engine arguments (`model` is required here; `LLM()` and
    the CLI fill in the embedded default first). Unknown names raise TypeError."""
    check_engine_args(kwargs)
    if kwargs.get("model") is None:
        raise TypeError("engine_config() needs model=")
    parts: dict[str, dict] = {s: {} for s in SECTIONS}
    top: dict[str, Any] = {}
    for name, value in kwargs.items():
        section, _ = ENGINE_ARGS[name]
        (top if section is None else parts[section])[name] = value
    sections = {s: SECTIONS[s](**values) for s, values in parts.items()}
    return EngineConfig(**sections, **top)
