"""Reasoning out of generated text (`--reasoning-parser`, vLLM's names): the model thinks
between `<think>` and `</think>`, and that part goes to `reasoning_content`, the rest to
`content`, whole or streamed.

- `deepseek_r1`: the chat template opens `<think>` in the prompt, so the output starts in
  reasoning; everything up to `</think>` is reasoning (all of it while `</think>` has not
  come). A `<think>` the model writes itself is dropped.
- `qwen3`: thinking is optional (the template's `enable_thinking`); an output without
  `</think>` is all content, and reasoning is what precedes `</think>`.
"""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"
PARSERS = ("deepseek_r1", "qwen3")


def check_parser(name: str) -> str:
    if name not in PARSERS:
        raise ValueError(f"unknown reasoning parser {name!r}; known: {', '.join(PARSERS)}")
    return name


def split(parser: str, text: str) -> tuple[str | None, str | None]:
    """(reasoning_content, content) of a finished output."""
    body = text[text.index(OPEN) + len(OPEN) :] if OPEN in text else text
    if CLOSE not in body:
        if parser == "qwen3":
            return None, text
        return body or None, None
    reasoning, _, content = body.partition(CLOSE)
    return reasoning or None, content.lstrip("\n") or None


def _partial(text: str, tag: str) -> int:
    """How many trailing characters of text are a proper prefix of tag."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class ReasoningStream:
    """One choice's stream: each text delta -> {"reasoning_content": ...} and/or
    {"content": ...}. Characters that may begin a tag are held back until they cannot.

    qwen3 cannot know whether text before `</think>` is reasoning until the tag comes or
    the output ends; it streams it as reasoning once it has seen `<think>`, else as content.
    """

    def __init__(self, parser: str):
        self.parser = parser
        self.text = ""
        self.sent = 0  # characters of self.text accounted for
        self.in_reasoning = parser == "deepseek_r1"
        self.done_reasoning = False
        self.content_started = False

    def feed(self, delta: str, finished: bool) -> dict:
        self.text += delta
        out: dict = {}

        def emit(key: str, piece: str) -> None:
            if piece:
                out[key] = out.get(key, "") + piece

        while self.sent < len(self.text):
            rest = self.text[self.sent :]
            if self.done_reasoning:
                if not self.content_started:  # the newlines templates put after the tag
                    rest = rest.lstrip("\n")
                    self.content_started = bool(rest)
                emit("content", rest)
                self.sent = len(self.text)
                break
            if rest.startswith(OPEN):
                self.in_reasoning = True
                self.sent += len(OPEN)
                continue
            if rest.startswith(CLOSE):
                self.in_reasoning, self.done_reasoning = False, True
                self.sent += len(CLOSE)
                continue
            cut = min((rest.find(t) for t in (OPEN, CLOSE) if t in rest), default=-1)
            if cut < 0:
                cut = (
                    len(rest)
                    if finished
                    else len(rest) - max(_partial(rest, OPEN), _partial(rest, CLOSE))
                )
                if cut <= 0:
                    break
            emit("reasoning_content" if self.in_reasoning else "content", rest[:cut])
            self.sent += cut
        return out
