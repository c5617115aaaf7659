"""Gemma 4 parity with transformers on tiny random checkpoints (float32).

Text: two configs between them cover what Gemma 4 adds to Gemma 3: per-layer head sizes and
KV heads (global layers wider, `attention_k_eq_v`), proportional RoPE, per-layer inputs,
KV sharing (the last layers read their producer's pages and own none), and the MoE block
beside the dense MLP with a double-wide MLP on shared layers. Prompts run past the sliding
window and prefill in chunks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.models.test_gemma3 import _randomize

WINDOW = 8  # sliding window of the local layers: the long prompts leave it
NEW_TOKENS = 10
BUDGET = 16  # tokens per step: long prompts prefill in chunks
S, F = "sliding_attention", "full_attention"


def _text_config(tok, variant: str) -> dict:
    base = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=WINDOW,
        final_logit_softcapping=5.0,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    if variant == "shared":  # per-layer shapes, PLE, K = V, KV sharing
        return base | dict(
            num_hidden_layers=5,
            layer_types=[S, F, S, S, F],
            global_head_dim=32,
            attention_k_eq_v=True,
            num_global_key_value_heads=1,
            num_kv_shared_layers=2,
            hidden_size_per_layer_input=8,
            vocab_size_per_layer_input=len(tok),
            rope_parameters={
                S: {"rope_type": "default", "rope_theta": 10_000.0},
                F: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6},
            },
        )
    return base | dict(  # "moe": experts beside the MLP, double-wide MLP on shared layers
        num_hidden_layers=4,
        layer_types=[S, F, S, F],
        global_head_dim=24,
        num_kv_shared_layers=1,
        use_double_wide_mlp=True,
        # transformers' generate needs PLE where layers share KV (its slicing reads them)
        hidden_size_per_layer_input=4,
        vocab_size_per_layer_input=len(tok),
        enable_moe_block=True,
        num_experts=4,
        top_k_experts=2,
        moe_intermediate_size=32,
        rope_parameters={
            S: {"rope_type": "default", "rope_theta": 10_000.0},
            F: {"rope_type": "proportional", "partial_rotary_factor": 0.5, "rope_theta": 1e4},
        },
    )


def make_gemma4_text(root: str, variant: str) -> str:
    import os

    import transformers

    from tests.helpers import make_tokenizer

    path = os.path.join(root, f"gemma4_text_{variant}")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    tok = make_tokenizer(path)
    cfg = transformers.Gemma4TextConfig(**_text_config(tok, variant))
    model = transformers.Gemma4ForCausalLM(cfg).eval()
    _randomize(model, 0)
    with torch.no_grad():  # layer scalars are buffers: away from one, to be seen
        for i, layer in enumerate(model.model.layers):
            layer.layer_scalar.fill_(0.8 + 0.1 * i)
            if cfg.enable_moe_block:
                layer.router.per_expert_scale.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return path


TEXT_PROMPTS = [
    "Hello, my name is",
    "The capital of France is Paris. The capital of Italy",
    "Once upon a time there was a small model that generated tokens one by one and",
]


RING_TOKENS = 32  # >= window + step budget - 1 = 23; the long prompts wrap the ring


@pytest.mark.parametrize(
    "variant,local_kv", [("shared", "paged"), ("shared", "ring"), ("moe", "paged")]
)
def test_text_greedy_and_logits_match_transformers(ckpt_root, variant, local_kv, monkeypatch):
    import math

    import transformers

    from jaxmm import LLM, SamplingParams
    from jaxmm.models.gemma3 import LOCAL_KV_ENV
    from jaxmm.runner.model_runner import SeqStep
    from tests.helpers import hf_greedy

    path = make_gemma4_text(ckpt_root, variant)
    monkeypatch.setenv(LOCAL_KV_ENV, str(RING_TOKENS) if local_kv == "ring" else "0")
    llm = LLM(path, dtype="float32", max_model_len=256, max_num_batched_tokens=BUDGET)
    tok = llm.get_tokenizer()
    ids = [tok(p).input_ids for p in TEXT_PROMPTS]
    ids.append(ids[2] + ids[1])
    assert max(len(i) for i in ids) > WINDOW + BUDGET
    runner = llm.llm_engine.runner
    if local_kv == "ring":
        assert max(len(i) for i in ids) > RING_TOKENS + BUDGET  # wraps the ring
        # pages for the one global layer computing K/V (layer 4 reads layer 1's); the two
        # local ones (0 and 2; layer 3 reads layer 0's) a fixed ring per sequence, whatever
        # the context: KV per token stops growing for local layers
        assert runner.num_layers == 1 and runner.num_state_slots == runner.max_num_seqs
        assert runner.kv_caches[0].shape[1::3] == (1, 32)
        rings = runner.kv_caches[1:]
        assert [r.shape[1:] for r in rings] == [(2, 2, RING_TOKENS // 16, 16, 16)] * 2
    elif variant == "shared":
        # layers 3 and 4 read layers 0 and 1's pages: three page pools, each its own shape
        # (global layers: one KV head of 32, local ones two of 16)
        assert runner.num_layers == 3 and runner.num_state_slots == 0
        shapes = [tuple(c.shape[i] for i in (1, 4)) for c in runner.kv_caches[:3]]
        assert shapes == [(2, 16), (1, 32), (2, 16)]
    else:
        assert runner.num_layers == 3
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": i} for i in ids], params, use_tqdm=False)
    ours = [o.outputs[0].token_ids for o in outs]
    assert ours == hf_greedy(path, ids, NEW_TOKENS)
    assert any(len(set(t)) > 2 for t in ours)  # not a degenerate model

    hf = transformers.Gemma4ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    page, got, want = runner.num_pages - 1, [], []
    for i in ids:  # one sequence per call, scratch pages from the top of the pool
        n = math.ceil(len(i) / runner.block_size)
        table = list(range(page - n + 1, page + 1))
        for start in range(0, len(i), BUDGET):  # chunks, as the engine runs them
            chunk = i[start : start + BUDGET]
            step = SeqStep(chunk, start, table, sample=start + len(chunk) == len(i))
            last = runner.logits([step])
        got.append(last)
        page -= n
        with torch.no_grad():
            want.append(hf(torch.tensor([i])).logits[0, -1].numpy())
    np.testing.assert_allclose(np.concatenate(got), np.stack(want), atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------
# Gemma4ForConditionalGeneration

SPECIALS = {  # the names Gemma4Processor reads off its tokenizer
    "image_token": "<|image|>",
    "boi_token": "<|image>",
    "eoi_token": "<image|>",
    "audio_token": "<|audio|>",
    "boa_token": "<|audio>",
    "eoa_token": "<audio|>",
}
MAX_SOFT_TOKENS = 70  # the smallest budget the image processor takes: <= 70 tokens an image


def _video_processor():
    """Gemma4VideoProcessor needs torchvision to import; without it a stand-in of the same
    name on transformers' base class (no video is processed here)."""
    try:
        from transformers.models.gemma4.video_processing_gemma4 import Gemma4VideoProcessor

        return Gemma4VideoProcessor(patch_size=4, pooling_kernel_size=3)
    except (ImportError, NameError):  # NameError: 5.24's module fails on a torchvision name
        pass
    from transformers.video_processing_utils import BaseVideoProcessor

    class Gemma4VideoProcessor(BaseVideoProcessor):
        model_input_names = ["pixel_values_videos", "video_position_ids"]

    return Gemma4VideoProcessor()


