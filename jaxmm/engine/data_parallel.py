"""Data parallelism: independent engine replicas on disjoint device groups, one client.

1. `DataParallelEngine(config)` starts `data_parallel_size` engine processes
   (`ProcessEngine`), all at once. Replica r runs on devices [r * tp, (r + 1) * tp): on GPUs
   its process sees only those (CUDA_VISIBLE_DEVICES, since a process reserves memory on
   every GPU it sees); elsewhere (CPU, faked devices in tests) it sees all and builds its
   mesh from device r * tp on ($JAXMM_FIRST_DEVICE, read by the runner's `make_mesh`).
   Each replica has its own scheduler, KV cache and prefix cache.
2. `add_request` tokenizes once, then picks a replica (`Balancer`): the one with the least
   outstanding work (prompt plus allowed output tokens of its unfinished requests), unless
   the prompt's first pages were last sent to a replica that is not much busier: that one
   holds them in its prefix cache.
3. The request's stream is the replica's, wrapped so that its work is released when it
   finishes, fails or is aborted.
4. `get_stats` sums the replicas' counters and keeps each replica's own under "replicas"
   (the server's metrics export them labelled by engine).

The server and `LLM(data_parallel_size=...)` both use this client; it has the server's
`EngineClient` interface.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import glob
import hashlib
import logging
import os
from collections import OrderedDict
from typing import Any

from jaxmm.engine.async_engine import EngineDeadError, EngineView, RequestStream
from jaxmm.engine.core_process import ProcessEngine
from jaxmm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# read by jaxmm.runner.model_runner.make_mesh (the runner imports nothing of the engine)
FIRST_DEVICE_ENV = "JAXMM_FIRST_DEVICE"
# a prompt's prefix is keyed by its first pages, at most this many tokens of them
PREFIX_KEY_TOKENS = 256
PREFIX_PAGE = 16
# a replica holding a prompt's prefix gets it unless its work exceeds the least loaded
# replica's by more than this many tokens (recomputing a prefix costs about its length)
PREFIX_SLACK_TOKENS = 4096
_PREFIX_MEMORY = 65536  # prefixes remembered (least recently used forgotten)


def _visible_gpus(environ) -> list[str]:
    """The GPU ids a child process would see, or [] when JAX will not use GPUs."""
    platforms = environ.get("JAX_PLATFORMS", "")
    if platforms and not any(p in platforms for p in ("cuda", "gpu", "rocm")):
        return []
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    return sorted(
        (os.path.basename(p)[len("nvidia") :] for p in glob.glob("/dev/nvidia[0-9]*")), key=int
    )


def replica_env(rank: int, tp: int, dp: int, environ=None) -> dict[str, str]:
    """Environment variables that put replica `rank` on its own `tp` devices."""
    environ = os.environ if environ is None else environ
    gpus = _visible_gpus(environ)
    if gpus:
        if dp * tp > len(gpus):
            raise ValueError(
                f"data_parallel_size={dp} x tensor_parallel_size={tp} needs {dp * tp} GPUs; "
                f"{len(gpus)} are visible"
            )
        mine = gpus[rank * tp : (rank + 1) * tp]
        return {"CUDA_VISIBLE_DEVICES": ",".join(mine), FIRST_DEVICE_ENV: "0"}
    return {FIRST_DEVICE_ENV: str(rank * tp)}


def prefix_key(prompt_ids: list[int]) -> bytes | None:
    """A digest of the prompt's first whole pages (None for prompts under one page)."""
    n = min(len(prompt_ids), PREFIX_KEY_TOKENS) // PREFIX_PAGE * PREFIX_PAGE
    if n == 0:
        return None
    return hashlib.blake2b(repr(prompt_ids[:n]).encode(), digest_size=16).digest()


class Balancer:
    """Which replica takes the next request (plain Python, no processes: unit-testable)."""

    def __init__(self, num_replicas: int):
        self.work = [0] * num_replicas  # outstanding tokens per replica
        self.owner: dict[str, tuple[int, int]] = {}  # request id -> (replica, work)
        self._prefixes: OrderedDict[bytes, int] = OrderedDict()

    def pick(self, request_id: str, prompt_ids: list[int], max_new: int) -> int:
        least = min(range(len(self.work)), key=lambda r: (self.work[r], r))
        choice = least
        key = prefix_key(prompt_ids)
        if key is not None:
            holder = self._prefixes.get(key)
            if holder is not None and self.work[holder] - self.work[least] <= PREFIX_SLACK_TOKENS:
                choice = holder  # its prefix cache has the first pages
            self._prefixes[key] = choice
            self._prefixes.move_to_end(key)
            if len(self._prefixes) > _PREFIX_MEMORY:
                self._prefixes.popitem(last=False)
        cost = len(prompt_ids) + max_new
        self.work[choice] += cost
        self.owner[request_id] = (choice, cost)
        return choice

    def release(self, request_id: str) -> None:
        got = self.owner.pop(request_id, None)
        if got is not None:
            self.work[got[0]] -= got[1]


