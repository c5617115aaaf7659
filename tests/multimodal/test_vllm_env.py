"""vLLM's media-fetch environment variables, read as aliases of the JAXMM_* ones.

VLLM_IMAGE_FETCH_TIMEOUT / VLLM_VIDEO_FETCH_TIMEOUT / VLLM_AUDIO_FETCH_TIMEOUT /
VLLM_MEDIA_URL_ALLOW_REDIRECTS apply when the JAXMM_* name is unset (JAXMM_* wins), and act
on real fetches from a local HTTP server (test_media's: /slow answers after 3 s, /redirect
sends to the image).
"""

from __future__ import annotations

import time

import pytest

from jaxmm.multimodal.fetch import VLLM_ENV_ALIASES, MediaError, MediaPolicy, fetch_bytes
from tests.multimodal import test_media as tm

server = tm.server  # the local HTTP server fixture


@pytest.fixture
def clean_env(monkeypatch):
    for jaxmm_name, vllm_name in VLLM_ENV_ALIASES.items():
        monkeypatch.delenv(jaxmm_name, raising=False)
        monkeypatch.delenv(vllm_name, raising=False)
    return monkeypatch


def test_vllm_names_set_the_policy(clean_env):
    env = clean_env
    env.setenv("VLLM_IMAGE_FETCH_TIMEOUT", "1.5")
    env.setenv("VLLM_VIDEO_FETCH_TIMEOUT", "7")
    env.setenv("VLLM_AUDIO_FETCH_TIMEOUT", "3")
    env.setenv("VLLM_MEDIA_URL_ALLOW_REDIRECTS", "1")
    p = MediaPolicy()
    assert (p.image_timeout_s, p.video_timeout_s, p.audio_timeout_s) == (1.5, 7.0, 3.0)
    assert p.allow_redirects is True
    env.setenv("JAXMM_IMAGE_FETCH_TIMEOUT", "2.5")  # the project's own name wins
    env.setenv("JAXMM_MEDIA_URL_ALLOW_REDIRECTS", "0")
    p = MediaPolicy()
    assert p.image_timeout_s == 2.5 and p.allow_redirects is False
    env.setenv("VLLM_AUDIO_FETCH_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="VLLM_AUDIO_FETCH_TIMEOUT='soon'"):
        MediaPolicy()


def test_vllm_names_act_on_fetches(clean_env, server):
    local = ("127.0.0.1",)
    with pytest.raises(MediaError, match="redirect"):
        fetch_bytes(f"{server}/redirect", "image", MediaPolicy(allowed_media_domains=local))
    clean_env.setenv("VLLM_MEDIA_URL_ALLOW_REDIRECTS", "true")
    clean_env.setenv("VLLM_IMAGE_FETCH_TIMEOUT", "0.5")
    policy = MediaPolicy.from_env(allowed_media_domains=local)
    assert fetch_bytes(f"{server}/redirect", "image", policy)[0] == tm.RED_PNG
    start = time.monotonic()
    with pytest.raises(MediaError, match="timed out"):
        fetch_bytes(f"{server}/slow", "image", policy)
    assert time.monotonic() - start < 2.5  # 0.5 s + slack, not the 3 s the server takes