def make_gemma4_processor(path: str):
    """Gemma4Processor (tokenizer with Gemma 4's special tokens, PIL image processor at
    patch 4, pooling 3, 70 soft tokens), saved with `save_pretrained`; returns it."""
    import transformers
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    from tests.helpers import make_processor, make_tokenizer

    specials = list(SPECIALS.values())
    make_tokenizer(path).add_special_tokens({"additional_special_tokens": specials})
    base = transformers.PreTrainedTokenizerFast.from_pretrained(path)
    base.add_special_tokens({"additional_special_tokens": specials})
    base.save_pretrained(path)
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(path, extra_special_tokens=SPECIALS)
    ip = Gemma4ImageProcessorPil(patch_size=4, pooling_kernel_size=3, max_soft_tokens=70)
    proc = make_processor(
        transformers.Gemma4Processor,
        feature_extractor=Gemma4AudioFeatureExtractor(),
        image_processor=ip,
        tokenizer=tok,
        video_processor=_video_processor(),
        image_seq_length=MAX_SOFT_TOKENS,
    )
    proc.save_pretrained(path)
    return proc


def _vision_config():
    import transformers

    return transformers.Gemma4VisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        patch_size=4,
        pooling_kernel_size=3,
        position_embedding_size=64,
        use_clipped_linears=True,
        standardize=True,
    )


