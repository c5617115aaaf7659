"""Gemma 3 parity with transformers on tiny random checkpoints (float32), and its SigLIP tower.

The SigLIP tower is checked alone against `transformers.SiglipVisionModel` (its hidden states
and `last_hidden_state`), through the same loader rules a model holding it uses.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch


def _randomize(model, seed: int) -> None:
    """Larger-than-default weights so greedy paths are not dominated by ties."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.08 if p.dim() > 1 else 0.5)
            if p.dim() == 1 and "norm" in name and name.endswith("weight"):
                p.abs_().add_(0.5)


def _siglip_config(**kw):
    import transformers

    base = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=28,
        patch_size=7,
        vision_use_head=False,
    )
    return transformers.SiglipVisionConfig(**(base | kw))


@pytest.mark.parametrize("use_head", [False, True])
def test_siglip_tower_matches_transformers(use_head):
    import jax
    import transformers
    from flax import nnx

    from jaxmm.models.encoders import siglip
    from jaxmm.runner.model_runner import make_mesh
    from jaxmm.weights.loader import load_params

    cfg = _siglip_config(vision_use_head=use_head)
    hf = transformers.SiglipVisionModel(cfg).eval()
    _randomize(hf, 3)

    class Owner(nnx.Module):  # a model holding the tower at "vision_tower"
        hf_key_rules = siglip.hf_key_rules("vision_tower")
        ignored_hf_keys = siglip.ignored_hf_keys("vision_tower")

        def __init__(self):
            self.vision_tower = siglip.SiglipVisionModel(cfg, rngs=nnx.Rngs(0))

    owner = nnx.eval_shape(Owner)
    graphdef, abstract = nnx.split(owner)
    # the hub's spelling: vision_tower.vision_model.*
    tensors = [(f"vision_tower.vision_model.{k}", v.numpy()) for k, v in hf.state_dict().items()]
    model = nnx.merge(graphdef, load_params(owner, abstract, tensors, make_mesh(1), None))

    pixels = np.random.RandomState(0).standard_normal((2, 3, 28, 28)).astype(np.float32)
    with torch.no_grad():
        ref = hf(torch.tensor(pixels), output_hidden_states=True)
    states = jax.jit(lambda x: model.vision_tower(x, num_states=3))(pixels)
    assert len(states) == 3
    for got, want in zip(states, ref.hidden_states[:3]):
        np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-5, rtol=0)
    last = jax.jit(model.vision_tower.last_hidden_state)(pixels)
    np.testing.assert_allclose(np.asarray(last), ref.last_hidden_state.numpy(), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------
# Gemma3ForCausalLM

WINDOW = 8  # sliding window of the local layers: every long prompt here leaves it
NEW_TOKENS = 12


def _text_config(tok, **kw) -> dict:
    return dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=24,  # not head_dim: the scale must come from it
        sliding_window=WINDOW,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 1
        + ["sliding_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
        },
        final_logit_softcapping=3.0,  # small enough to bend the logits
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **kw,
    )


def make_gemma3_text(root: str) -> str:
    import os

    import transformers

    from tests.helpers import make_tokenizer

    path = os.path.join(root, "gemma3_text")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    tok = make_tokenizer(path)
    cfg = transformers.Gemma3TextConfig(**_text_config(tok))
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    _randomize(model, 0)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gemma3_text(ckpt_root):
    return make_gemma3_text(ckpt_root)


TEXT_PROMPTS = [
    "Hello, my name is",
    "The capital of France is Paris. The capital of Italy",
    "Once upon a time there was a small model that generated tokens one by one and",
]


RING_TOKENS = 32  # >= window + step budget - 1 = 23; the prompts below wrap the ring


def scratch_tables(runner, n: int, top: int) -> tuple[list[int], list[list[int]] | None]:
    """A sequence's page tables of n pages each from the top of the pool down (pages top - n
    + 1 .. top for group 0, the next n below for group 1...): (block_table, group_tables)."""
    groups = len(runner.kv_group_windows)
    tables = [list(range(top - (g + 1) * n + 1, top - g * n + 1)) for g in range(groups)]
    return tables[0], (tables[1:] or None)


