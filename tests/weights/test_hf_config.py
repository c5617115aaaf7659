"""hf_config: text configs and tokenizers read without torch, equal to transformers' own."""

import json
import os
import shutil
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
import transformers
from transformers import AutoConfig, AutoTokenizer

from jaxmm.runner.checkpoint import _eos_ids
from jaxmm.weights.hf_config import (
    LIGHT_TOKENIZERS,
    TextConfig,
    load_config,
    text_config_from_dict,
    tokenizer_class,
)
from tests.helpers import assert_same, make_checkpoint, make_tokenizer, tokenizer_behaviour

CLASSES = {
    "llama": "LlamaConfig",
    "mistral": "MistralConfig",
    "qwen2": "Qwen2Config",
    "qwen3": "Qwen3Config",
}
SMALL = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=3)
LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
VARIANTS = [
    {},  # every default of the class
    dict(SMALL, num_attention_heads=8, num_key_value_heads=2, architectures=["X"]),  # GQA
    dict(SMALL, num_attention_heads=4, head_dim=32, dtype="bfloat16"),
    dict(SMALL, num_attention_heads=4, rope_parameters=LLAMA3, tie_word_embeddings=True),
    dict(SMALL, num_attention_heads=4, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    dict(SMALL, num_attention_heads=4, tie_word_embeddings=False, eos_token_id=[1, 2]),
]
SLIDING = {
    "mistral": [dict(SMALL, num_attention_heads=4, sliding_window=None), dict(sliding_window=24)],
    "qwen2": [
        dict(SMALL, num_attention_heads=4, use_sliding_window=True, sliding_window=16),
        dict(SMALL, num_attention_heads=4, use_sliding_window=True, max_window_layers=1),
        dict(
            SMALL,
            num_attention_heads=4,
            use_sliding_window=True,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        ),
        dict(SMALL, num_attention_heads=4, use_sliding_window=False, sliding_window=8),
    ],
}
SLIDING["qwen3"] = SLIDING["qwen2"]


def assert_reads_like_autoconfig(path):
    """load_config(path) == AutoConfig's, or the same error where transformers refuses it."""
    try:
        full = AutoConfig.from_pretrained(path)
    except Exception as e:
        with pytest.raises(type(e)):
            load_config(path)
        return
    assert_same(load_config(path), full)


def _cases():
    for model_type in CLASSES:
        for i, kw in enumerate(VARIANTS + SLIDING.get(model_type, [])):
            yield pytest.param(model_type, kw, id=f"{model_type}-{i}")


@pytest.mark.parametrize("model_type,kw", list(_cases()))
def test_saved_config_reads_like_autoconfig(tmp_path, model_type, kw):
    getattr(transformers, CLASSES[model_type])(**kw).save_pretrained(tmp_path)
    assert_same(load_config(str(tmp_path)), AutoConfig.from_pretrained(tmp_path))


@pytest.mark.parametrize("model_type,kw", list(_cases()))
def test_keyword_arguments_read_like_the_class(model_type, kw):
    """text_config_from_dict of a config class's keyword arguments, as weights/gguf.py has."""
    light = text_config_from_dict({"model_type": model_type, **kw})
    assert_same(light, getattr(transformers, CLASSES[model_type])(**kw))


BARE = dict(SMALL, num_attention_heads=4)  # no rope_theta, head_dim, num_key_value_heads, ...
HAND_WRITTEN = [
    {},
    {"torch_dtype": "bfloat16"},  # the pre-5 name
    {"torch_dtype": "float16", "dtype": "bfloat16"},
    {"rope_theta": 1000000.0},
    {"rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 4.0}},
    {"rope_scaling": {k: v for k, v in LLAMA3.items() if k != "original_max_position_embeddings"}},
    {"rope_scaling": LLAMA3, "rope_parameters": {"rope_type": "default", "rope_theta": 1.0}},
    {
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 2.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
        },
        "original_max_position_embeddings": 32,
    },
    {"num_key_value_heads": None, "head_dim": None, "sliding_window": None},  # mistral: refused
    {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 2},
    {"tie_word_embeddings": True, "architectures": ["LlamaForCausalLM"], "eos_token_id": 7},
]


@pytest.mark.parametrize("model_type", list(CLASSES))
@pytest.mark.parametrize("extra", HAND_WRITTEN, ids=range(len(HAND_WRITTEN)))
def test_hand_written_config_reads_like_autoconfig(tmp_path, model_type, extra):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, **BARE, **extra}))
    assert_reads_like_autoconfig(str(tmp_path))


def _save(tmp_path, config: dict) -> str:
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


@pytest.mark.parametrize(
    "make",
    [
        lambda: transformers.Qwen2VLConfig(),
        lambda: transformers.LlavaConfig(),
        lambda: transformers.BertConfig(),
        lambda: transformers.WhisperConfig(),
        lambda: transformers.LlamaConfig(rope_parameters={"rope_type": "dynamic", "factor": 2.0}),
        lambda: transformers.Qwen2Config(partial_rotary_factor=0.5),
    ],
    ids=["qwen2_vl", "llava", "bert", "whisper", "unknown_rope", "partial_rotary"],
)
def test_other_configs_come_from_transformers(tmp_path, make):
    make().save_pretrained(tmp_path)
    cfg = load_config(str(tmp_path))
    assert not isinstance(cfg, TextConfig)
    assert type(cfg) is type(AutoConfig.from_pretrained(tmp_path))