def make_gemma4_vlm(root: str, bidirectional: bool) -> str:
    import os

    import transformers

    path = os.path.join(root, f"gemma4_vlm_{'bidir' if bidirectional else 'causal'}")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    proc = make_gemma4_processor(path)
    tok = proc.tokenizer
    text = _text_config(tok, "shared") | dict(vocab_size=len(tok))
    if bidirectional:
        text["use_bidirectional_attention"] = "vision"
    cfg = transformers.Gemma4Config(
        text_config=text,
        vision_config=_vision_config().to_dict(),
        boi_token_id=tok.convert_tokens_to_ids(SPECIALS["boi_token"]),
        eoi_token_id=tok.convert_tokens_to_ids(SPECIALS["eoi_token"]),
        image_token_id=tok.convert_tokens_to_ids(SPECIALS["image_token"]),
        video_token_id=tok.convert_tokens_to_ids("<|video|>"),
        boa_token_id=tok.convert_tokens_to_ids(SPECIALS["boa_token"]),
        eoa_token_index=tok.convert_tokens_to_ids(SPECIALS["eoa_token"]),
        audio_token_id=tok.convert_tokens_to_ids(SPECIALS["audio_token"]),
    )
    model = transformers.Gemma4ForConditionalGeneration(cfg).eval()
    _randomize(model, 1)
    with torch.no_grad():  # buffers: bounds that clip some activations, a standardisation
        tower = model.model.vision_tower
        tower.std_bias.normal_(0, 0.5)
        tower.std_scale.uniform_(0.5, 1.5)
        for layer in tower.encoder.layers:
            layer.self_attn.q_proj.input_min.fill_(-1.5)
            layer.self_attn.q_proj.output_max.fill_(1.0)
            layer.mlp.down_proj.output_min.fill_(-0.5)
        for i, layer in enumerate(model.model.language_model.layers):
            layer.layer_scalar.fill_(0.8 + 0.1 * i)
    model.save_pretrained(path)
    return path


def _image(h: int, w: int, seed: int):
    from tests.models.test_gemma3 import _image as blocky

    return blocky(h, w, seed)


IMAGE = SPECIALS["image_token"]
IMAGES = [_image(40, 50, 0), _image(56, 56, 1), _image(30, 64, 2)]
VLM_PROMPTS = [
    {"prompt": "Once upon a time there was"},
    {"prompt": f"{IMAGE}Describe the image.", "multi_modal_data": {"image": IMAGES[0]}},
    {
        "prompt": f"Hello {IMAGE} and {IMAGE} what is this",
        "multi_modal_data": {"image": [IMAGES[1], IMAGES[2]]},
    },
]


def _chunks(n: int, items, budget: int, whole: bool) -> list[tuple[int, int]]:
    """Prefill chunks of at most `budget` tokens, as the scheduler cuts them (with `whole`
    never ending inside an item)."""
    out, start = [], 0
    while start < n:
        end = min(start + budget, n)
        for it in items if whole else ():
            if it.start < end < it.end:
                end = it.start
        out.append((start, end))
        start = end
    return out


