"""Gemma 4 audio tower parity with transformers on a tiny random tower (float32).

The tower (`Gemma4AudioModel`) and the audio embedder (`Gemma4MultimodalEmbedder`) are
built with transformers, randomised (clip bounds included), saved under the names a
Gemma 4 checkpoint uses (`model.audio_tower.*`, `model.embed_audio.*`) and loaded through
jaxmm's loader. Features come from HF's `Gemma4AudioFeatureExtractor`: two clips of
different lengths in one padded batch, so the shorter one is masked.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import wav_base64, wav_bytes

SR = 16000


def _tone(seconds: float, f0: float, seed: int) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    noise = np.random.default_rng(seed).standard_normal(len(t))
    return (0.3 * np.sin(2 * np.pi * f0 * t * (1 + t)) + 0.05 * noise).astype(np.float32)


def audio_config(**kw):
    import transformers

    base = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        subsampling_conv_channels=[16, 8],  # 16 mel bins: c0 // 4 mel bins after subsampling
        attention_chunk_size=4,
        attention_context_left=5,
        attention_context_right=0,
        conv_kernel_size=3,
        output_proj_dims=48,
    )
    return transformers.Gemma4AudioConfig(**(base | kw))


def _randomize(module, seed: int) -> None:
    """Larger-than-default weights; clip bounds finite on some layers so clamping bites."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.normal_(0, 0.15 if p.dim() > 1 else 0.5)
            if p.dim() == 1 and "norm" in name and name.endswith("weight"):
                p.abs_().add_(0.5)
        for name, b in module.named_buffers():
            if name.endswith(("input_min", "output_min")) and "layers.1." in name:
                b.fill_(-0.4)
            elif name.endswith(("input_max", "output_max")) and "layers.1." in name:
                b.fill_(0.4)


def _owner(cfg, text_hidden: int):
    from flax import nnx

    from jaxmm.models.encoders.gemma4_audio import Gemma4AudioModel, Gemma4MultimodalEmbedder

    class TextConfig:
        hidden_size = text_hidden

    class Owner(nnx.Module):  # a model holding the tower as Gemma 4 does, HF keys `model.*`
        hf_key_rules = ((r"^model\.", ""),)

        def __init__(self):
            rngs = nnx.Rngs(0)
            self.audio_tower = Gemma4AudioModel(cfg, rngs=rngs)
            self.embed_audio = Gemma4MultimodalEmbedder(cfg, TextConfig, rngs=rngs)

    return Owner


