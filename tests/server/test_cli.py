"""The `jaxmm` command line: help, flag parsing, and each command's wiring."""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys

import pytest

from jaxmm import cli
from tests.helpers import make_checkpoint

SMALL = [
    "--max-model-len",
    "64",
    "--max-num-batched-tokens",
    "16",
    "--kv-cache-memory-bytes",
    "2M",
    "--max-num-seqs",
    "4",
]


@pytest.fixture(scope="module")
def ckpt(ckpt_root):
    return make_checkpoint(ckpt_root, "llama")


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for command in ("serve", "generate", "chat", "bench", "convert"):
        assert command in out


def test_serve_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    out = capsys.readouterr().out
    for flag in (
        "--host",
        "--port",
        "--api-key",
        "--served-model-name",
        "--chat-template",
        "--dtype",
        "--max-model-len",
        "--max-num-seqs",
        "--max-num-batched-tokens",
        "--gpu-memory-utilization",
        "--enable-prefix-caching",
        "--no-enable-prefix-caching",
        "--limit-mm-per-prompt",
        "--allowed-local-media-path",
        "--allowed-media-domains",
        "--enable-mm-embeds",
        "--media-io-kwargs",
        "--compilation-cache-dir",
        "--tensor-parallel-size",
        "--kv-cache-memory-bytes",
    ):
        assert flag in out, flag