@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidir_ring"])
def test_vlm_greedy_and_logits_match_transformers(ckpt_root, bidirectional, monkeypatch):
    import transformers

    from jaxmm import LLM, SamplingParams
    from jaxmm.models.gemma3 import LOCAL_KV_ENV
    from jaxmm.multimodal.inputs import prepare_multimodal_prompt
    from jaxmm.runner.model_runner import SeqStep

    path = make_gemma4_vlm(ckpt_root, bidirectional)
    # causal: 24-token steps end inside images; bidirectional: an image (<= 70 tokens) fits a
    # step and the scheduler keeps each in one; its local layers on rings of 144 tokens
    # (window 8 + a step bucket of 128 - 1 = 135 needed), which the two-image prompt wraps
    budget = 80 if bidirectional else 24
    monkeypatch.setenv(LOCAL_KV_ENV, "144" if bidirectional else "0")
    llm = LLM(path, dtype="float32", max_model_len=384, max_num_batched_tokens=budget)
    engine = llm.llm_engine
    assert engine.scheduler.whole_mm_items == bidirectional
    assert engine.runner.num_layers == (1 if bidirectional else 3)
    hf = transformers.Gemma4ForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    hf = hf.eval()
    proc = make_gemma4_processor(path + "_processor")  # the saved one, rebuilt in memory

    def hf_inputs(prompt: dict) -> dict:
        images = prompt.get("multi_modal_data", {}).get("image")
        if images is None:
            return dict(proc.tokenizer(prompt["prompt"], return_tensors="pt"))
        images = images if isinstance(images, list) else [images]
        return dict(proc(text=prompt["prompt"], images=images, return_tensors="pt"))

    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate(VLM_PROMPTS, params, use_tqdm=False)
    inputs = [hf_inputs(p) for p in VLM_PROMPTS]
    for out, inp in zip(outs, inputs):
        assert out.prompt_token_ids == inp["input_ids"][0].tolist()
        with torch.no_grad():
            ref = hf.generate(**inp, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
        assert out.outputs[0].token_ids == ref[0, inp["input_ids"].shape[1] :].tolist()
    assert any(len(set(o.outputs[0].token_ids)) > 2 for o in outs)
    assert len(outs[2].prompt_token_ids) + NEW_TOKENS > 144  # wraps the rings
    # three sizes of image, each its own number of tokens
    image_id = hf.config.image_token_id
    counts = [int((i["input_ids"] == image_id).sum()) for i in inputs]
    assert counts[1] < MAX_SOFT_TOKENS and counts[2] > counts[1]

    # last-token logits, prefilled in chunks as the scheduler cuts them (scratch pages)
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
        pages = list(range(runner.num_pages - n, runner.num_pages))
        chunks = _chunks(len(ids), items, budget, bidirectional)
        if not bidirectional and items:  # some chunk ends inside an image
            assert any(it.start < end < it.end for _, end in chunks for it in items)
        for start, end in chunks:
            step = SeqStep(ids[start:end], start, pages, sample=end == len(ids))
            step.mm_rows = [
                (max(it.start, start) - start, rows_of[it.cache_key][a - it.start : b - it.start])
                for it in items
                for a, b in [(max(it.start, start), min(it.end, end))]
                if a < b
            ]
            last = runner.logits([step])[0]
        rows.append(last)
    with torch.no_grad():
        ref = np.stack([hf(**i).logits[0, -1].numpy() for i in inputs])
    np.testing.assert_allclose(np.stack(rows), ref, atol=1e-4, rtol=0)


def test_gemma4_ttft_benchmark_smoke(tmp_path, capsys, monkeypatch):
    import json

    from benchmarks import gemma4_ttft
    from jaxmm.models.gemma3 import LOCAL_KV_ENV

    monkeypatch.setenv(LOCAL_KV_ENV, "0")  # main() sets it: unset again afterwards
    argv = ["--config", "small", "--iters", "1", "--device", "cpu", "--decode-tokens", "2", "4"]
    # local layers on rings of window (16) + one step bucket (128) - 1 tokens, rounded up
    argv += ["--max-num-batched-tokens", "128", "--context", "256", "--local-kv-tokens", "144"]
    results = gemma4_ttft.main(argv + ["--workdir", str(tmp_path)])
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()[-2:]]
    assert lines == results
    ttft, decode = results
    assert ttft["num_image_tokens"] == 64 and ttft["num_prompt_tokens"] > 64  # 96² -> 24² patches
    for key in ("preprocess_s", "encoder_s", "prefill_s", "e2e_s", "hf_e2e_s"):
        assert ttft[key] > 0, key
    assert isinstance(decode["engine_ms_per_token"], float) and decode["roofline_ms_per_token"] > 0
    # 6 layers, the last 3 reading layers 1 (local) and 2 (global): two local pools of one KV
    # head of 16, one global of 32; 2 bytes each of K and V
    local, glob = 2 * 16 * 2, 2 * 32 * 2
    assert ttft["kv_bytes_per_token_padded"] == 6 * glob
    assert ttft["kv_bytes_per_token_full_layout"] == 4 * local + 2 * glob
    assert ttft["kv_bytes_per_token_shared"] == 2 * local + glob
    assert ttft["kv_bytes_per_token_windowed"] == round(glob + 2 * local * 144 / 256)
    assert ttft["kv_bytes_per_token_measured"] == ttft["kv_bytes_per_token_windowed"]


