"""Scheduler and BlockManager in plain Python: no JAX, milliseconds."""

import subprocess
import sys

import pytest

from jaxmm.engine.block_manager import BlockManager
from jaxmm.engine.scheduler import Scheduler
from jaxmm.engine.sequence import Sequence, SequenceStatus


def seq(tokens, rid="r"):
    return Sequence(request_id=rid, token_ids=list(tokens), num_prompt_tokens=len(tokens))


def run_step(sched: Scheduler, new_token=7):
    batch = sched.schedule()
    for s in sched.postprocess(batch):
        s.token_ids.append(new_token)
    return batch


def test_no_jax_import():
    code = (
        "import sys, jaxmm.engine.scheduler, jaxmm.engine.block_manager, jaxmm.engine.sequence;"
        "import jaxmm.engine.detokenizer, jaxmm.engine.prompts;"
        "import jaxmm.multimodal.inputs, jaxmm.multimodal.chat, jaxmm.multimodal.media;"
        "import jaxmm.multimodal.audio_inputs, jaxmm.multimodal.processor;"
        "assert 'jax' not in sys.modules, 'jax imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_decodes_first_and_chunked_prefill():
    bm = BlockManager(64, 4)
    sched = Scheduler(max_num_seqs=8, max_num_batched_tokens=10, block_manager=bm)
    a = seq(range(3), "a")
    sched.add(a)
    run_step(sched)  # a prefilled (3 tokens), sampled one
    b = seq(range(100, 125), "b")
    sched.add(b)
    batch = sched.schedule()
    assert batch.seqs[0] is a and batch.num_new_tokens[0] == 1  # decode first
    assert batch.seqs[1] is b and batch.num_new_tokens[1] == 9  # chunk fills the budget
    assert batch.total_tokens == 10
    sampled = sched.postprocess(batch)
    assert a in sampled and b not in sampled  # b's prefill is not complete


def test_budget_and_max_seqs():
    bm = BlockManager(64, 4)
    sched = Scheduler(max_num_seqs=2, max_num_batched_tokens=100, block_manager=bm)
    for i in range(3):
        sched.add(seq(range(5), str(i)))
    batch = sched.schedule()
    assert len(batch) == 2 and len(sched.waiting) == 1


def test_preemption_by_recompute_and_resume():
    bm = BlockManager(4, 4)  # 16 token slots
    sched = Scheduler(max_num_seqs=4, max_num_batched_tokens=64, block_manager=bm)
    a, b = seq(range(7), "a"), seq(range(7), "b")
    sched.add(a)
    sched.add(b)
    run_step(sched)  # both admitted: 2 pages each, pool full
    assert bm.num_free_blocks == 0
    run_step(sched)  # 8 tokens each: still 2 pages
    run_step(sched)  # a needs a 3rd page for its 9th token -> b is preempted
    assert b.status == SequenceStatus.WAITING and b.num_computed_tokens == 0
    assert sched.num_preemptions == 1 and not b.block_table
    sched.finish(a, "stop")
    batch = run_step(sched)
    # b's freed pages stayed in the prefix cache, so the recompute only redoes the tail
    assert b in batch.seqs and b.num_cached_tokens == 8
    assert batch.num_new_tokens[batch.seqs.index(b)] == 1
    assert b.num_output_tokens == 3  # kept its generated tokens, recomputed them as context


def test_prefix_cache_hits_refcounts_and_lru():
    bm = BlockManager(8, 4)
    sched = Scheduler(max_num_seqs=4, max_num_batched_tokens=64, block_manager=bm)
    a = seq(range(10), "a")
    sched.add(a)
    run_step(sched)
    shared = list(a.block_table[:2])
    b = seq(list(range(8)) + [50, 51], "b")
    sched.add(b)
    batch = run_step(sched)
    assert b.block_table[:2] == shared and b.num_cached_tokens == 8
    assert batch.num_new_tokens[batch.seqs.index(b)] == 2
    assert all(bm.blocks[i].ref_count == 2 for i in shared)
    sched.finish(a, "stop")
    sched.finish(b, "stop")
    assert bm.num_free_blocks == 8
    # freed pages keep their content until reused: a third request still hits
    c = seq(list(range(8)) + [60], "c")
    sched.add(c)
    run_step(sched)
    assert c.num_cached_tokens == 8


def test_fully_cached_prompt_recomputes_last_token():
    bm = BlockManager(8, 4)
    sched = Scheduler(max_num_seqs=4, max_num_batched_tokens=64, block_manager=bm)
    a = seq(range(8), "a")
    sched.add(a)
    run_step(sched)
    run_step(sched)  # a's 2 pages are full and registered
    b = seq(range(8), "b")
    sched.add(b)
    batch = sched.schedule()
    n = batch.num_new_tokens[batch.seqs.index(b)]
    assert n >= 1 and b.num_cached_tokens == 4  # last page recomputed for the logits


def test_eviction_of_lru_block():
    bm = BlockManager(2, 4, enable_prefix_caching=True)
    s1 = seq(range(5), "x")
    bm.admit(s1)
    assert bm.ensure_slots(s1, 5)
    s1.num_computed_tokens = 5
    bm.register_full_blocks(s1)
    assert len(bm.hash_to_block) == 1
    bm.free_seq(s1)
    s2 = seq(range(100, 108), "y")
    bm.admit(s2)
    assert bm.ensure_slots(s2, 8)  # takes both pages: the cached one is evicted
    assert len(bm.hash_to_block) == 0


def test_abort_frees_pages():
    bm = BlockManager(8, 4)
    sched = Scheduler(max_num_seqs=4, max_num_batched_tokens=64, block_manager=bm)
    a = seq(range(9), "a")
    sched.add(a)
    run_step(sched)
    assert bm.num_free_blocks < 8
    sched.abort({"a"})
    assert bm.num_free_blocks == 8 and not sched.has_unfinished()
    assert a.finish_reason == "abort"


def test_all_or_nothing_allocation():
    bm = BlockManager(2, 4)
    s = seq(range(12))
    bm.admit(s)
    assert not bm.ensure_slots(s, 12)
    assert bm.num_free_blocks == 2 and s.block_table == []


def test_invalid_block_manager():
    with pytest.raises(ValueError):
        BlockManager(0, 4)
