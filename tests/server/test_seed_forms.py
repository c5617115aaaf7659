"""vLLM's remaining command-line and template forms.

- `--limit-mm-per-prompt.image 2` (and any JSON-object flag's dotted form, nested and with
  `=`) beside, and merged over, the JSON form; bad kinds and counts are refused.
- `--runner pooling`, and `--task embed` / `embedding` as its older spelling.
- `--trust-remote-code` is accepted and explained (no code is ever fetched).
- Chat templates by name (`--chat-template llava`) and the fallback for a checkpoint that
  ships none: a tiny LLaVA whose tokenizer has no template chats in LLaVA-1.5's format, the
  same prompt and tokens as `generate` on that text.
"""

from __future__ import annotations

import logging
import os
import shutil

import pytest

from jaxmm import PoolingParams, cli
from jaxmm.config import engine_config
from jaxmm.multimodal.chat_templates import LLAVA, NAMED_TEMPLATES
from tests.helpers import link_model_files, make_checkpoint
from tests.models.test_vlm_parity import IMAGES, make_vlm


def _parse(*flags: str):
    return cli.parse_args(cli.build_parser(), ["serve", "m", *flags])


def test_dotted_json_flags():
    args = _parse(
        "--limit-mm-per-prompt",
        '{"video": 1}',
        "--limit-mm-per-prompt.image",
        "2",
        "--limit-mm-per-prompt.audio=3",
        "--hf-overrides.text_config.num_hidden_layers",
        "2",
        "--hf-overrides.rope_scaling.type=mrope",
        "--mm-processor-kwargs.do_resize",
        "false",
    )
    assert args.limit_mm_per_prompt == {"video": 1, "image": 2, "audio": 3}
    assert args.hf_overrides == {
        "text_config": {"num_hidden_layers": 2},
        "rope_scaling": {"type": "mrope"},
    }
    assert args.mm_processor_kwargs == {"do_resize": False}
    config = engine_config(**cli.llm_kwargs(args, "m"))
    assert config.multimodal.limit_mm_per_prompt == {"video": 1, "image": 2, "audio": 3}
    assert _parse("--limit-mm-per-prompt", "image=2").limit_mm_per_prompt == {"image": 2}
    assert _parse().limit_mm_per_prompt is None  # untouched without the flag

    for bad in (["--limit-mm-per-prompt.sound", "2"], ["--limit-mm-per-prompt.image", "-1"]):
        with pytest.raises(SystemExit):
            _parse(*bad)
    with pytest.raises(SystemExit):
        _parse("--limit-mm-per-prompt.image")  # no value
    with pytest.raises(SystemExit):  # a dotted form of a flag that is not a JSON object
        _parse("--max-model-len.x", "2")


def test_runner_and_task_flags():
    def runner(*flags: str) -> str:
        return engine_config(**cli.llm_kwargs(_parse(*flags), "m")).model.runner

    assert runner() == "auto"
    assert runner("--runner", "pooling") == "pooling"
    assert runner("--task", "embed") == runner("--task", "embedding") == "pooling"
    assert runner("--task", "generate") == "generate"
    with pytest.raises(ValueError, match="pass one of them"):
        runner("--task", "embedding", "--runner", "generate")
    with pytest.raises(SystemExit):
        _parse("--runner", "draft")


def test_trust_remote_code_is_accepted_and_explained(ckpt_root, caplog):
    from jaxmm import LLM

    assert "no effect" in cli.TRUST_REMOTE_CODE_NOTE
    args = _parse("--trust-remote-code")
    assert engine_config(**cli.llm_kwargs(args, "m")).model.trust_remote_code is True
    path = make_checkpoint(ckpt_root, "llama")
    with caplog.at_level(logging.INFO, logger="jaxmm.llm"):
        LLM(path, trust_remote_code=True, max_model_len=64, max_num_batched_tokens=64)
    assert any("never fetches or runs code" in r.getMessage() for r in caplog.records)


def test_chat_template_names_on_the_command_line(tmp_path):
    assert cli.load_chat_template("llava") == LLAVA
    assert set(NAMED_TEMPLATES) >= {"llava", "chatml"}
    with pytest.raises(ValueError, match="known template name"):
        cli.load_chat_template("vicuna-ish")
    own = tmp_path / "t.jinja"
    own.write_text("{{ messages[0]['content'] }}")
    assert cli.load_chat_template(str(own)) == "{{ messages[0]['content'] }}"