def test_steps_under_a_kernel_backend(monkeypatch):
    """The VLM on a kernel backend (Pallas, interpret mode here; the parity tests run XLA):
    pools of two shapes, a shared layer handing the kernel its producer's K/V, and image
    steps on the XLA path with the mask (one `lax.cond` per step) agree with the XLA model."""
    import functools

    import jax
    import jax.numpy as jnp
    import transformers
    from flax import nnx

    from jaxmm.layers.attention import AttentionMetadata
    from jaxmm.models.gemma3 import LOCAL_KV_ENV
    from jaxmm.models.gemma4 import Gemma4ForConditionalGeneration

    monkeypatch.setenv(LOCAL_KV_ENV, "0")
    IMG = 60

    class Tok:  # what _text_config reads of a tokenizer
        bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

        def __len__(self):
            return 64

    text = _text_config(Tok(), "shared") | dict(
        num_hidden_layers=3,
        layer_types=[S, F, F],
        num_kv_shared_layers=1,  # layer 2 reads layer 1's pages
        use_bidirectional_attention="vision",
    )
    cfg = transformers.Gemma4Config(
        text_config=text,
        vision_config=_vision_config().to_dict() | {"num_hidden_layers": 1},
        image_token_id=IMG,
        boi_token_id=61,
        eoi_token_id=62,
        video_token_id=63,
        audio_token_id=59,
    )
    models = {
        b: Gemma4ForConditionalGeneration(cfg, attention_backend=b, rngs=nnx.Rngs(0))
        for b in ("xla", "pallas")
    }
    graphdefs = {b: nnx.split(m)[0] for b, m in models.items()}
    state = nnx.split(models["xla"])[1]
    leaves, treedef = jax.tree_util.tree_flatten(state)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    leaves = [0.3 * jax.random.normal(kk, x.shape, x.dtype) for kk, x in zip(keys, leaves)]
    state = jax.tree_util.tree_unflatten(treedef, leaves)
    shapes = models["xla"].kv_cache_layer_shapes()
    assert shapes == [(2, 16), (1, 32)]

    @functools.partial(jax.jit, static_argnums=0)
    def run(backend, ids, pages, md):
        model = nnx.merge(graphdefs[backend], state)
        hidden, _ = model(ids, pages, md)
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
    pages = [jnp.zeros((2, K, 5, G, H), jnp.float32) for K, H in shapes]
    text_ids = jnp.arange(3, 3 + T, dtype=jnp.int32)
    image_ids = text_ids.at[5:9].set(IMG)  # one image of 4 tokens in the prefill
    for ids in (text_ids, image_ids):
        want = run("xla", ids, pages, md)
        got = run("pallas", ids, pages, md)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4)


