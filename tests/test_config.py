"""Engine arguments declared once (jaxmm/config.py): LLM(), the CLI and engine_config() all
take exactly the declared names and defaults; vLLM's flags are accepted or refused with a
message that says why."""

from __future__ import annotations

import inspect
import json

import pytest

from jaxmm import cli
from jaxmm.config import (
    ENGINE_ARGS,
    MAX_LOGPROBS,
    EngineConfig,
    ModelConfig,
    arg_default,
    engine_config,
)
from jaxmm.llm import LLM

# every keyword LLM() took before the arguments were declared once: none may go away
OLD_LLM_KWARGS = {
    "model", "tokenizer", "dtype", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
    "block_size", "gpu_memory_utilization", "kv_cache_memory_bytes", "num_gpu_blocks_override",
    "enable_prefix_caching", "seed", "skip_tokenizer_init", "compilation_cache_dir", "warmup",
    "attention_backend", "tensor_parallel_size", "limit_mm_per_prompt", "enable_mm_embeds",
    "media_io_kwargs", "allowed_local_media_path", "allowed_media_domains",
    "mm_processor_kwargs", "trust_remote_code", "load_format", "async_scheduling",
}  # fmt: skip
VLLM_NAMES = {
    "enforce_eager", "trust_remote_code", "generation_config", "hf_overrides",
    "kv_cache_dtype", "max_logprobs", "enable_chunked_prefill", "load_format",
}  # fmt: skip


def test_llm_signature_is_the_declared_arguments():
    params = dict(inspect.signature(LLM).parameters)
    assert list(params)[0] == "model" and params.pop("model").default is None
    declared = {n: arg_default(f) for n, (_, f) in ENGINE_ARGS.items()}
    declared.pop("model")
    assert {n: p.default for n, p in params.items()} == declared
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values())
    assert OLD_LLM_KWARGS | VLLM_NAMES <= set(declared) | {"model"}
    for name, (_, f) in ENGINE_ARGS.items():  # the docstring is generated from the help
        assert f"{name} (" in LLM.__doc__ and f.metadata["help"][:30] in " ".join(
            LLM.__doc__.split()
        ), name


def test_unknown_argument_is_a_type_error_with_a_suggestion():
    with pytest.raises(TypeError, match=r"LLM\(\) .*'max_num_seqz'; did you mean 'max_num_seqs'"):
        LLM("x", max_num_seqz=3)
    with pytest.raises(TypeError, match="enforce_eagre"):
        engine_config(model="x", enforce_eagre=True)


def test_cli_flags_are_the_declared_arguments(capsys):
    """`jaxmm serve` with no flags hands LLM() every declared default, and nothing else."""
    args = cli.build_parser().parse_args(["serve", "m"])
    kwargs = cli.llm_kwargs(args, "m")
    with_flag = {n for n, (_, f) in ENGINE_ARGS.items() if f.metadata["cli"] is not False}
    assert set(kwargs) == with_flag | {"model"}
    assert engine_config(**kwargs) == engine_config(model="m")
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    out = capsys.readouterr().out
    for name in with_flag:  # --foo-bar for foo_bar
        assert "--" + name.replace("_", "-") + " " in out, name


def _serve_args(*flags: str):
    return cli.build_parser().parse_args(["serve", "m", *flags])


def test_vllm_engine_flags_parse_into_the_config(tmp_path):
    gen = tmp_path / "gen"
    gen.mkdir()
    args = _serve_args(
        "--trust-remote-code",
        "--enforce-eager",
        "--enable-chunked-prefill",
        "--kv-cache-dtype",
        "auto",
        "--max-logprobs",
        "5",
        "--load-format",
        "dummy",
        "--generation-config",
        str(gen),
        "--hf-overrides",
        '{"max_position_embeddings": 96, "text_config": {"a": 1}}',
        "--allowed-media-domains",
        "a.com,b.com",
        "c.com",
        "-tp",
        "1",
    )
    config = engine_config(**cli.llm_kwargs(args, "m"), warmup=True)
    m = config.model
    assert m.trust_remote_code and m.enforce_eager and m.load_format == "dummy"
    assert m.max_logprobs == 5 and m.generation_config == str(gen)
    assert m.hf_overrides == {"max_position_embeddings": 96, "text_config": {"a": 1}}
    assert config.scheduler.enable_chunked_prefill and config.cache.kv_cache_dtype == "auto"
    assert config.multimodal.allowed_media_domains == ("a.com", "b.com", "c.com")
    assert config.warmup is False  # enforce_eager: no warmup, shapes compile on first use


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kv_cache_dtype": "fp8"}, "no quantized KV cache yet"),
        ({"enable_chunked_prefill": False}, "always chunks prefills"),
        ({"max_logprobs": 50}, f"at most {MAX_LOGPROBS} logprobs"),
        ({"load_format": "pt"}, "convert PyTorch"),
        ({"generation_config": "/no/such/dir"}, "generation_config must be"),
    ],
)
def test_refused_values_say_why(kwargs, message):
    with pytest.raises(ValueError, match=message):
        engine_config(model="m", **kwargs)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--kv-cache-dtype", "fp8_e4m3"], "no quantized KV cache yet"),
        (["--no-enable-chunked-prefill"], "always chunks prefills"),
        (["--max-logprobs", "64"], "logprobs per token"),
        (["--ssl-keyfile", "key.pem"], "--ssl-keyfile needs --ssl-certfile"),
        (["--ssl-certfile", "/no/cert.pem"], "does not exist"),
        (["--hf-overrides", "[1]"], None),  # argparse: not a JSON object
    ],
)
def test_serve_refuses_before_loading(tmp_path, capsys, flags, message):
    # an empty directory: nothing would load, so the refusal must come first
    if message is None:
        with pytest.raises(SystemExit) as e:
            cli.main(["serve", str(tmp_path), *flags])
        assert e.value.code == 2 and "JSON object" in capsys.readouterr().err
        return
    assert cli.main(["serve", str(tmp_path), *flags]) == 1
    assert message in capsys.readouterr().err


def test_max_logprobs_minus_one_is_the_samplers_limit():
    assert ModelConfig(model="m", max_logprobs=-1).max_logprobs == MAX_LOGPROBS


def test_generation_config_defaults(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    values = {
        "temperature": 0.6,
        "top_p": 0.9,
        "top_k": 20,
        "repetition_penalty": 1.1,
        "max_new_tokens": 7,
        "do_sample": True,  # not a sampling default: ignored, as vLLM does
        "eos_token_id": 2,
    }
    (ckpt / "generation_config.json").write_text(json.dumps(values))
    want = {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.1}
    want["max_tokens"] = 7
    assert ModelConfig(model=str(ckpt)).sampling_defaults() == want  # 'auto'
    assert ModelConfig(model=str(ckpt), generation_config="vllm").sampling_defaults() == {}
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"top_k": 5, "min_p": 0.1}))
    got = ModelConfig(model=str(ckpt), generation_config=str(other)).sampling_defaults()
    assert got == {"top_k": 5, "min_p": 0.1}
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")  # a file checkpoint has no generation config beside it
    assert ModelConfig(model=str(gguf)).sampling_defaults() == {}


def test_engine_config_is_frozen_and_complete():
    config = engine_config(model="m", max_num_seqs=3, limit_mm_per_prompt=None)
    assert isinstance(config, EngineConfig) and config.scheduler.max_num_seqs == 3
    assert config.multimodal.limit_mm_per_prompt == {}
    with pytest.raises(AttributeError):
        config.seed = 1