@pytest.mark.parametrize(
    "extra",
    [
        {"quantization_config": {"quant_method": "fp8"}},
        {"layer_types": ["attention"] * 3},  # a legacy name transformers renames
        {"rope_scaling": {"rope_type": "yarn", "factor": 2.0}},
        {"rope_scaling": {"rope_type": "linear"}},  # no factor: transformers raises
        {"hidden_size": "64"},
        {"rms_norm_eps": 1},  # transformers' strict types refuse an int for a float
        {"hidden_act": None},
    ],
)
def test_configs_it_cannot_vouch_for_fall_back(tmp_path, monkeypatch, extra):
    path = _save(tmp_path, {"model_type": "llama", **BARE, **extra})
    monkeypatch.setattr(AutoConfig, "from_pretrained", lambda *a, **k: "from transformers")
    assert load_config(path) == "from transformers"


def test_unreadable_config_raises_transformers_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    assert_reads_like_autoconfig(str(tmp_path))


def test_missing_attribute_raises_attribute_error(tmp_path):
    cfg = load_config(_save(tmp_path, {"model_type": "qwen2", **BARE}))
    with pytest.raises(AttributeError):
        cfg.head_dim  # noqa: B018 -- Qwen2Config declares no head_dim
    assert getattr(cfg, "attention_bias", "absent") == "absent"


# -- tokenizer ------------------------------------------------------------------------------------

DECLARED = [
    "TokenizersBackend",
    "PreTrainedTokenizerFast",
    "GPT2Tokenizer",
    "GPT2TokenizerFast",
    "Qwen2Tokenizer",
    "Qwen2TokenizerFast",
    "LlamaTokenizerFast",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok"))
    make_tokenizer(path)
    return path


@pytest.mark.parametrize("model_type", list(CLASSES))
@pytest.mark.parametrize("declared", DECLARED)
def test_tokenizer_class_is_autotokenizers(tmp_path, tokenizer_dir, model_type, declared):
    path = str(tmp_path / "tok")
    shutil.copytree(tokenizer_dir, path)
    with open(os.path.join(path, "tokenizer_config.json")) as f:
        tokenizer_config = json.load(f)
    tokenizer_config["tokenizer_class"] = declared
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(tokenizer_config, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": model_type}, f)
    cls = tokenizer_class(path)
    expected = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if declared.startswith("Llama") or (model_type == "mistral" and find_spec("mistral_common")):
        assert cls is None  # AutoTokenizer looks into more files: left to it
        return
    assert cls is not None
    tok = cls.from_pretrained(path, local_files_only=True)
    assert type(tok) is type(expected)
    assert tokenizer_behaviour(tok) == tokenizer_behaviour(expected)


@pytest.mark.parametrize("name", sorted(LIGHT_TOKENIZERS))
def test_light_tokenizer_classes_import_neither_torch_nor_configuration_utils(name):
    code = (
        "import sys, transformers\n"
        f"assert getattr(transformers, {name!r}).__name__\n"
        "assert 'torch' not in sys.modules\n"
        "assert 'transformers.configuration_utils' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


NO_TORCH = r"""
import json, sys
from jaxmm.runner.checkpoint import load_tokenizer, open_checkpoint
from tests.helpers import tokenizer_behaviour
ck = open_checkpoint(sys.argv[1])
tok = load_tokenizer(ck)
assert "torch" not in sys.modules, "torch"
assert "transformers.configuration_utils" not in sys.modules, "configuration_utils"
print(json.dumps({"type": type(tok).__name__, "eos": ck.eos_token_ids, **tokenizer_behaviour(tok)}))
"""
ROOT = str(Path(__file__).resolve().parents[2])


def _run(script: str, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", script, *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_text_checkpoint_opens_without_torch(ckpt_root, arch):
    path = make_checkpoint(ckpt_root, arch)
    got = json.loads(_run(NO_TORCH, path))
    expected = AutoTokenizer.from_pretrained(path, local_files_only=True)
    assert got.pop("type") == type(expected).__name__
    assert got.pop("eos") == _eos_ids(path, AutoConfig.from_pretrained(path))
    assert got == json.loads(json.dumps(tokenizer_behaviour(expected)))


SERVER_FRONT_END = r"""
import sys
from jaxmm.engine.core_process import FrontendView, is_multimodal_checkpoint
from jaxmm.llm import engine_config
import jaxmm.server.app
assert not is_multimodal_checkpoint(sys.argv[1])
view = FrontendView(engine_config(model=sys.argv[1]))
assert view.tokenizer is not None
print(sorted({"torch", "transformers.configuration_utils"} & set(sys.modules)))
"""


def test_server_front_end_starts_without_torch(ckpt_root):
    """`jaxmm serve` of a text model: the server process reads config and tokenizer alone."""
    assert _run(SERVER_FRONT_END, make_checkpoint(ckpt_root, "llama")) == "[]"
