"""Multi-host serving on JAX's own multi-controller runtime (`jax.distributed`).

One process per host; together they run one SPMD program over a mesh that spans every
host's devices (`jax.devices()` lists them all, in process order).

1. Every process calls `initialize(parallel_config)`: `jax.distributed.initialize` with the
   coordinator address, process count and id from the flags, or, without them, from the
   cluster's environment as JAX detects it (TPU VM pod slices, SLURM, Open MPI, Kubernetes
   through its own variables). A host that does not join within `distributed_timeout_s`
   gives an error that says so.
2. Every process builds the same engine: an `LLMEngine` with the same config, so that the
   model, the KV cache and the warmup programs are placed on the global mesh in the same
   order (each of those is a collective step of the multi-controller runtime).
3. The leader (process 0) schedules. Its runner is a `LeaderRunner`: before each call that
   runs a program on the devices (`dispatch`, `encode`, `encode_cross`, `logits`, ...) it
   publishes the call's host inputs on the coordinator's key-value store, numbered in order.
4. Followers (`follow`) only run steps: they read each call and make it on their own
   runner, so every process launches the same program with the same inputs. A handle the
   leader passes back (the previous step's sampled tokens, still on device) is named by its
   number; a grammar bitmask, filled on the leader's host while the step runs, follows its
   step as a message of its own.
5. Shutdown: the leader publishes "stop" and each follower leaves its loop and disconnects.
   A host that dies stops the others at the runtime's heartbeat timeout.

The key-value store is the runtime's own coordination service (the gRPC channel
`jax.distributed` opens); step inputs are small (token ids, positions, page tables).
"""

from __future__ import annotations

import logging
import os
import pickle
import sys
import threading
from typing import Any

logger = logging.getLogger(__name__)

_PREFIX = "jaxmm/step/"
# a message may be deleted once this many newer ones exist: every step is a collective
# program that no process can finish alone, so no follower is ever that far behind
_KEEP = 64
_POLL_MS = 10_000  # a follower waits this long per read, then waits again (idle server)


def wants_distributed(parallel) -> bool:
    """Whether this config runs on several processes (hosts)."""
    return bool(
        parallel.distributed
        or parallel.coordinator_address
        or (parallel.num_processes or 1) > 1
        or parallel.process_id is not None
    )


def initialize(parallel) -> int:
    """`jax.distributed.initialize` from the flags (or the cluster's environment); returns
    this process's index. A no-op when already initialized."""
    import jax
    from jax._src import distributed as jax_distributed

    if jax_distributed.global_state.client is None:
        timeout = int(parallel.distributed_timeout_s)
        # JAX ends the process from C++ when its own deadline passes (an abort, with an RPC
        # status for message): a watchdog just before it says what went wrong, and exits
        kwargs: dict[str, Any] = {"initialization_timeout": timeout + 30}
        if parallel.coordinator_address:
            kwargs["coordinator_address"] = parallel.coordinator_address
        if parallel.num_processes is not None:
            kwargs["num_processes"] = int(parallel.num_processes)
        if parallel.process_id is not None:
            kwargs["process_id"] = int(parallel.process_id)
        where = parallel.coordinator_address or "the coordinator the environment names"
        why = (
            f"jax.distributed could not start: not every one of "
            f"{parallel.num_processes or 'the'} processes joined {where} within {timeout} s "
            "(is a host missing or unreachable?)"
        )
        watchdog = threading.Timer(timeout, _give_up, (why,))
        watchdog.daemon = True
        watchdog.start()
        try:
            jax.distributed.initialize(**kwargs)
        except Exception as e:
            raise RuntimeError(f"{why}: {e}") from e
        finally:
            watchdog.cancel()
    logger.info(
        "process %d of %d; %d devices in all, %d here",
        jax.process_index(),
        jax.process_count(),
        len(jax.devices()),
        len(jax.local_devices()),
    )
    return jax.process_index()


def _give_up(why: str) -> None:
    logger.error("%s", why)
    print(f"error: {why}", file=sys.stderr, flush=True)
    os._exit(1)


class Channel:
    """Numbered messages from the leader to every follower, on the runtime's key-value
    store (pickled host data: lists, dicts, numpy arrays)."""

    def __init__(self):
        from jax._src import distributed as jax_distributed

        self.client = jax_distributed.global_state.client
        if self.client is None:
            raise RuntimeError("jax.distributed is not initialized")
        self.seq = 0

    def send(self, msg: tuple) -> None:
        self.client.key_value_set_bytes(f"{_PREFIX}{self.seq}", pickle.dumps(msg, protocol=5))
        if self.seq >= _KEEP:
            try:
                self.client.key_value_delete(f"{_PREFIX}{self.seq - _KEEP}")
            except Exception:  # already gone: nothing to free
                pass
        self.seq += 1

    def recv(self) -> tuple:
        while True:
            try:
                data = self.client.blocking_key_value_get_bytes(f"{_PREFIX}{self.seq}", _POLL_MS)
                break
            except Exception as e:
                if "DEADLINE_EXCEEDED" not in str(e) and "timed out" not in str(e).lower():
                    raise
        self.seq += 1
        return pickle.loads(data)