@pytest.mark.parametrize("right", [0, 2])
def test_gemma4_audio_tower_matches_transformers(right):
    import jax
    import transformers
    from flax import nnx
    from transformers.models.gemma4 import modeling_gemma4 as hf_gemma4

    from jaxmm.models.encoders.gemma4_audio import audio_num_tokens, encode_audio_items
    from jaxmm.runner.model_runner import make_mesh
    from jaxmm.weights.loader import load_params

    cfg = audio_config(attention_context_right=right)
    text_cfg = transformers.Gemma4TextConfig(hidden_size=64, num_hidden_layers=1)
    tower = hf_gemma4.Gemma4AudioModel(cfg).eval()
    embedder = hf_gemma4.Gemma4MultimodalEmbedder(cfg, text_cfg).eval()
    _randomize(tower, 1)
    _randomize(embedder, 2)

    fe = transformers.Gemma4AudioFeatureExtractor(feature_size=16)
    clips = [_tone(0.93, 400, 0), _tone(0.37, 700, 1)]
    x = fe(clips, sampling_rate=SR, return_tensors="pt")  # padded to the longer clip
    feats, mask = x["input_features"], x["input_features_mask"]
    assert not bool(mask[1].all())  # the short clip is padded
    with torch.no_grad():
        out = tower(feats, mask)
        ref_rows = embedder(out.last_hidden_state).numpy()
    ref, ref_mask = out.last_hidden_state.numpy(), out.attention_mask.numpy()

    Owner = _owner(cfg, 64)
    owner = nnx.eval_shape(Owner)
    graphdef, abstract = nnx.split(owner)
    tensors = [(f"model.audio_tower.{k}", v.numpy()) for k, v in tower.state_dict().items()]
    tensors += [(f"model.embed_audio.{k}", v.numpy()) for k, v in embedder.state_dict().items()]
    model = nnx.merge(graphdef, load_params(owner, abstract, tensors, make_mesh(1), None))

    hidden, our_mask = jax.jit(model.audio_tower)(feats.numpy(), mask.numpy())
    np.testing.assert_array_equal(np.asarray(our_mask), ref_mask)
    for b in range(2):  # real rows; padded rows are discarded by the model
        keep = ref_mask[b]
        np.testing.assert_allclose(np.asarray(hidden)[b, keep], ref[b, keep], atol=1e-4, rtol=0)

    # the encoder stage: each item alone, padded to its own bucket, gives HF's batched rows
    @jax.jit
    def run(params, f, m):
        owner = nnx.merge(graphdef, params)
        return owner.embed_audio(owner.audio_tower(f, m)[0])

    params = nnx.state(model)
    items = [
        {"input_features": feats[b].numpy(), "input_features_mask": mask[b].numpy()}
        for b in range(2)
    ]
    rows = encode_audio_items(run, params, items)
    for b, r in enumerate(rows):
        n = audio_num_tokens(mask[b].numpy())
        assert len(r) == n == int(ref_mask[b].sum())
        got = np.asarray(r.array)[r.start : r.stop]
        np.testing.assert_allclose(got, ref_rows[b, :n], atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------
# The host side: features and placeholder counts as Gemma4Processor makes them

SPECIAL_TOKENS = dict(
    image_token="<|image|>",
    boi_token="<|image>",
    eoi_token="<image|>",
    audio_token="<|audio|>",
    boa_token="<|audio>",
    eoa_token="<audio|>",
)


def gemma4_processor(path: str, feature_size: int = 16):
    """A Gemma4Processor with a locally trained tokenizer carrying Gemma 4's named
    multimodal tokens (the video processor is a stand-in where torchvision is missing)."""
    import transformers
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil
    from transformers.video_processing_utils import BaseVideoProcessor

    from tests.helpers import make_processor, make_tokenizer

    make_tokenizer(path)
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(
        path, extra_special_tokens=SPECIAL_TOKENS
    )
    try:
        from transformers import Gemma4VideoProcessor

        video = Gemma4VideoProcessor()
    except ImportError:
        video = BaseVideoProcessor()
    return make_processor(
        transformers.Gemma4Processor,
        feature_extractor=transformers.Gemma4AudioFeatureExtractor(feature_size=feature_size),
        # the tiny vision tower's patches (4 px), pooling (2) and the smallest token budget
        image_processor=Gemma4ImageProcessorPil(
            patch_size=4, pooling_kernel_size=2, max_soft_tokens=70
        ),
        tokenizer=tok,
        video_processor=video,
    )


def test_gemma4_audio_features_and_counts_match_processor(tmp_path):
    from jaxmm.models.encoders.gemma4_audio import audio_item_features, audio_num_tokens
    from jaxmm.multimodal.audio import load_audio_item

    proc = gemma4_processor(str(tmp_path))
    tok = proc.tokenizer
    # a stereo 44.1 kHz clip (channels last) and a mono 16 kHz one, as the front end loads them
    # (48000 samples: 1.09 s at 44.1 kHz)
    stereo = np.stack([_tone(3.0, 300, 2), _tone(3.0, 500, 3)], axis=1)
    long = load_audio_item((stereo, 44100), SR)
    short = load_audio_item((_tone(0.41, 800, 4), SR), SR)
    x = proc(text="a <|audio|> b <|audio|>", audio=[long, short], return_tensors="np")
    ids = x["input_ids"][0].tolist()
    audio_id, boa, eoa = (
        tok.convert_tokens_to_ids(SPECIAL_TOKENS[k])
        for k in ("audio_token", "boa_token", "eoa_token")
    )
    # HF's expansion: <boa> + n x audio token + <eoa> per clip
    starts = [i for i, t in enumerate(ids) if t == boa]
    counts = [ids.index(eoa, s) - s - 1 for s in starts]
    assert all(set(ids[s + 1 : s + 1 + n]) == {audio_id} for s, n in zip(starts, counts))
    for b, clip in enumerate([long, short]):
        item = audio_item_features(proc.feature_extractor, clip, SR, {})
        mask = item["input_features_mask"]
        assert audio_num_tokens(mask) == counts[b]
        n = int(mask.sum())
        assert n == int(x["input_features_mask"][b].sum())
        np.testing.assert_allclose(
            item["input_features"][:n], x["input_features"][b, :n], atol=1e-5, rtol=0
        )
    assert counts[0] > counts[1] > 0
    with pytest.raises(ValueError, match="too short"):
        audio_item_features(proc.feature_extractor, np.zeros(100, np.float32), SR, {})


# ---------------------------------------------------------------------------------------
# Gemma4ForConditionalGeneration with audio

NEW_TOKENS = 8
BUDGET = 24  # tokens per step: audio spans straddle prefill chunks
S, F = "sliding_attention", "full_attention"


def make_gemma4_audio_ckpt(path: str):
    """A tiny Gemma 4 with vision and audio towers and its processor, saved as transformers
    writes them; returns (path, the HF model, the processor)."""
    import transformers

    proc = gemma4_processor(path)
    tok = proc.tokenizer
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in SPECIAL_TOKENS.items()}
    text = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        layer_types=[S, S, F],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        global_head_dim=32,
        sliding_window=8,
        final_logit_softcapping=5.0,
        hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=len(tok),
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        rope_parameters={
            S: {"rope_type": "default", "rope_theta": 10_000.0},
            F: {"rope_type": "proportional", "partial_rotary_factor": 0.5, "rope_theta": 1e4},
        },
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        patch_size=4,
        pooling_kernel_size=2,
        position_embedding_size=64,
    )
    cfg = transformers.Gemma4Config(
        text_config=text,
        vision_config=vision,
        audio_config=audio_config(attention_context_right=1).to_dict(),
        image_token_id=ids["image_token"],
        boi_token_id=ids["boi_token"],
        eoi_token_id=ids["eoi_token"],
        audio_token_id=ids["audio_token"],
        boa_token_id=ids["boa_token"],
        eoa_token_index=ids["eoa_token"],
        video_token_id=tok.convert_tokens_to_ids("<|video|>"),
    )
    cfg.architectures = ["Gemma4ForConditionalGeneration"]
    model = transformers.Gemma4ForConditionalGeneration(cfg).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # larger-than-default weights so greedy paths are not ties
        for name, p in model.named_parameters():
            if "audio_tower" in name or "embed_audio" in name:
                continue
            p.normal_(0, 0.08 if p.dim() > 1 else 0.5)
            if p.dim() == 1 and "norm" in name and name.endswith("weight"):
                p.abs_().add_(0.5)
    _randomize(model.model.audio_tower, 1)
    _randomize(model.model.embed_audio, 2)
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return path, model, proc


