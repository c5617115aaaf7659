"""Talk to `jaxmm serve` with the official OpenAI client.

    jaxmm serve /path/to/checkpoint --api-key sk-local &     # or no MODEL: the embedded default
    python examples/openai_chat_client.py --base-url http://127.0.0.1:8000/v1 --api-key sk-local

Prints one plain reply, then streams a second one token by token with usage at the end.
"""

from __future__ import annotations

import argparse

from openai import OpenAI


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default="EMPTY", help="the server's --api-key, if it has one")
    p.add_argument("--message", default="Write a haiku about compilers.")
    p.add_argument("--max-tokens", type=int, default=64)
    args = p.parse_args()

    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = client.models.list().data[0].id  # the server's first --served-model-name
    messages = [{"role": "user", "content": args.message}]

    reply = client.chat.completions.create(
        model=model, messages=messages, max_tokens=args.max_tokens, temperature=0.7
    )
    print(f"[{model}] {reply.choices[0].message.content}")
    print(f"usage: {reply.usage.prompt_tokens} prompt + {reply.usage.completion_tokens} completion")

    print("\nstreaming:")
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=args.max_tokens,
        stream=True,
        stream_options={"include_usage": True},
        # vLLM-style extensions go in extra_body
        extra_body={"top_k": 40, "repetition_penalty": 1.1},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
        if chunk.usage is not None:
            print(f"\nusage: {chunk.usage.completion_tokens} tokens")


if __name__ == "__main__":
    main()