def test_help_is_light():
    # `--help` must not pay for importing JAX
    code = (
        "import sys\nfrom jaxmm.cli import main\ntry:\n    main(['serve', '--help'])\n"
        "except SystemExit:\n    pass\nassert 'jax' not in sys.modules, 'jax imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=60)


def test_flag_parsers():
    assert cli.parse_size("1G") == 2**30
    assert cli.parse_size("512MiB") == 512 * 2**20
    assert cli.parse_size("1000") == 1000
    assert cli.parse_limit_mm("image=2,video=1") == {"image": 2, "video": 1}
    assert cli.parse_limit_mm('{"audio": 0}') == {"audio": 0}
    for bad in ("image", "imgs=2", '{"image": -1}', "image=x", "[1]"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli.parse_limit_mm(bad)
    with pytest.raises(argparse.ArgumentTypeError):
        cli.parse_json_object("[1]")
    with pytest.raises(argparse.ArgumentTypeError):
        cli.parse_size("lots")


def test_missing_default_model_is_a_clear_error(monkeypatch, capsys):
    import jaxmm.default_model

    def missing():
        raise FileNotFoundError("no model given and the embedded default is not installed")

    monkeypatch.setattr(jaxmm.default_model, "default_model_path", missing)
    assert cli.main(["serve"]) == 1
    assert "embedded default is not installed" in capsys.readouterr().err


def test_serve_checks_media_flags_before_loading(tmp_path, capsys):
    assert cli.main(["serve", str(tmp_path), "--allowed-local-media-path", "relative/dir"]) == 1
    assert "absolute" in capsys.readouterr().err


def test_serve_wiring(ckpt, monkeypatch, tmp_path):
    import jaxmm.server.app

    seen = {}
    (tmp_path / "generation_config.json").write_text('{"temperature": 0.25, "top_k": 3}')
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    key.write_text("k")
    cert.write_text("c")

    def fake_serve(app, host, port, log_level, **kw):
        seen.update(app=app, host=host, port=port, **kw)

    built = {}
    real_build_app = jaxmm.server.app.build_app

    def build_app(client, **kw):
        built.update(kw)
        return real_build_app(client, **kw)

    monkeypatch.setattr(jaxmm.server.app, "serve", fake_serve)
    monkeypatch.setattr(jaxmm.server.app, "build_app", build_app)
    rc = cli.main(
        [
            "serve",
            ckpt,
            "--port",
            "9123",
            "--served-model-name",
            "a",
            "b",
            "--api-key",
            "k",
            "--no-warmup",
            "--no-enable-prefix-caching",
            "--limit-mm-per-prompt",
            "image=2",
            *SMALL,
            # vLLM's everyday flags
            "--trust-remote-code",
            "--enforce-eager",
            "--enable-chunked-prefill",
            "--kv-cache-dtype",
            "auto",
            "--load-format",
            "safetensors",
            "--max-logprobs",
            "3",
            "--generation-config",
            str(tmp_path),
            "--hf-overrides",
            '{"max_position_embeddings": 100}',
            "--response-role",
            "bot",
            "--ssl-keyfile",
            str(key),
            "--ssl-certfile",
            str(cert),
            "--allowed-origins",
            '["http://a.example"]',
            "http://b.example,http://c.example",
            "--allow-credentials",
            "--root-path",
            "/llm",
            "--disable-log-requests",
            "--disable-log-stats",
        ]
    )
    assert rc == 0 and seen["port"] == 9123 and seen["host"] == "127.0.0.1"
    assert seen["ssl_keyfile"] == str(key) and seen["ssl_certfile"] == str(cert)
    assert seen["access_log"] is False  # --disable-log-requests
    app = seen["app"]
    state = app.state.jaxmm
    try:
        assert state.served_model_names == ["a", "b"]
        engine = state.client.engine
        assert engine.max_model_len == 64
        assert engine.config.cache.enable_prefix_caching is False
        assert engine.config.multimodal.limit_mm_per_prompt == {"image": 2}
        assert engine.config.model.max_logprobs == 3
        assert engine.config.warmup is False  # --enforce-eager
        assert engine.hf_config.max_position_embeddings == 100  # --hf-overrides
        assert state.response_role == "bot"
        assert state.default_sampling_params == {"temperature": 0.25, "top_k": 3}
        middleware = {m.cls.__name__: m.kwargs for m in app.user_middleware}
        assert middleware["CORSMiddleware"]["allow_origins"] == [
            "http://a.example",
            "http://b.example",
            "http://c.example",
        ]
        assert middleware["CORSMiddleware"]["allow_credentials"] is True
        assert middleware["RootPathMiddleware"] == {"root_path": "/llm"}
        assert built["log_stats"] is False  # --disable-log-stats
    finally:
        state.client.shutdown()


def test_served_model_name_is_the_model_as_given():
    parse = cli.build_parser().parse_args
    assert cli.served_model_names(parse(["serve", "./ckpts/llama"])) == ["./ckpts/llama"]
    assert cli.served_model_names(parse(["serve", "--model", "m.gguf"])) == ["m.gguf"]
    assert cli.served_model_names(parse(["serve", "x", "--served-model-name", "n"])) == ["n"]
    # the embedded default: a stable readable name, the one the README's curl example sends
    assert cli.served_model_names(parse(["serve"])) == [cli.DEFAULT_SERVED_NAME]
    readme = open(os.path.join(os.path.dirname(cli.__file__), "..", "README.md")).read()
    assert f'"model": "{cli.DEFAULT_SERVED_NAME}"' in readme


def test_generate_and_chat(ckpt, capsys, monkeypatch):
    from jaxmm import LLM, SamplingParams

    assert cli.main(["generate", "Hello", "--model", ckpt, "--max-tokens", "4", *SMALL]) == 0
    got = capsys.readouterr().out
    llm = LLM(
        ckpt,
        max_model_len=64,
        max_num_batched_tokens=16,
        kv_cache_memory_bytes=2 << 20,
        max_num_seqs=4,
    )
    want = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert got == want[0].outputs[0].text + "\n"

    import jaxmm.llm

    sent = []
    real_chat = jaxmm.llm.LLM.chat

    def chat(self, messages, *args, **kwargs):
        sent.append([m["content"] for m in messages])
        return real_chat(self, messages, *args, **kwargs)

    monkeypatch.setattr(jaxmm.llm.LLM, "chat", chat)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi there\n/reset\nHello\n/exit\nignored\n"))
    assert (
        cli.main(["chat", "--model", ckpt, "--max-tokens", "3", "--system", "Be brief", *SMALL])
        == 0
    )
    assert sent == [["Be brief", "Hi there"], ["Be brief", "Hello"]]
    assert capsys.readouterr().out.strip()


def test_convert_calls_the_converter(monkeypatch, capsys):
    import jaxmm.weights.ct2_whisper as ct2

    calls = []
    monkeypatch.setattr(ct2, "convert_ct2_whisper", lambda *a, **k: calls.append((a, k)))
    assert cli.main(["convert", "ct2-whisper", "src", "dst", "--dtype", "float16"]) == 0
    assert calls == [(("src", "dst"), {"dtype": "float16"})]