class LeaderRunner:
    """The leader's ModelRunner: each device call is published for the followers first."""

    def __init__(self, runner, channel: Channel):
        self._runner = runner
        self._channel = channel
        self._handles = 0
        self._stopped = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runner, name)

    def dispatch(self, steps, prev=None, fill_masks=None):
        prev_id = None if prev is None else prev.handle_id
        self._channel.send(("dispatch", steps, prev_id, fill_masks is not None))
        wrapped = None
        if fill_masks is not None:

            def wrapped(bitmask) -> None:
                fill_masks(bitmask)
                self._channel.send(("mask", bitmask))

        handle = self._runner.dispatch(steps, prev, wrapped)
        handle.handle_id = self._handles
        self._handles += 1
        return handle

    def _publish(name: str):
        def call(self, *args):
            self._channel.send((name, *args))
            return getattr(self._runner, name)(*args)

        call.__name__ = name
        return call

    execute = _publish("execute")
    logits = _publish("logits")
    encode = _publish("encode")
    encode_cross = _publish("encode_cross")
    warmup = _publish("warmup")
    sync_encoder_cache = _publish("sync_encoder_cache")
    del _publish

    def stop(self) -> None:
        """Release the followers (once: `LLM.shutdown` and exit both get here)."""
        if self._stopped:
            return
        self._stopped = True
        try:
            self._channel.send(("stop",))
        except Exception as e:  # the runtime is already down: the followers are too
            logger.warning("could not tell the followers to stop: %s", e)


def follow_steps(runner, channel: Channel) -> int:
    """A follower's loop: make every call the leader publishes, until "stop". Returns the
    number of calls made."""
    handles: dict[int, Any] = {}  # the leader's handle number -> this process's handle
    count = dispatched = 0
    while True:
        msg = channel.recv()
        kind = msg[0]
        if kind == "stop":
            return count
        count += 1
        if kind == "dispatch":
            _, steps, prev_id, masked = msg
            fill = None
            if masked:

                def fill(bitmask) -> None:
                    got = channel.recv()
                    if got[0] != "mask":
                        raise RuntimeError(f"expected the step's grammar mask, got {got[0]!r}")
                    bitmask[...] = got[1]

            prev = None if prev_id is None else handles[prev_id]
            handles[dispatched] = runner.dispatch(steps, prev, fill)
            handles.pop(dispatched - 4, None)  # the leader only passes back recent ones
            dispatched += 1
        elif kind == "mask":
            raise RuntimeError("a grammar mask arrived with no step to take it")
        else:
            getattr(runner, kind)(*msg[1:])


def build_engine(config):
    """The LLMEngine of this process: the plain one, or, under `jax.distributed`, the
    leader's (process 0, its runner publishing each step). Followers call `follow`."""
    from jaxmm.engine.llm_engine import LLMEngine

    if not wants_distributed(config.parallel):
        return LLMEngine(config)
    if initialize(config.parallel) != 0:
        raise RuntimeError("only process 0 serves; the others run `jaxmm serve` as followers")
    engine = LLMEngine(config)
    engine.runner = LeaderRunner(engine.runner, Channel())
    return engine


def stop_followers(engine) -> None:
    """The leader's shutdown: followers leave their loops."""
    runner = getattr(engine, "runner", None)
    if isinstance(runner, LeaderRunner):
        runner.stop()


def follow(config) -> int:
    """A follower host: build the same engine as the leader, then run the steps it publishes
    until it stops. Returns the number of device calls made."""
    import jax

    from jaxmm.engine.llm_engine import LLMEngine

    index = initialize(config.parallel)
    if index == 0:
        raise RuntimeError("process 0 is the leader: it serves, it does not follow")
    engine = LLMEngine(config)
    logger.info("follower %d ready: running the leader's steps", index)
    try:
        return follow_steps(engine.runner, Channel())
    finally:
        jax.distributed.shutdown()


def resolve_cluster(parallel) -> tuple[str | None, int | None, int | None]:
    """(coordinator address, process count, process id) from the flags, the rest from the
    cluster's environment as `jax.distributed.initialize` would read it (without starting
    anything), so the CLI knows whether this process leads or follows before it forks."""
    from jax._src import clusters

    addr, n, pid, _ = clusters.ClusterEnv.auto_detect_unset_distributed_params(
        parallel.coordinator_address,
        parallel.num_processes,
        parallel.process_id,
        None,
        None,
        int(parallel.distributed_timeout_s),
    )
    if addr is None or n is None or pid is None:
        raise ValueError(
            "multi-host: give --coordinator-address, --num-processes and --process-id, or "
            "run where JAX detects them (TPU VM pod slices, SLURM, Open MPI, Kubernetes)"
        )
    return addr, int(n), int(pid)
