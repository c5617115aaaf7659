"""GGUF mixture-of-experts files (llama.cpp's `qwen3moe`, `qwen2moe`) against transformers.

A tiny random Qwen3-MoE or Qwen2-MoE, saved by transformers, is written as llama.cpp's
converter lays it out: router `ffn_gate_inp` (E, D), experts stacked per projection as
`ffn_{gate,up,down}_exps` (E, out, in), q/k norms (qwen3moe), the shared expert `ffn_*_shexp`
and its gate as a (D,) vector (qwen2moe), `{arch}.expert_*` metadata and the locally trained
tokenizer as `tokenizer.ggml.*`. jaxmm.LLM on that file gives transformers' greedy tokens
and logits on the weights transformers' own GGUF reader dequantizes from the same file
(experts in F32, F16, Q8_0 and Q4_0)."""

import json
import os

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as QT
from safetensors.numpy import load_file
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from jaxmm import LLM
from jaxmm.weights.gguf import load_gguf
from tests.helpers import CHAT_TEMPLATE, hf_greedy, make_tokenizer
from tests.models.test_qwen2_moe import make_qwen2_moe_checkpoint
from tests.models.test_qwen3_moe import (
    NEW_TOKENS,
    PROMPTS,
    _generate,
    _last_logits,
    make_moe_checkpoint,
)

# HF module -> llama.cpp's tensor name (gguf-py's tensor maps for qwen3moe, qwen2moe), per layer
LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate": "ffn_gate_inp",
    "mlp.gate_proj": "ffn_gate",  # a dense layer (mlp_only_layers)
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
    "mlp.shared_expert.up_proj": "ffn_up_shexp",
    "mlp.shared_expert.down_proj": "ffn_down_shexp",
    "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
}
TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
EXPERT_NAMES = {
    "gate_proj": "ffn_gate_exps",
    "up_proj": "ffn_up_exps",
    "down_proj": "ffn_down_exps",
}