@pytest.mark.parametrize("local_kv", ["paged", "reclaim", "ring"])
def test_text_greedy_and_logits_match_transformers(gemma3_text, local_kv, monkeypatch):
    import math

    from jaxmm import LLM, SamplingParams
    from jaxmm.models.gemma3 import LOCAL_KV_ENV, RECLAIM_ENV
    from jaxmm.runner.model_runner import SeqStep
    from tests.helpers import hf_greedy

    if local_kv == "ring":
        monkeypatch.setenv(LOCAL_KV_ENV, str(RING_TOKENS))
    elif local_kv == "paged":
        monkeypatch.setenv(RECLAIM_ENV, "0")
    # 16 tokens a step: the long prompts prefill in chunks, each past the window
    llm = LLM(gemma3_text, dtype="float32", max_model_len=256, max_num_batched_tokens=16)
    tok = llm.get_tokenizer()
    ids = [tok(p).input_ids for p in TEXT_PROMPTS]
    ids.append(ids[2] + ids[1])  # longer than the ring at the start of its prefill
    assert max(len(i) for i in ids) > RING_TOKENS + 16
    runner = llm.llm_engine.runner
    if local_kv == "ring":
        # pages for the one global layer only; each local layer a fixed ring per sequence,
        # whatever the context: KV per token stops growing for local layers
        assert runner.num_layers == 1 and runner.num_state_slots == runner.max_num_seqs
        rings = runner.kv_caches[1:]
        assert len(rings) == 3 and rings[0].shape[1:] == (2, 2, RING_TOKENS // 16, 16, 16)
    elif local_kv == "reclaim":
        # one array per layer of the largest group (the one global layer's group); each
        # local layer a page group of its own, giving pages back behind its window
        assert runner.num_layers == 1 and runner.num_state_slots == 0
        assert runner.kv_group_windows == (None, 8, 8, 8)
    else:
        assert runner.num_layers == 4 and runner.kv_group_windows == (None,)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": i} for i in ids], params, use_tqdm=False)
    ours = [o.outputs[0].token_ids for o in outs]
    assert ours == hf_greedy(gemma3_text, ids, NEW_TOKENS)
    assert any(len(set(t)) > 2 for t in ours)  # not a degenerate model

    import transformers

    hf = transformers.Gemma3ForCausalLM.from_pretrained(gemma3_text, dtype=torch.float32).eval()
    page, got, want = runner.num_pages - 1, [], []
    for i in ids:  # one sequence per call, scratch pages from the top of the pool
        n = math.ceil(len(i) / runner.block_size)
        table, groups = scratch_tables(runner, n, page)
        for start in range(0, len(i), 16):  # the step budget: chunks, as the engine runs them
            chunk = i[start : start + 16]
            step = SeqStep(chunk, start, table, sample=start + len(chunk) == len(i))
            step.group_tables = groups
            last = runner.logits([step])
        got.append(last)
        page -= n * len(runner.kv_group_windows)
        with torch.no_grad():
            want.append(hf(torch.tensor([i])).logits[0, -1].numpy())
    np.testing.assert_allclose(np.concatenate(got), np.stack(want), atol=1e-4, rtol=0)


def test_window_pages_given_back_and_reused_in_a_small_pool(gemma3_text):
    """Local layers' pages behind the window go back to the pool while their sequence runs,
    and other sequences write into them: exact tokens still, in a pool far smaller than
    every layer keeping every page would need."""
    from jaxmm import LLM, SamplingParams
    from tests.helpers import hf_greedy

    P = 40
    llm = LLM(
        gemma3_text,
        dtype="float32",
        max_model_len=256,
        max_num_batched_tokens=16,
        num_gpu_blocks_override=P,
    )
    bm = llm.llm_engine.block_manager
    tok = llm.get_tokenizer()
    base = [tok(p).input_ids for p in TEXT_PROMPTS]
    n = len(base)
    ids = [base[i % n] + base[(i + 1) % n] + base[(i + 2) % n] for i in range(4)]
    held, ensure = [], bm.ensure_slots

    def spy(seq, num_tokens):
        ok = ensure(seq, num_tokens)
        held.append((len(seq.block_table), bm.pages_held(seq) - len(seq.block_table)))
        return ok

    bm.ensure_slots = spy
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": i} for i in ids], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(gemma3_text, ids, NEW_TOKENS)
    # three local groups, each at most window (8) + a step (16) in pages of 16, plus one
    assert max(local for _, local in held) <= 3 * 3
    assert max(g for g, _ in held) >= 6  # long sequences: the global group kept growing
    # every layer paged for the whole context would have needed 4 pages per token page
    assert sum(4 * -(-(len(i) + NEW_TOKENS) // 16) for i in ids) > 3 * P
    assert bm.num_free_blocks == P


# ---------------------------------------------------------------------------------------
# Gemma3ForConditionalGeneration

BOI, EOI, SOFT = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
IMAGE_TOKENS = 16  # 8 x 8 SigLIP patches, pooled 2 x 2; longer than the window
BUDGET = 32  # tokens per step: an image never fits twice, chunks meet image boundaries


def make_gemma3_vlm(root: str) -> str:
    import os

    import transformers
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    from tests.helpers import make_tokenizer

    path = os.path.join(root, "gemma3_vlm")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    make_tokenizer(path).add_special_tokens({"additional_special_tokens": [BOI, EOI, SOFT]})
    base = transformers.PreTrainedTokenizerFast.from_pretrained(path)
    base.add_special_tokens({"additional_special_tokens": [BOI, EOI, SOFT]})
    base.save_pretrained(path)
    named = {"boi_token": BOI, "eoi_token": EOI, "image_token": SOFT}
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(path, extra_special_tokens=named)
    ip = Gemma3ImageProcessorPil(size={"height": 56, "width": 56})
    transformers.Gemma3Processor(
        image_processor=ip, tokenizer=tok, image_seq_length=IMAGE_TOKENS
    ).save_pretrained(path)
    cfg = transformers.Gemma3Config(
        text_config=_text_config(tok),
        vision_config=_siglip_config(image_size=56, num_hidden_layers=2).to_dict(),
        mm_tokens_per_image=IMAGE_TOKENS,
        boi_token_index=tok.boi_token_id,
        eoi_token_index=tok.eoi_token_id,
        image_token_index=tok.image_token_id,
    )
    model = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    _randomize(model, 1)
    model.save_pretrained(path)
    return path


def _image(h: int, w: int, seed: int):
    from PIL import Image

    rs = np.random.RandomState(seed)
    base = rs.randint(0, 255, (h // 4 + 1, w // 4 + 1, 3), np.uint8)  # blocky, not pure noise
    return Image.fromarray(base).resize((w, h), Image.NEAREST)


IMAGES = [_image(40, 50, 0), _image(56, 56, 1), _image(33, 47, 2)]
VLM_PROMPTS = [
    {"prompt": "Once upon a time there was"},
    {"prompt": f"{BOI}Describe the image.", "multi_modal_data": {"image": IMAGES[0]}},
    {
        "prompt": f"Hello {BOI} and {BOI} what is this",
        "multi_modal_data": {"image": [IMAGES[1], IMAGES[2]]},
    },
]


@pytest.fixture(scope="module", params=["reclaim", "ring"])
def gemma3_vlm(request, ckpt_root):
    """(path, LLM, HF model); "reclaim": local layers in page groups that give pages back
    behind the window (the default); "ring": local layers on rings of 48 tokens (window 8 +
    a step of 32 - 1 = 39 needed), which the two-image prompt and its output wrap."""
    import transformers

    from jaxmm import LLM
    from jaxmm.models.gemma3 import LOCAL_KV_ENV

    path = make_gemma3_vlm(ckpt_root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(LOCAL_KV_ENV, "48" if request.param == "ring" else "0")
        llm = LLM(path, dtype="float32", max_model_len=256, max_num_batched_tokens=BUDGET)
    assert llm.llm_engine.runner.num_layers == 1
    groups = llm.llm_engine.runner.kv_group_windows
    assert groups == ((None,) if request.param == "ring" else (None, 8, 8, 8))
    hf = transformers.Gemma3ForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    return path, llm, hf.eval()


def _hf_inputs(path: str, prompt: dict) -> dict:
    import transformers

    proc = transformers.AutoProcessor.from_pretrained(path)
    images = prompt.get("multi_modal_data", {}).get("image")
    if images is None:
        return dict(proc.tokenizer(prompt["prompt"], return_tensors="pt"))
    images = images if isinstance(images, list) else [images]
    return dict(proc(text=prompt["prompt"], images=images, return_tensors="pt"))


def _chunks(n: int, items) -> list[tuple[int, int]]:
    """Chunks of at most BUDGET tokens that never end inside an item (as the scheduler)."""
    out, start = [], 0
    while start < n:
        end = min(start + BUDGET, n)
        for it in items:
            if it.start < end < it.end:
                end = it.start
        out.append((start, end))
        start = end
    return out


def test_vlm_greedy_and_logits_match_transformers(gemma3_vlm):
    from jaxmm import SamplingParams
    from jaxmm.multimodal.inputs import prepare_multimodal_prompt
    from jaxmm.runner.model_runner import SeqStep

    path, llm, hf = gemma3_vlm
    engine = llm.llm_engine
    assert engine.runner.model_obj.mm_whole_items
    # the engine hands the model's flag to its scheduler (llm_engine.py)
    assert engine.scheduler.whole_mm_items
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate(VLM_PROMPTS, params, use_tqdm=False)
    hf_inputs = [_hf_inputs(path, p) for p in VLM_PROMPTS]
    for out, inputs in zip(outs, hf_inputs):
        assert out.prompt_token_ids == inputs["input_ids"][0].tolist()
        with torch.no_grad():
            ref = hf.generate(
                **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None
            )
        assert out.outputs[0].token_ids == ref[0, inputs["input_ids"].shape[1] :].tolist()
    assert any(len(set(o.outputs[0].token_ids)) > 2 for o in outs)
    assert len(outs[2].prompt_token_ids) > BUDGET  # the two-image prompt is chunked

    # last-token logits, prefilled in chunks that meet image boundaries (scratch pages)
    runner, rows = engine.runner, []
    for p in VLM_PROMPTS:
        if "multi_modal_data" in p:
            _, ids, mm = prepare_multimodal_prompt(engine, p)
        else:
            ids, mm = llm.get_tokenizer()(p["prompt"]).input_ids, None
        items = mm.items if mm is not None else []
        rows_of = {}
        for it in items:
            entry = engine.encoder_cache.get(it.cache_key) or engine.encoder_cache.allocate(
                it.cache_key, it.end - it.start, "t"
            )
            rows_of[it.cache_key] = entry.rows
            runner.encode([(it.modality, it.data, entry.rows)])
        n = -(-len(ids) // runner.block_size)
        pages, groups = scratch_tables(runner, n, runner.num_pages - 1)
        for start, end in _chunks(len(ids), items):
            step = SeqStep(ids[start:end], start, pages, sample=end == len(ids))
            step.group_tables = groups
            step.mm_rows = [
                (max(it.start, start) - start, rows_of[it.cache_key][a - it.start : b - it.start])
                for it in items
                for a, b in [(max(it.start, start), min(it.end, end))]
                if a < b
            ]
            last = runner.logits([step])[0]
        rows.append(last)
    with torch.no_grad():
        ref = np.stack([hf(**inputs).logits[0, -1].numpy() for inputs in hf_inputs])
    np.testing.assert_allclose(np.stack(rows), ref, atol=1e-4, rtol=0)


def test_scheduler_never_ends_a_chunk_inside_an_image():
    from jaxmm.engine.block_manager import BlockManager
    from jaxmm.engine.encoder_cache import EncoderCacheManager
    from jaxmm.engine.scheduler import Scheduler
    from jaxmm.engine.sequence import Sequence

    def first_chunks(whole: bool, spans) -> list[int]:
        cache = EncoderCacheManager(64, block_rows=4)
        sched = Scheduler(8, 16, BlockManager(64, 4), encoder_cache=cache, whole_mm_items=whole)
        s = Sequence(request_id="r", token_ids=list(range(40)), num_prompt_tokens=40)
        s.mm_spans = tuple(spans)
        sched.add(s)
        sizes = []
        while s.num_computed_tokens < len(s):
            batch = sched.schedule()
            for _, key in batch.encoder_items:
                cache.entries[key].ready = True
            n = batch.num_new_tokens[0] if batch.seqs else 0
            s.num_computed_tokens += n
            sched.release_items(s, upto=s.num_computed_tokens)
            sizes.append(n)
        return sizes

    spans = [(10, 22, "image:x"), (22, 34, "image:y")]  # two 12-token images back to back
    assert first_chunks(False, spans) == [16, 16, 8]
    assert first_chunks(True, spans) == [10, 12, 16, 2]
    # an image longer than any step is split after all (no wait forever)
    assert first_chunks(True, [(4, 30, "image:z")]) == [4, 16, 16, 4]


@pytest.mark.parametrize("local_kv", ["ring", "groups"])
def test_gemma_ttft_benchmark_smoke(tmp_path, capsys, monkeypatch, local_kv):
    import json

    from benchmarks import gemma_ttft
    from jaxmm.models.gemma3 import LOCAL_KV_ENV

    monkeypatch.setenv(LOCAL_KV_ENV, "0")  # main() sets it: unset again afterwards

    argv = ["--config", "small", "--iters", "1", "--device", "cpu", "--decode-tokens", "2", "4"]
    argv += ["--max-num-batched-tokens", "64", "--context", "256"]
    if local_kv == "ring":  # local layers on rings of window (16) + one step (64) tokens
        argv += ["--local-kv-tokens", "80"]
    results = gemma_ttft.main(argv + ["--workdir", str(tmp_path)])
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()[-2:]]
    assert lines == results
    ttft, decode = results
    assert ttft["num_image_tokens"] == 16 and ttft["num_prompt_tokens"] > 16
    for key in ("preprocess_s", "encoder_s", "prefill_s", "e2e_s", "hf_e2e_s"):
        assert ttft[key] > 0, key
    # a few tokens on a shared CPU: the time per token is noise here, only its presence counts
    assert isinstance(decode["engine_ms_per_token"], float)
    assert decode["roofline_ms_per_token"] > 0 and decode["language_weight_bytes"] > 0
    # 6 layers, one global: 5 local layers hold window (16) + one chunk (64) of 256 tokens
    assert ttft["kv_layers_global"] == 1 and ttft["kv_layers_local"] == 5
    per_layer = 2 * 2 * 16 * 2
    assert ttft["kv_bytes_per_token_full_layout"] == 6 * per_layer
    if local_kv == "ring":
        assert ttft["kv_bytes_per_token_windowed"] == round(per_layer * (1 + 5 * 80 / 256))
        assert ttft["kv_bytes_per_token_measured"] == ttft["kv_bytes_per_token_windowed"]
        return
    # page groups: the global layer's group and five local groups of one layer, over one
    # array; the last step computes position 255 (255 prompt tokens, a second output token):
    # 16 global pages of 16 tokens, and per local group the page of positions 240 to 255, the
    # window (16) that query reads
    assert ttft["kv_page_groups"] == 6 and ttft["kv_page_arrays"] == 1
    assert ttft["kv_pages_held_at_context"] == 16 + 5 * 1
    page = 16 * per_layer
    assert ttft["kv_bytes_per_token_page_groups"] == round(21 * page / 256)
    assert ttft["kv_local_pages_max_per_group"] == -(-(16 + 64) // 16) + 1


def test_image_steps_under_a_kernel_backend(monkeypatch):
    """The VLM on a kernel backend (Pallas, interpret mode here; the parity tests run XLA):
    a step with image tokens runs every layer on the XLA path with the mask, a step without
    them on the kernel, one `lax.cond` per step; both agree with the XLA backend's model."""
    import functools

    import jax
    import jax.numpy as jnp
    import transformers
    from flax import nnx

    from jaxmm.layers.attention import AttentionMetadata
    from jaxmm.models.gemma3 import LOCAL_KV_ENV, RECLAIM_ENV, Gemma3ForConditionalGeneration

    monkeypatch.setenv(LOCAL_KV_ENV, "0")  # every layer paged, one page table
    monkeypatch.setenv(RECLAIM_ENV, "0")
    IMG = 60

    class Tok:  # what _text_config reads of a tokenizer
        bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

        def __len__(self):
            return 64

    text = _text_config(Tok())
    text.update(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"])
    cfg = transformers.Gemma3Config(
        text_config=text,
        vision_config=_siglip_config(num_hidden_layers=1).to_dict(),
        mm_tokens_per_image=4,
        boi_token_index=61,
        eoi_token_index=62,
        image_token_index=IMG,
    )
    models = {
        b: Gemma3ForConditionalGeneration(cfg, attention_backend=b, rngs=nnx.Rngs(0))
        for b in ("xla", "pallas")
    }
    graphdefs = {b: nnx.split(m)[0] for b, m in models.items()}
    state = nnx.split(models["xla"])[1]
    leaves, treedef = jax.tree_util.tree_flatten(state)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    leaves = [0.3 * jax.random.normal(kk, x.shape, x.dtype) for kk, x in zip(keys, leaves)]
    state = jax.tree_util.tree_unflatten(treedef, leaves)

    @functools.partial(jax.jit, static_argnums=0)
    def run(backend, ids, pages, md):
        model = nnx.merge(graphdefs[backend], state)
        hidden, _ = model(ids, [pages, pages], md)
        return hidden

    T, G = 16, 4
    md = AttentionMetadata(
        positions=jnp.arange(T, dtype=jnp.int32),
        kv_lens=jnp.array([T], jnp.int32),
        page_indices=jnp.arange(4, dtype=jnp.int32)[None],
        cu_q_lens=jnp.array([0, T], jnp.int32),
        num_seqs=jnp.array([1], jnp.int32),
        logits_indices=jnp.array([T - 1], jnp.int32),
    )
    pages = jnp.zeros((2, 2, 5, G, 16), jnp.float32)
    text_ids = jnp.arange(3, 3 + T, dtype=jnp.int32)
    image_ids = text_ids.at[5:9].set(IMG)  # one image of 4 tokens in the prefill
    for ids in (text_ids, image_ids):
        want = run("xla", ids, pages, md)
        got = run("pallas", ids, pages, md)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4)
