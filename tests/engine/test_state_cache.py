"""State slots of hybrid models, and the scheduler admitting against them: no JAX."""

import subprocess
import sys

import pytest

from jaxmm.engine.block_manager import BlockManager
from jaxmm.engine.scheduler import Scheduler
from jaxmm.engine.sequence import Sequence
from jaxmm.engine.state_cache import StateSlots, StateSnapshots, snapshot_point


def seq(tokens, rid="r"):
    return Sequence(request_id=rid, token_ids=list(tokens), num_prompt_tokens=len(tokens))


def step(sched):
    batch = sched.schedule()
    for s in sched.postprocess(batch):
        s.token_ids.append(7)
    return batch


def test_no_jax_import():
    code = "import sys, jaxmm.engine.state_cache; assert 'jax' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_slots_allocate_free_and_reuse():
    slots = StateSlots(2)
    assert slots.spare == 2 and slots.num_free == 2
    a, b = slots.allocate(10), slots.allocate(11)
    assert {a, b} == {0, 1} and slots.allocate(10) == a  # idempotent
    assert not slots.can_allocate(12) and slots.can_allocate(10)
    with pytest.raises(RuntimeError):
        slots.allocate(12)
    slots.free(10)
    assert slots.slot_of(10) is None and slots.allocate(12) == a
    slots.free(99)  # unknown: nothing happens
    assert slots.usage == 1.0


def test_scheduler_admits_against_free_slots_and_frees_them():
    slots = StateSlots(2)
    sched = Scheduler(8, 64, BlockManager(64, 4), state_slots=slots)
    a, b, c = seq(range(5), "a"), seq(range(6), "b"), seq(range(7), "c")
    for s in (a, b, c):
        sched.add(s)
    batch = step(sched)
    assert batch.seqs == [a, b] and list(sched.waiting) == [c]  # pages were free, slots not
    assert {slots.slot_of(a.seq_id), slots.slot_of(b.seq_id)} == {0, 1}
    freed = slots.slot_of(a.seq_id)
    sched.finish(a, "stop")
    assert slots.slot_of(a.seq_id) is None
    batch = step(sched)
    assert c in batch.seqs and slots.slot_of(c.seq_id) == freed


def test_preemption_frees_the_slot():
    slots = StateSlots(4)
    sched = Scheduler(8, 64, BlockManager(4, 4), state_slots=slots)  # 16 tokens of pages
    a, b = seq(range(7), "a"), seq(range(7), "b")
    sched.add(a)
    sched.add(b)
    step(sched)  # both prefilled: 2 pages each, every page taken
    step(sched)  # the 8th token still fits
    batch = step(sched)  # each 9th token needs a third page: b is preempted
    assert b in batch.preempted and slots.slot_of(b.seq_id) is None
    assert slots.slot_of(a.seq_id) is not None and b.num_computed_tokens == 0


def test_hybrid_block_manager_takes_no_prefix_hit():
    for recurrent, hit in ((False, 8), (True, 0)):
        bm = BlockManager(16, 4, recurrent_state=recurrent)
        first = seq(range(10))
        bm.admit(first)
        bm.ensure_slots(first, 10)
        first.num_computed_tokens = 10
        bm.register_full_blocks(first)
        assert bm.admit(seq(range(10))) == hit


def test_snapshots_are_least_recently_used_first_out():
    snaps = StateSnapshots(first=4, count=2)
    a, b = snaps.put(101), snaps.put(102)
    assert {a, b} == {4, 5} and snaps.put(101) == a and len(snaps) == 2
    assert snaps.get(101) == a  # 102 is now the least recently used
    c = snaps.put(103)
    assert c == b and not snaps.has(102) and snaps.has(101) and snaps.has(103)
    snaps.clear()
    assert len(snaps) == 0 and snaps.get(101) is None and snaps.put(104) in (4, 5)


def test_hybrid_hits_stop_at_the_last_snapshot():
    bm = BlockManager(16, 4, recurrent_state=True)
    first = seq(range(14))
    bm.admit(first)
    bm.ensure_slots(first, 14)
    first.num_computed_tokens = 14
    bm.register_full_blocks(first)  # 3 full pages cached
    kept = {first.block_hashes[1]}  # a snapshot after 2 pages only
    bm.has_state_snapshot = kept.__contains__
    again = seq(range(14))
    assert bm.admit(again) == 8 and again.block_hashes == first.block_hashes[:2]
    kept.clear()
    assert bm.admit(seq(range(14))) == 0


def test_prefill_chunk_ends_at_the_snapshot_point():
    bm = BlockManager(64, 4, recurrent_state=True)
    bm.has_state_snapshot = lambda h: False
    sched = Scheduler(8, 64, bm, state_slots=StateSlots(2))
    a = seq(range(11), "a")  # snapshot point: (11 - 1) // 4 * 4 = 8
    sched.add(a)
    assert step(sched).num_new_tokens == [8]
    assert step(sched).num_new_tokens == [3]
    assert snapshot_point(11, 4) == 8 and snapshot_point(4, 4) == 0