@pytest.fixture(scope="module")
def bare_llava(ckpt_root, tmp_path_factory):
    """The parity test's tiny LLaVA with a tokenizer that has no chat template."""
    from transformers import AutoTokenizer

    src = make_vlm(ckpt_root, "llava")
    dst = link_model_files(src, str(tmp_path_factory.mktemp("bare_llava")))
    shutil.copy(os.path.join(src, "preprocessor_config.json"), dst)
    tok = AutoTokenizer.from_pretrained(src)
    tok.chat_template = None
    tok.save_pretrained(dst)
    return src, dst


def test_llava_fallback_and_named_template(bare_llava):
    from jaxmm import LLM, SamplingParams

    src, dst = bare_llava
    kw = dict(dtype="float32", max_model_len=128, max_num_batched_tokens=128)
    llm = LLM(dst, **kw)
    assert not llm.get_tokenizer().chat_template
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    msgs = [
        {
            "role": "user",
            "content": [
                {"type": "image_pil", "image_pil": IMAGES[0]},
                {"type": "text", "text": "What is this?"},
            ],
        }
    ]
    [chat] = llm.chat(msgs, params, use_tqdm=False)
    text = "USER: <image>\nWhat is this? ASSISTANT:"
    [ref] = llm.generate(
        {"prompt": text, "multi_modal_data": {"image": IMAGES[0]}}, params, use_tqdm=False
    )
    assert chat.prompt_token_ids == ref.prompt_token_ids  # BOS + the LLaVA-1.5 format
    assert chat.outputs[0].token_ids == ref.outputs[0].token_ids

    # the same template by name over a checkpoint that has a template of its own
    named = LLM(src, **kw)
    [by_name] = named.chat(msgs, params, use_tqdm=False, chat_template="llava")
    [own] = named.chat(msgs, params, use_tqdm=False)
    assert by_name.prompt_token_ids == chat.prompt_token_ids != own.prompt_token_ids


def test_fallback_only_where_the_tokenizer_has_none():
    from types import SimpleNamespace

    from jaxmm.multimodal.chat_templates import CHATML, resolve_chat_template

    bare, own = SimpleNamespace(chat_template=None), SimpleNamespace(chat_template="{{ 1 }}")
    assert resolve_chat_template(None, bare, "qwen2_vl") == CHATML
    assert resolve_chat_template(None, bare, "qwen2_audio") == CHATML
    assert resolve_chat_template(None, own, "qwen2_vl") is None  # the checkpoint's own
    assert resolve_chat_template(None, bare, "llama") is None  # no fallback: render_chat says so
    assert resolve_chat_template("llava", own, "qwen2_vl") == LLAVA
    assert resolve_chat_template("{{ 2 }}", bare, "llava") == "{{ 2 }}"


def test_serve_task_embedding_serves_vlm_embeddings(ckpt_root, monkeypatch):
    """`jaxmm serve QWEN2_VL --task embedding --chat-template chatml`: a pooling client on a
    thread; /v1/embeddings takes chat messages with an image and text input alike."""
    import base64
    import io

    import httpx

    import jaxmm.server.app
    from jaxmm.engine.hidden_pooling import GenerativePoolingEngine
    from tests.server.util import running_server

    seen = {}
    monkeypatch.setattr(jaxmm.server.app, "serve", lambda app, *a, **kw: seen.update(app=app))
    path = make_vlm(ckpt_root, "qwen2_vl")
    flags = ["--task", "embedding", "--chat-template", "chatml", "--dtype", "float32"]
    flags += ["--max-model-len", "256", "--max-num-batched-tokens", "64", "--no-warmup"]
    assert cli.main(["serve", path, *flags]) == 0
    app = seen["app"]
    engine = app.state.jaxmm.client.engine
    assert isinstance(engine, GenerativePoolingEngine)
    buf = io.BytesIO()
    IMAGES[1].save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Hi"}]
    with running_server(app) as base:
        r = httpx.post(
            f"{base}/v1/embeddings",
            json={"messages": [{"role": "user", "content": parts}]},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        vec = r.json()["data"][0]["embedding"]
        r = httpx.post(f"{base}/v1/embeddings", json={"input": ["a", "b c"]}, timeout=60)
        assert r.status_code == 200 and len(r.json()["data"]) == 2
        r = httpx.post(
            f"{base}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}
        )
        assert r.status_code == 400 and "embedding model" in r.text
    # the chatml template by name: system turn, image placeholder, no generation prompt
    text = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n"
    )
    tok = engine.tokenizer
    prompt = {"prompt_token_ids": tok(text, add_special_tokens=False).input_ids}
    [want] = engine.embed(
        [engine.prepare({**prompt, "multi_modal_data": {"image": IMAGES[1]}})], [PoolingParams()]
    )
    assert abs(sum(a * b for a, b in zip(vec, want.outputs.embedding)) - 1) < 1e-5
