"""A fake core engine and tokenizer for server tests: answers you can work out by hand.

Tokens are characters (id = ord(c), BOS = 1, EOS = 2). Completion j of a request writes the
alphabet from letter j on ("abcdef..." for j = 0), one letter per step, so `stop="def"`
must end the text at "abc". A prompt containing "BOOM" makes the next step raise; one
containing "SLOW" makes every step sleep `slow_step_s`.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

from jaxmm.outputs import CompletionOutput, Logprob, RequestOutput

BOS, EOS = 1, 2


class FakeTokenizer:
    chat_template = "fake"
    eos_token_id = EOS

    def __call__(self, text: str, add_special_tokens: bool = True):
        ids = [ord(c) for c in text]
        return SimpleNamespace(input_ids=([BOS] if add_special_tokens else []) + ids)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids if i >= 32)

    def apply_chat_template(
        self,
        conversation,
        chat_template=None,
        add_generation_prompt=True,
        continue_final_message=False,
        tools=None,
        tokenize=False,
        **kw,
    ):
        text = "".join(f"<{m['role']}>{m['content']}" for m in conversation)
        return text + ("<assistant>" if add_generation_prompt else "")


class _Req:
    def __init__(self, rid, text, ids, params):
        self.rid, self.text, self.ids, self.params = rid, text, ids, params
        self.outs = [[] for _ in range(params.n)]
        self.reasons = [None] * params.n
        self.stop_reasons = [None] * params.n
        self.lps = [[] for _ in range(params.n)]

    @property
    def finished(self):
        return all(r is not None for r in self.reasons)


class FakeCoreEngine:
    def __init__(self, max_model_len: int = 64, slow_step_s: float = 0.05):
        self.tokenizer = FakeTokenizer()
        self.max_model_len = max_model_len
        self.hf_config = SimpleNamespace(architectures=["FakeForCausalLM"])
        self.runner = SimpleNamespace(vocab_size=256)
        self.slow_step_s = slow_step_s
        self.requests: dict[str, _Req] = {}
        self.aborted: list[str] = []
        self.num_steps = 0

    def tokenize(self, prompt):
        if isinstance(prompt, str):
            return prompt, self.tokenizer(prompt).input_ids
        if "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            if not all(isinstance(t, int) for t in ids):
                raise ValueError("prompt_token_ids must be a list of integers")
            return prompt.get("prompt"), list(ids)
        return self.tokenize(prompt["prompt"])

    def add_request(
        self, request_id, prompt, params, arrival_time=None, *, prompt_ids=None, mm=None
    ):
        if prompt_ids is None:
            prompt, prompt_ids = self.tokenize(prompt)
        if not prompt_ids:
            raise ValueError("the prompt is empty: it must contain at least one token")
        if len(prompt_ids) > self.max_model_len:
            raise ValueError(
                f"the prompt is {len(prompt_ids)} tokens long, longer than the "
                f"maximum model length of {self.max_model_len} tokens"
            )
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        text = prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt_ids)
        self.requests[request_id] = _Req(request_id, text, list(prompt_ids), params)

    def abort_request(self, request_id):
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            if self.requests.pop(rid, None) is not None:
                self.aborted.append(rid)

    def has_unfinished_requests(self):
        return bool(self.requests)

    def get_stats(self):
        return {
            "num_running": len(self.requests),
            "num_waiting": 0,
            "kv_cache_usage": 0.25,
            "prefix_cache_queries": 4,
            "prefix_cache_hits": 1,
            "prefix_cache_hit_rate": 0.25,
            "num_preemptions": 0,
        }

    def step(self):
        self.num_steps += 1
        if any("BOOM" in (r.text or "") for r in self.requests.values()):
            raise RuntimeError("kaboom: device fell over")
        if any("SLOW" in (r.text or "") for r in self.requests.values()):
            time.sleep(self.slow_step_s)
        outputs = []
        for req in list(self.requests.values()):
            p = req.params
            for j in range(p.n):
                if req.reasons[j] is not None:
                    continue
                out = req.outs[j]
                tok = ord("a") + (j + len(out)) % 26
                out.append(tok)
                if p.logprobs is not None:
                    entry = {tok: Logprob(-0.5, 1, chr(tok))}
                    for r in range(2, p.logprobs + 1):
                        alt = ord("A") + r
                        entry[alt] = Logprob(-0.5 - r, r, chr(alt))
                    req.lps[j].append(entry)
                text = self.tokenizer.decode(out)
                for s in p.stop_strings:
                    if s in text:
                        req.reasons[j], req.stop_reasons[j] = "stop", s
                if req.reasons[j] is None and (
                    (p.max_tokens is not None and len(out) >= p.max_tokens)
                    or len(req.ids) + len(out) >= self.max_model_len
                ):
                    req.reasons[j] = "length"
            outputs.append(self._output(req))
            if req.finished:
                del self.requests[req.rid]
        return outputs

    def _output(self, req):
        outs = []
        for j in range(req.params.n):
            text = self.tokenizer.decode(req.outs[j])
            if req.reasons[j] == "stop":
                text = text[: text.index(req.stop_reasons[j])]
            outs.append(
                CompletionOutput(
                    index=j,
                    text=text,
                    token_ids=list(req.outs[j]),
                    cumulative_logprob=None,
                    logprobs=list(req.lps[j]) if req.params.logprobs is not None else None,
                    finish_reason=req.reasons[j],
                    stop_reason=req.stop_reasons[j],
                )
            )
        return RequestOutput(
            request_id=req.rid,
            prompt=req.text,
            prompt_token_ids=req.ids,
            outputs=outs,
            finished=req.finished,
        )