@pytest.fixture(scope="module")
def gemma4(tmp_path_factory):
    from jaxmm import LLM

    path, hf, proc = make_gemma4_audio_ckpt(str(tmp_path_factory.mktemp("gemma4_audio")))
    llm = LLM(
        path,
        dtype="float32",
        max_model_len=160,
        max_num_batched_tokens=BUDGET,
        enable_mm_embeds=True,
    )
    return llm, hf, proc


def _last_logits(llm, prompt: dict) -> np.ndarray:
    """Last-token logits of one prompt, prefilled in BUDGET-token chunks (scratch pages at
    the top of the pool; the engine is idle)."""
    from jaxmm.multimodal.inputs import prepare_multimodal_prompt
    from jaxmm.runner.model_runner import SeqStep
    from tests.models.test_vlm_parity import _chunk_rows, _encode_items

    engine = llm.llm_engine
    runner = engine.runner
    _, ids, mm = prepare_multimodal_prompt(engine, prompt)
    pages = list(range(runner.num_pages - -(-len(ids) // runner.block_size), runner.num_pages))
    rows_of = _encode_items(engine, mm)
    for start in range(0, len(ids), BUDGET):
        chunk = ids[start : start + BUDGET]
        step = SeqStep(chunk, start, pages, sample=start + len(chunk) == len(ids))
        step.mm_rows = _chunk_rows(mm, rows_of, start, len(chunk))
        last = runner.logits([step])[0]
    return np.asarray(last)


def _check(llm, hf, proc, prompts: list, hf_audio: list) -> list:
    """Prompt ids, greedy tokens and last-token logits against transformers' own processor
    and `generate` (hf_audio: the clips as HF is given them, mono at 16 kHz)."""
    from jaxmm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, audio, out in zip(prompts, hf_audio, outs, strict=True):
        image = prompt["multi_modal_data"].get("image")
        images = None if image is None else [image]
        x = proc(text=prompt["prompt"], audio=audio, images=images, return_tensors="pt")
        ids = x["input_ids"][0]
        assert int((ids == hf.config.audio_token_id).sum()) > len(audio)  # expanded
        assert out.prompt_token_ids == ids.tolist()
        with torch.no_grad():
            ref = hf.generate(**x, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
            logits = hf(**x).logits[0, -1].numpy()
        assert out.outputs[0].token_ids == ref[0, len(ids) :].tolist()
        np.testing.assert_allclose(_last_logits(llm, prompt), logits, atol=1e-4, rtol=0)
    assert any(len(set(o.outputs[0].token_ids)) > 2 for o in outs)  # not a degenerate model
    return outs


def test_gemma4_audio_prompts_match_transformers(gemma4):
    from jaxmm.multimodal.audio import load_audio_item
    from jaxmm.multimodal.audio_inputs import prepare_audio_prompt

    llm, hf, proc = gemma4
    audio = "<|audio|>"
    # a stereo 44.1 kHz clip, channels last: folded and resampled by the front end (HF gets
    # the clip as the front end hands it on); then two mono clips of different lengths
    stereo = np.stack([_tone(2.0, 300, 5), _tone(2.0, 450, 6)], axis=1)  # 0.73 s
    one, two = _tone(0.9, 500, 7), _tone(0.33, 900, 8)
    prompts = [
        {"prompt": f"Listen {audio} and tell", "multi_modal_data": {"audio": (stereo, 44100)}},
        {
            "prompt": f"First {audio} then {audio} compare",
            "multi_modal_data": {"audio": [(one, SR), (two, SR)]},
        },
    ]
    hf_audio = [[load_audio_item((stereo, 44100), SR)], [one, two]]
    outs = _check(llm, hf, proc, prompts, hf_audio)

    # the spliced rows are HF's audio features (real frames only), items back to back
    from tests.models.test_vlm_parity import _encode_items

    engine = llm.llm_engine
    _, _, mm = prepare_audio_prompt(engine, prompts[1])
    rows = _encode_items(engine, mm)
    ours = np.concatenate(
        [np.asarray(engine.runner.encoder_cache)[rows[it.cache_key]] for it in mm.items]
    )
    x = proc(text=prompts[1]["prompt"], audio=[one, two], return_tensors="pt")
    with torch.no_grad():
        out = hf.model.get_audio_features(x["input_features"], x["input_features_mask"])
    ref = out.pooler_output[out.attention_mask].numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)

    # HF's rows as precomputed audio embeddings (one (n, D) array per clip): the same tokens
    from jaxmm import SamplingParams

    n = int(out.attention_mask[0].sum())
    embeds = [{"audio_embeds": ref[:n]}, {"audio_embeds": ref[n:]}]
    prompt = {**prompts[1], "multi_modal_data": {"audio": embeds}}
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    [got] = llm.generate([prompt], params, use_tqdm=False)
    assert got.outputs[0].token_ids == outs[1].outputs[0].token_ids
    with pytest.raises(ValueError, match="audio embeddings must have shape"):
        bad = {**prompt, "multi_modal_data": {"audio": {"audio_embeds": ref[:n, :-1]}}}
        llm.generate([bad], params, use_tqdm=False)


def test_gemma4_image_and_audio_in_one_prompt(gemma4):
    from tests.models.test_gemma3 import _image

    llm, hf, proc = gemma4
    clip = _tone(0.6, 350, 9)
    prompt = {
        "prompt": "See <|image|> and hear <|audio|> then say",
        "multi_modal_data": {"image": _image(24, 32, 0), "audio": [(clip, SR)]},
    }
    _check(llm, hf, proc, [prompt], [[clip]])


def test_gemma4_audio_chat_and_transcriptions(gemma4):
    from openai import OpenAI

    from jaxmm import SamplingParams
    from tests.server.live_util import KEY, NAME, live_server

    llm, hf, proc = gemma4
    tok = proc.tokenizer
    clip = _tone(0.8, 420, 10)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)

    # chat with an input_audio part (a wav file, base64): HF renders the same template and
    # its processor wraps and expands the placeholder
    wav = wav_base64(clip, SR)
    parts = [
        {"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}},
        {"type": "text", "text": "What is it?"},
    ]
    [chat] = llm.chat([{"role": "user", "content": parts}], params, use_tqdm=False)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "<|audio|>\nWhat is it?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    x = proc(text=text, audio=[clip], add_special_tokens=False, return_tensors="pt")
    assert chat.prompt_token_ids == x["input_ids"][0].tolist()
    with torch.no_grad():
        ref = hf.generate(**x, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    assert chat.outputs[0].token_ids == ref[0, x["input_ids"].shape[1] :].tolist()

    # /v1/audio/transcriptions: the request is a user turn through the chat template; the
    # server takes the whole answer (no max_tokens), a random model runs to max_model_len
    request = [{"role": "user", "content": "Transcribe this audio into English: <|audio|>"}]
    text = tok.apply_chat_template(request, add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False).input_ids
    [want] = llm.generate(
        {"prompt_token_ids": ids, "multi_modal_data": {"audio": (clip, SR)}},
        SamplingParams(temperature=0, max_tokens=None),
        use_tqdm=False,
    )
    x = proc(text=text, audio=[clip], add_special_tokens=False, return_tensors="pt")
    assert want.prompt_token_ids == x["input_ids"][0].tolist()
    assert want.outputs[0].text.strip()
    kw = dict(dtype="float32", max_model_len=160, max_num_batched_tokens=BUDGET)
    path = llm.llm_engine.config.model.model
    with live_server(path, **kw) as (_, url):  # the engine in its own process
        client = OpenAI(base_url=f"{url}/v1", api_key=KEY)
        got = client.audio.transcriptions.create(
            model=NAME, file=("a.wav", wav_bytes(clip, SR), "audio/wav"), language="en"
        )
    assert got.text == want.outputs[0].text.strip()


def test_gemma4_audio_ttft_benchmark_smoke(tmp_path, capsys):
    import json

    from benchmarks import gemma4_audio_ttft

    argv = ["--config", "small", "--iters", "1", "--device", "cpu", "--seconds", "2"]
    results = gemma4_audio_ttft.main(argv + ["--workdir", str(tmp_path)])
    assert [json.loads(capsys.readouterr().out.strip().splitlines()[-1])] == results
    [r] = results
    assert r["num_audio_tokens"] == 50  # 2 s: 199 mel frames of 10 ms, subsampled 4x
    assert r["num_prompt_tokens"] > 50
    for key in ("preprocess_s", "encoder_s", "prefill_s", "e2e_s", "hf_e2e_s"):
        assert r[key] > 0, key
