"""Gemma 3 pan-and-scan (`do_pan_and_scan`): an image with its crops against transformers.

The tiny VLM checkpoint of test_gemma3.py (56² SigLIP, 16 soft tokens an image). With
pan-and-scan the HF processor gives the image plus `num_crops` crops, and the prompt text
Gemma3Processor writes for them; the engine must produce the same ids, the same greedy
tokens and the same log-probabilities, per prompt and engine-wide.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.models.test_gemma3 import BOI, IMAGE_TOKENS, _image, make_gemma3_vlm

NEW_TOKENS = 8
# small crops, so that a small image gets several (the processor's default is 256 pixels)
SMALL_CROPS = {
    "do_pan_and_scan": True,
    "pan_and_scan_min_crop_size": 20,
    "pan_and_scan_max_num_crops": 3,
}
WIDE = _image(30, 100, 3)  # 100 x 30: ratio 3.3 -> 3 crops of 34 x 30 with SMALL_CROPS
ENGINE_ARGS = dict(dtype="float32", max_model_len=512, max_num_batched_tokens=256)


@pytest.fixture(scope="module")
def vlm(ckpt_root):
    import transformers

    from jaxmm import LLM

    path = make_gemma3_vlm(ckpt_root)
    hf = transformers.Gemma3ForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    return path, LLM(path, **ENGINE_ARGS), hf.eval()


def _hf_inputs(path: str, prompt: dict, kwargs: dict) -> dict:
    import transformers

    proc = transformers.AutoProcessor.from_pretrained(path)
    images = prompt["multi_modal_data"]["image"]
    images = images if isinstance(images, list) else [images]
    return dict(proc(text=prompt["prompt"], images=images, return_tensors="pt", **kwargs))


def _soft_runs(ids: list[int], soft: int) -> list[int]:
    """Lengths of the runs of soft tokens in ids."""
    runs, prev = [], False
    for t in ids:
        if t == soft and prev:
            runs[-1] += 1
        elif t == soft:
            runs.append(1)
        prev = t == soft
    return runs


def _check_against_hf(path, hf, outs, prompts, hf_kwargs) -> list[dict]:
    """Ids, greedy tokens and each token's log-probability as transformers gives them."""
    all_inputs = []
    for out, prompt, kw in zip(outs, prompts, hf_kwargs, strict=True):
        inputs = _hf_inputs(path, prompt, kw)
        all_inputs.append(inputs)
        assert out.prompt_token_ids == inputs["input_ids"][0].tolist()
        with torch.no_grad():
            ref = hf.generate(
                **inputs,
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                eos_token_id=None,
                output_logits=True,
                return_dict_in_generate=True,
            )
        tokens = ref.sequences[0, inputs["input_ids"].shape[1] :].tolist()
        assert out.outputs[0].token_ids == tokens
        ref_lp = [
            torch.log_softmax(step[0].float(), -1)[t].item()
            for step, t in zip(ref.logits, tokens, strict=True)
        ]
        got_lp = [lp[t].logprob for lp, t in zip(out.outputs[0].logprobs, tokens, strict=True)]
        np.testing.assert_allclose(got_lp, ref_lp, atol=1e-4, rtol=0)
    return all_inputs


def _params():
    from jaxmm import SamplingParams

    return SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)


def test_per_prompt_pan_and_scan_matches_transformers(vlm):
    path, llm, hf = vlm
    soft = llm.llm_engine.runner.model_obj.image_token_id
    prompts = [
        {
            "prompt": f"Look {BOI} at this wide picture, then {BOI} this one.",
            "multi_modal_data": {"image": [WIDE, _image(40, 50, 4)]},
            "mm_processor_kwargs": SMALL_CROPS,
        }
    ]
    outs = llm.generate(prompts, _params(), use_tqdm=False)
    _check_against_hf(path, hf, outs, prompts, [SMALL_CROPS])
    # the wide image: the original and 3 crops; the other (50 x 40, ratio 1.25): 2 crops
    assert _soft_runs(outs[0].prompt_token_ids, soft) == [IMAGE_TOKENS] * (4 + 3)
    assert len(set(outs[0].outputs[0].token_ids)) > 2


def test_with_and_without_pan_and_scan_share_no_encoder_entry(vlm):
    from jaxmm.multimodal.inputs import prepare_multimodal_prompt

    path, llm, hf = vlm
    engine = llm.llm_engine
    base = {"prompt": f"{BOI}What is it?", "multi_modal_data": {"image": WIDE}}
    scanned = {**base, "mm_processor_kwargs": SMALL_CROPS}
    outs = llm.generate([scanned, base], _params(), use_tqdm=False)
    _check_against_hf(path, hf, outs, [scanned, base], [SMALL_CROPS, {}])
    assert len(outs[0].prompt_token_ids) > len(outs[1].prompt_token_ids) + 3 * IMAGE_TOKENS
    keys = [prepare_multimodal_prompt(engine, p)[2].items[0].cache_key for p in (scanned, base)]
    assert keys[0] != keys[1]
    # again, the other way round: each served from its own cache entry, same tokens
    again = llm.generate([base, scanned], _params(), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in outs][::-1]


def test_engine_wide_pan_and_scan_with_the_processor_defaults(ckpt_root):
    """`LLM(mm_processor_kwargs=...)`: Gemma3Processor's defaults for the rest (crops of at
    least 256 pixels, at most 4, from a ratio of 1.2); an image under that ratio gets none.
    The images are processed in a worker process here (`mm_processor_workers`), with the
    engine's kwargs."""
    import transformers

    from jaxmm import LLM

    path = make_gemma3_vlm(ckpt_root)
    hf = transformers.Gemma3ForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    engine_kwargs = {"do_pan_and_scan": True}
    llm = LLM(path, mm_processor_kwargs=engine_kwargs, mm_processor_workers=1, **ENGINE_ARGS)
    assert llm.llm_engine.mm_frontend().workers is not None
    soft = llm.llm_engine.runner.model_obj.image_token_id
    prompts = [
        {"prompt": f"A panorama: {BOI}", "multi_modal_data": {"image": _image(260, 600, 5)}},
        {"prompt": f"Nearly square: {BOI}", "multi_modal_data": {"image": _image(280, 300, 6)}},
    ]
    try:
        outs = llm.generate(prompts, _params(), use_tqdm=False)
    finally:
        llm.llm_engine.mm_frontend().close()  # stops the worker process
    inputs = _check_against_hf(path, hf, outs, prompts, [engine_kwargs] * 2)
    assert _soft_runs(outs[0].prompt_token_ids, soft) == [IMAGE_TOKENS] * 3  # 2 crops of 300
    assert _soft_runs(outs[1].prompt_token_ids, soft) == [IMAGE_TOKENS]
    # under the ratio: exactly the ids of a plain image
    plain = _hf_inputs(path, prompts[1], {})["input_ids"][0].tolist()
    assert inputs[1]["input_ids"][0].tolist() == plain == outs[1].prompt_token_ids
