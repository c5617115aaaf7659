"""Media prepared in worker processes (`mm_processor_workers`) give the in-process results."""

from __future__ import annotations

import base64
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from jaxmm.multimodal.fetch import MediaError
from jaxmm.multimodal.inputs import prepare_multimodal_prompt
from tests.multimodal.test_inputs import I_PH, V_PH, image, make_engine, model_dir, png_bytes

__all__ = ["model_dir"]  # the fixture, shared with test_inputs


@pytest.fixture(scope="module")
def pooled(model_dir):
    engine = make_engine(model_dir, mm_processor_workers=2)
    fe = engine.mm_frontend()
    assert fe.workers is not None and fe.workers.num_workers == 2
    fe.workers.wait_started()
    yield engine
    fe.close()


def _prompts():
    a, b = image(40, 50, 0), image(16, 24, 1)
    frames = np.random.RandomState(0).randint(0, 255, (8, 16, 24, 3), np.uint8)
    data_url = "data:image/png;base64," + base64.b64encode(png_bytes(b)).decode()
    return [
        {"prompt": f"Hi {I_PH} and {I_PH} end", "multi_modal_data": {"image": [a, b]}},
        {"prompt": f"x {I_PH}", "multi_modal_data": {"image": png_bytes(a)}},
        {"prompt": f"y {I_PH}", "multi_modal_data": {"image": data_url}},
        {"prompt": f"v {V_PH}", "multi_modal_data": {"video": (frames, {"fps": 8.0})}},
        {
            "prompt": f"z {I_PH}",
            "multi_modal_data": {"image": np.asarray(a)},
            "mm_processor_kwargs": {"max_pixels": 16 * 16},
        },
    ]


def _same(got, want):
    (t1, ids1, mm1), (t2, ids2, mm2) = got, want
    assert t1 == t2 and ids1 == ids2
    assert [(i.start, i.end, i.modality, i.cache_key) for i in mm1.items] == [
        (i.start, i.end, i.modality, i.cache_key) for i in mm2.items
    ]
    for x, y in zip(mm1.items, mm2.items, strict=True):
        assert x.meta == y.meta
        np.testing.assert_array_equal(
            np.asarray(x.data["pixel_values"]), np.asarray(y.data["pixel_values"])
        )


def test_workers_prepare_what_the_engine_process_prepares(model_dir, pooled):
    local = make_engine(model_dir, media_io_kwargs={"video": {"num_frames": 4}})
    engine = make_engine(model_dir, media_io_kwargs={"video": {"num_frames": 4}})
    engine._fe = pooled.mm_frontend()  # the pooled front end, with the video options
    engine._fe.media_io_kwargs = local.mm_frontend().media_io_kwargs
    want = [prepare_multimodal_prompt(local, p) for p in _prompts()]
    assert local.mm_frontend().workers is None
    got = [prepare_multimodal_prompt(engine, p) for p in _prompts()]
    for g, w in zip(got, want, strict=True):
        _same(g, w)
    # all at once: the items of every prompt go to the workers before any is waited on
    fe = engine.mm_frontend()
    fe.cache._entries.clear()
    fe.cache.nbytes = 0
    for g, w in zip(fe.prepare_many(_prompts()), want, strict=True):
        _same(g, w)
    # the parent decoded nothing: each item came back from a worker as host inputs
    assert all(it.data is not None for _, _, mm in got for it in mm.items)


def test_worker_errors_are_the_requests_own(pooled):
    fe = pooled.mm_frontend()
    bad = {"prompt": f"x {I_PH}", "multi_modal_data": {"image": b"\x89PNG\r\n\x1a\nbroken"}}
    with pytest.raises(MediaError, match="corrupt"):
        prepare_multimodal_prompt(pooled, bad)
    huge = {"prompt": f"x {I_PH}", "multi_modal_data": {"image": "file:///etc/passwd"}}
    with pytest.raises(MediaError) as info:
        prepare_multimodal_prompt(pooled, huge)
    assert info.value.status in (400, 403)
    # the pool keeps serving
    _, _, mm = prepare_multimodal_prompt(
        pooled, {"prompt": f"x {I_PH}", "multi_modal_data": {"image": image(16, 16, 9)}}
    )
    assert mm.items[0].end - mm.items[0].start == 4
    assert fe.workers is not None


def test_uuid_hits_skip_the_workers(pooled):
    img = image(16, 24, 6)
    prompt = {"prompt": f"look {I_PH}", "multi_modal_uuids": {"image": "pooled-cat"}}
    _, ids1, mm1 = prepare_multimodal_prompt(pooled, {**prompt, "multi_modal_data": {"image": img}})
    fe = pooled.mm_frontend()
    started = fe.start({**prompt, "multi_modal_data": {"image": None}})
    assert all(it.pending is None for it in started[1])
    _, ids2, mm2 = fe.finish(started)
    assert ids1 == ids2 and mm2.items[0].key == "pooled-cat"
    assert mm2.items[0].data is mm1.items[0].data
    # sent again with its media: still the cached item, no worker job
    started = fe.start({**prompt, "multi_modal_data": {"image": img}})
    assert all(it.pending is None for it in started[1])
    assert fe.finish(started)[2].items[0].data is mm1.items[0].data


def test_workers_stop_with_their_engine(model_dir, tmp_path):
    """Workers of a killed engine process exit by themselves; a closed pool leaves none."""
    script = textwrap.dedent(
        f"""
        import os, sys, time
        sys.path.insert(0, {os.getcwd()!r})
        from jaxmm.multimodal.workers import MediaWorkers
        w = MediaWorkers(2, ({model_dir!r}, {{}}, False))
        w.wait_started()
        import multiprocessing
        print(" ".join(str(p.pid) for p in multiprocessing.active_children()), flush=True)
        time.sleep(600)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) >= 2
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    deadline = time.monotonic() + 20
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in pids if _alive(p)]
    assert not alive, f"workers {alive} outlived their engine"
    before = set(multiprocessing.active_children())
    assert all(p.pid not in pids for p in before)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not reaped by its dead parent's init yet) is gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def test_offline_generate_with_workers_gives_the_same_tokens(ckpt_root):
    """LLM.generate prepares the prompts' media in the workers together; the tokens are those
    of media prepared in the engine's process."""
    from jaxmm import LLM, SamplingParams
    from tests.models.test_vlm_parity import I_QWEN, make_qwen

    path = make_qwen(ckpt_root, "qwen2_vl", seed=1)
    llm = LLM(
        path,
        dtype="float32",
        max_model_len=256,
        max_num_batched_tokens=64,
        mm_processor_workers=2,
        enable_prefix_caching=False,
    )
    fe = llm.llm_engine.mm_frontend()
    assert fe.workers is not None
    imgs = [image(40, 48, 20), image(32, 32, 21), image(24, 56, 22)]
    prompts = [
        {"prompt": f"a {I_QWEN} b", "multi_modal_data": {"image": png_bytes(imgs[0])}},
        {"prompt": f"c {I_QWEN}{I_QWEN}", "multi_modal_data": {"image": imgs[1:]}},
        {"prompt": f"d {I_QWEN} e", "multi_modal_data": {"image": np.asarray(imgs[2])}},
    ]
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    try:
        pooled = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    finally:
        fe.close()  # from here on, media are prepared in this process
    assert fe.workers is None
    fe.cache._entries.clear()
    fe.cache.nbytes = 0
    llm.llm_engine.reset_mm_cache()
    local = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert pooled == local and all(len(t) == 5 for t in pooled)