def _gguf_tensors(hf: dict[str, np.ndarray], E: int) -> dict[str, np.ndarray]:
    """HF tensors (per-expert keys, as save_pretrained writes) -> llama.cpp's names, each
    layer's experts stacked into one (E, out, in) tensor per projection."""
    out = {}
    for key, value in hf.items():
        module, param = key.rsplit(".", 1)
        if module in TOP_NAMES:
            out[f"{TOP_NAMES[module]}.{param}"] = value
            continue
        _, _, layer, rest = module.split(".", 3)
        if rest.startswith("mlp.experts."):
            e, proj = rest.removeprefix("mlp.experts.").split(".")
            if e == "0":
                stack = [
                    hf[f"model.layers.{layer}.mlp.experts.{i}.{proj}.weight"] for i in range(E)
                ]
                out[f"blk.{layer}.{EXPERT_NAMES[proj]}.{param}"] = np.stack(stack)
            continue
        if rest == "mlp.shared_expert_gate":
            value = value[0]  # (1, D): llama.cpp's converter stores the vector
        out[f"blk.{layer}.{LAYER_NAMES[rest]}.{param}"] = value
    return out


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer_dir: str) -> None:
    """The locally trained byte-level BPE tokenizer as `tokenizer.ggml.*` (llama.cpp's `gpt2`
    model): tokens by id, merges, control tokens, BOS added as its post-processor does."""
    with open(os.path.join(tokenizer_dir, "tokenizer.json")) as f:
        spec = json.load(f)
    vocab = spec["model"]["vocab"] | {t["content"]: t["id"] for t in spec["added_tokens"]}
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    special = {t["id"] for t in spec["added_tokens"] if t["special"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    writer.add_token_merges(
        [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    )
    writer.add_bos_token_id(vocab["<s>"])
    writer.add_eos_token_id(vocab["</s>"])
    writer.add_pad_token_id(vocab["</s>"])
    writer.add_add_bos_token(True)
    writer.add_chat_template(CHAT_TEMPLATE)


def write_moe_gguf(hf_dir: str, path: str, qtypes: dict[str, QT]) -> dict[str, np.ndarray]:
    """Write the HF checkpoint `hf_dir` (Qwen3-MoE or Qwen2-MoE) as a `qwen3moe` / `qwen2moe`
    GGUF; tensors in F32 unless `qtypes` names another type. Returns the HF tensors."""
    with open(os.path.join(hf_dir, "config.json")) as f:
        cfg = json.load(f)
    hf = load_file(os.path.join(hf_dir, "model.safetensors"))
    E = cfg.get("num_experts") or cfg["num_local_experts"]  # the name transformers 5.24 saves
    arch = cfg["model_type"].replace("_", "")
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(f"tiny {arch}")
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    if "head_dim" in cfg:  # Qwen3's; Qwen2's is hidden / heads
        writer.add_key_length(cfg["head_dim"])
        writer.add_value_length(cfg["head_dim"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    writer.add_expert_count(E)
    writer.add_expert_used_count(cfg["num_experts_per_tok"])
    writer.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    if cfg.get("shared_expert_intermediate_size"):
        writer.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])
    writer.add_vocab_size(cfg["vocab_size"])
    _add_tokenizer(writer, hf_dir)
    for name, w in _gguf_tensors(hf, E).items():
        qtype = qtypes.get(name, QT.F32)
        stored = gguf.quants.quantize(w, qtype)
        writer.add_tensor(name, stored, raw_dtype=None if qtype in (QT.F32, QT.F16) else qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf


# experts quantized differently per layer; attention and embeddings partly too
QTYPES = {
    "blk.0.ffn_gate_exps.weight": QT.Q8_0,
    "blk.0.ffn_up_exps.weight": QT.Q8_0,
    "blk.0.ffn_down_exps.weight": QT.Q4_0,
    "blk.1.ffn_gate_exps.weight": QT.F16,
    "blk.1.ffn_down_exps.weight": QT.Q8_0,
    "blk.2.ffn_up_exps.weight": QT.Q4_0,
    "blk.0.attn_k.weight": QT.Q8_0,
    "blk.2.attn_q.weight": QT.F16,
    "token_embd.weight": QT.Q8_0,
    "blk.0.ffn_up_shexp.weight": QT.Q8_0,  # qwen2moe
    "blk.2.ffn_gate_shexp.weight": QT.F16,
}


VOCAB = 300  # the local tokenizer trained past its 262 byte and special tokens: it has merges


MAKERS = {"qwen3moe": make_moe_checkpoint, "qwen2moe": make_qwen2_moe_checkpoint}


def _checkpoint(root: str, arch: str, name: str, **overrides) -> str:
    """test_qwen3_moe's / test_qwen2_moe's tiny model with a tokenizer that has BPE merges, as
    real files do."""
    path = MAKERS[arch](root, name, vocab_size=VOCAB, **overrides)
    assert len(make_tokenizer(path, VOCAB)) == VOCAB
    return path


@pytest.mark.parametrize("arch", ["qwen3moe", "qwen2moe"])
def test_gguf_matches_transformers(ckpt_root, tmp_path, arch):
    # every layer MoE, as llama.cpp's graphs have it; expert width 32 (quantized rows are
    # whole 32-value blocks)
    hf_dir = _checkpoint(
        ckpt_root, arch, f"{arch}_gguf", mlp_only_layers=[], moe_intermediate_size=32
    )
    path = str(tmp_path / f"tiny-{arch}.gguf")
    write_moe_gguf(hf_dir, path, QTYPES)
    hf_config = transformers.AutoConfig.from_pretrained(hf_dir)

    # transformers' own GGUF reader dequantizes the same file: the reference weights
    model = getattr(transformers, hf_config.architectures[0])(hf_config)
    ref = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    assert set(ref) == set(model.state_dict())
    model.load_state_dict(ref, strict=True)
    ref_dir = str(tmp_path / "reference")
    model.eval().save_pretrained(ref_dir)

    ckpt = load_gguf(path)
    cfg = ckpt.hf_config
    assert cfg.architectures == hf_config.architectures
    for field in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "head_dim",
                  "shared_expert_intermediate_size", "norm_topk_prob", "qkv_bias",
                  "num_key_value_heads", "intermediate_size", "tie_word_embeddings"):  # fmt: skip
        assert getattr(cfg, field, None) == getattr(hf_config, field, None), field
    assert cfg.norm_topk_prob == (arch == "qwen3moe")  # as llama.cpp's graphs route
    assert cfg.mlp_only_layers == [] and cfg.decoder_sparse_step == 1
    ours = dict(ckpt.tensors())
    assert list(ours) == ckpt.keys()
    assert "model.layers.0.mlp.experts.3.down_proj.weight" in ours
    for key, value in ref.items():  # transformers keeps experts fused: (E, 2F, D), (E, D, F)
        *layer, kind = key.split(".mlp.experts.")
        if not layer:
            np.testing.assert_array_equal(ours[key], value.numpy(), err_msg=key)
            continue
        projs = ["gate_proj", "up_proj"] if kind == "gate_up_proj" else ["down_proj"]
        experts = [
            np.stack([ours[f"{layer[0]}.mlp.experts.{e}.{p}.weight"] for e in range(4)])
            for p in projs
        ]
        np.testing.assert_array_equal(np.concatenate(experts, 1), value.numpy(), err_msg=key)

    llm = LLM(path, dtype="float32", max_model_len=256, max_num_batched_tokens=256)
    tok = llm.get_tokenizer()
    local = transformers.AutoTokenizer.from_pretrained(hf_dir)
    ids = [tok(p).input_ids for p in PROMPTS]
    assert ids == [local(p).input_ids for p in PROMPTS]  # the file's tokenizer is the local one
    assert _generate(llm, ids) == hf_greedy(ref_dir, ids, NEW_TOKENS)
    with torch.no_grad():
        logits = np.stack([model(torch.tensor([i])).logits[0, -1].numpy() for i in ids])
    np.testing.assert_allclose(_last_logits(llm, ids), logits, atol=1e-4, rtol=0)


def test_dense_layers_and_per_expert_tensors(ckpt_root, tmp_path):
    """A layer without a router is a dense MLP (`mlp_only_layers`); F32 tensors come back as
    exactly the per-expert tensors save_pretrained wrote."""
    hf_dir = _checkpoint(ckpt_root, "qwen3moe", "qwen3moe_gguf_dense")  # layer 1 dense
    path = str(tmp_path / "dense-layer.gguf")
    hf = write_moe_gguf(hf_dir, path, {})
    ckpt = load_gguf(path)
    assert ckpt.hf_config.mlp_only_layers == [1]
    assert ckpt.hf_config.moe_intermediate_size == 24
    assert ckpt.tokenizer("Hello, my name is").input_ids[0] == 0  # <s>, as add_bos_token says
    ours = dict(ckpt.tensors())
    assert set(ours) == set(hf)
    for key, value in hf.items():
        np.testing.assert_array_equal(ours[key], value, err_msg=key)


def _expert_file(path: str, arch: str) -> None:
    """A minimal file of `arch` with one layer's stacked experts."""
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    writer.add_tensor("blk.0.ffn_gate_inp.weight", np.zeros((4, 32), np.float32))
    writer.add_tensor("blk.0.ffn_gate_exps.weight", np.zeros((4, 16, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch", ["llama", "deepseek2"])
def test_unsupported_moe_architecture(tmp_path, arch):
    """Mixtral comes as `llama` with experts; deepseek2 is a MoE architecture jaxmm does not
    read: both refused, naming the MoE architectures it does read."""
    path = str(tmp_path / f"{arch}.gguf")
    _expert_file(path, arch)
    with pytest.raises(ValueError, match=f"GGUF architecture '{arch}'") as err:
        load_gguf(path)
    assert "mixture-of-experts: ['qwen2moe', 'qwen3moe']" in str(err.value)
    assert "mixture-of-experts tensors (blk.0.ffn_gate_exps.weight" in str(err.value)