class _TrackedStream:
    """A replica's RequestStream that releases the request's work once it is over."""

    def __init__(self, stream: RequestStream, release):
        self._stream = stream
        self._release = release

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def __aiter__(self):
        return self

    async def __anext__(self):
        try:
            out = await self._stream.__anext__()
        except BaseException:
            self._release()
            raise
        if out.finished:
            self._release()
        return out

    def abort(self) -> None:
        self._release()
        self._stream.abort()


class DataParallelEngine(EngineView):
    """`data_parallel_size` ProcessEngine replicas behind one EngineClient."""

    def __init__(self, config, *, startup_timeout: float | None = None):
        dp, tp = config.data_parallel_size, config.tensor_parallel_size
        one = dataclasses.replace(
            config, parallel=dataclasses.replace(config.parallel, data_parallel_size=1)
        )
        envs = [replica_env(r, tp, dp) for r in range(dp)]

        def start(r: int) -> ProcessEngine:
            return ProcessEngine(
                one, startup_timeout=startup_timeout, env=envs[r], name=f"jaxmm-engine-dp{r}"
            )

        # every replica loads and compiles at the same time
        with concurrent.futures.ThreadPoolExecutor(dp) as pool:
            futures = [pool.submit(start, r) for r in range(dp)]
            started, errors = [], []
            for f in futures:
                try:
                    started.append(f.result())
                except BaseException as e:
                    errors.append(e)
        if errors:
            for client in started:
                client.shutdown()
            raise errors[0]
        self.replicas: list[ProcessEngine] = started
        self.engine = started[0].engine  # the front end: tokenizer, configs (no device)
        self.balancer = Balancer(dp)
        logger.info("%d data-parallel replicas of %d device(s) each are ready", dp, tp)

    # -- what the server reads ------------------------------------------------------------------
    @property
    def is_running(self) -> bool:
        return all(r.is_running for r in self.replicas)

    @property
    def pids(self) -> list[int | None]:
        return [r.pid for r in self.replicas]

    def get_stats(self) -> dict:
        per = [r.get_stats() for r in self.replicas]
        total: dict[str, Any] = {}
        for s in per:
            for k, v in s.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    total[k] = total.get(k, 0) + v
        n = len(per)
        if "kv_cache_usage" in total:
            total["kv_cache_usage"] /= n
        queries = total.get("prefix_cache_queries", 0)
        total["prefix_cache_hit_rate"] = (
            total.get("prefix_cache_hits", 0) / queries if queries else 0.0
        )
        total["replicas"] = [dict(s, outstanding_tokens=w) for s, w in zip(per, self.balancer.work)]
        return total

    # -- requests -------------------------------------------------------------------------------
    async def add_request(
        self,
        request_id: str,
        prompt: str | None,
        params: SamplingParams,
        *,
        prompt_ids: list[int] | None = None,
        mm: Any = None,
        arrival_time: float | None = None,
    ):
        if not self.is_running:
            raise EngineDeadError("an engine replica is not running")
        if request_id in self.balancer.owner:
            raise ValueError(f"request id {request_id!r} is already running")
        if prompt_ids is None and mm is None:
            prompt, prompt_ids = self.engine.tokenize(prompt)
        ids = list(prompt_ids or ())
        room = max(0, self.engine.max_model_len - len(ids))
        max_new = room if params.max_tokens is None else min(params.max_tokens, room)
        r = self.balancer.pick(request_id, ids, max_new * max(1, getattr(params, "n", 1) or 1))
        try:
            stream = await self.replicas[r].add_request(
                request_id,
                prompt,
                params,
                prompt_ids=prompt_ids,
                mm=mm,
                arrival_time=arrival_time,
            )
        except BaseException:
            self.balancer.release(request_id)
            raise
        return _TrackedStream(stream, lambda: self.balancer.release(request_id))

    def abort(self, request_id: str | list[str]) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            got = self.balancer.owner.get(rid)
            if got is not None:
                self.balancer.release(rid)
                self.replicas[got[0]].abort(rid)

    def call(self, fn, *args, timeout: float | None = None) -> list:
        """`fn(engine, *args)` in every replica's core; their results, in replica order."""
        return [r.call(fn, *args, timeout=timeout) for r in self.replicas]

    def shutdown(self, timeout: float = 10.0) -> None:
        with concurrent.futures.ThreadPoolExecutor(len(self.replicas)) as pool:
            list(pool.map(lambda r: r.shutdown(timeout), self.replicas))


def reset_prefix_cache(engine) -> bool:
    """Run in each replica's core (`DataParallelEngine.call`)."""
    return bool(engine.reset_prefix_cache())


def run_to_completion(
    client: DataParallelEngine,
    request_ids: list[str],
    requests: list[tuple[str | None, list[int] | None]],
    params: list[SamplingParams],
) -> list:
    """Offline: every (prompt text, prompt ids) request through the replicas at once; their
    final RequestOutputs in order (`LLM.generate` with data_parallel_size > 1)."""

    async def one(rid: str, text, ids, sp):
        final = None
        async for out in client.generate(rid, text, sp, prompt_ids=ids):
            final = out
        return final

    async def every():
        tasks = [
            asyncio.ensure_future(one(rid, text, ids, sp))
            for rid, (text, ids), sp in zip(request_ids, requests, params, strict=True)
        ]
        try:
            return await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    return asyncio.run(every())