def test_image_sizes_compile_nothing_after_warmup(ckpt_root):
    """Every image is padded to the processor's patch budget: after warmup (and one prompt
    with one and one with two images, for the encoder's batch sizes), images of other sizes
    and token counts run the warm programs."""
    from jaxmm import LLM, SamplingParams
    from jaxmm.runner.model_runner import backend_compile_count

    path = make_gemma4_vlm(ckpt_root, bidirectional=False)
    llm = LLM(path, dtype="float32", max_model_len=384, max_num_batched_tokens=32, warmup=True)
    sp = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    llm.generate(VLM_PROMPTS[1:], sp, use_tqdm=False)
    runner = llm.llm_engine.runner
    before = (runner.num_compiled(), backend_compile_count())
    others = [_image(20, 90, 3), _image(64, 33, 4), _image(77, 77, 5)]
    prompts = [
        {"prompt": f"{IMAGE} what", "multi_modal_data": {"image": others[0]}},
        {"prompt": f"a {IMAGE} b {IMAGE}", "multi_modal_data": {"image": others[1:]}},
    ]
    outs = llm.generate(prompts, sp, use_tqdm=False)
    assert len({len(o.prompt_token_ids) for o in outs}) == 2
    assert (runner.num_compiled(), backend_compile_count()) == before


def test_same_tokens_at_tp_1_2(ckpt_root):
    """Tensor parallelism on a faked host: each layer's pool keeps its own KV heads per device
    (local layers: 2 split over 2 devices; the global layer's one stored on both)."""
    import json

    from tests.runner.test_tensor_parallel import SCRIPT, run_fake_devices

    path = make_gemma4_text(ckpt_root, "shared")
    proc = run_fake_devices(["-c", SCRIPT, path, "1,2", "xla"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["tokens"]["2"] == got["tokens"]["1"]
    assert got["kv"]["2"] == [2, 2, 1]  # layer 0's pool: 2 KV heads, one per device


def test_chat_with_image_parts_matches_the_processor(ckpt_root):
    """Chat content parts become the image token once each; the front end puts `<boi>` and
    `<eoi>` around it on token ids, as Gemma4Processor does on text."""
    from jaxmm import LLM, SamplingParams
    from tests.helpers import png_data_url

    path = make_gemma4_vlm(ckpt_root, bidirectional=False)
    llm = LLM(path, dtype="float32", max_model_len=384, max_num_batched_tokens=64)
    url = png_data_url(IMAGES[2])
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": "What is in the picture?"},
                {"type": "image_pil", "image_pil": IMAGES[0]},
            ],
        }
    ]
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    chat = llm.chat(messages, sp, use_tqdm=False)[0]
    text = f"<|user|>{IMAGE}\nWhat is in the picture?\n{IMAGE}<|end|><|assistant|>"
    proc = make_gemma4_processor(path + "_chat_processor")
    want = proc(text=text, images=[IMAGES[2], IMAGES[0]], add_special_tokens=False)
    assert chat.prompt_token_ids == list(want["input_ids"][0])
    direct = llm.generate(
        [
            {
                "prompt_token_ids": chat.prompt_token_ids,
                "multi_modal_data": {"image": [IMAGES[2], IMAGES[0]]},
            }
        ],
        sp,
        use_tqdm=False,
    )[0]
    assert chat.outputs[0].token_ids == direct.outputs[0].token_ids


def test_prefix_cache_hits(ckpt_root, monkeypatch):
    """A prompt sharing a long prefix with an earlier one reads its cached pages in every
    pool (local, global; the shared layers read them through their producers)."""
    from jaxmm import LLM, SamplingParams
    from jaxmm.models.gemma3 import LOCAL_KV_ENV
    from tests.helpers import hf_greedy

    monkeypatch.setenv(LOCAL_KV_ENV, "0")
    path = make_gemma4_text(ckpt_root, "shared")
    llm = LLM(path, dtype="float32", max_model_len=256, block_size=4, max_num_batched_tokens=16)
    tok = llm.get_tokenizer()
    shared = tok(TEXT_PROMPTS[2]).input_ids
    ids = [shared + tok(" and then").input_ids[1:], shared + tok(" but").input_ids[1:]]
    sp = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    first = llm.generate([{"prompt_token_ids": ids[0]}], sp, use_tqdm=False)
    bm = llm.llm_engine.block_manager
    hits_before = bm.prefix_hits
    second = llm.generate([{"prompt_token_ids": ids[1]}], sp, use_tqdm=False)
    assert bm.prefix_hits - hits_before >= (len(shared) // 4 - 1) * 4 > WINDOW
    got = [o.outputs[0].token_ids for o in first + second]
    assert got == hf_greedy(path, ids, NEW_TOKENS)
