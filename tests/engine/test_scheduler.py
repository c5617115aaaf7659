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


# -- the encoder stage's share of scheduling ------------------------------------------------------


def _mm_step(sched: Scheduler):
    """One step, with its encoder work marked done as the engine does it."""
    batch = sched.schedule()
    for _, key in batch.encoder_items:
        sched.encoder_cache.entries[key].ready = True
    for s, n in zip(batch.seqs, batch.num_new_tokens):
        s.num_computed_tokens += n
        sched.release_items(s, upto=s.num_computed_tokens)
        sched.block_manager.register_full_blocks(s)
        if s.num_computed_tokens == len(s):
            s.token_ids.append(7)
    return batch


def _mm_seq(rid: str, spans) -> Sequence:
    s = seq(range(40), rid)
    s.mm_spans = tuple(spans)
    return s


def test_encoder_budget_cuts_the_chunk_before_an_item():
    from jaxmm.engine.encoder_cache import EncoderCacheManager

    cache = EncoderCacheManager(64, block_rows=4)
    sched = Scheduler(8, 32, BlockManager(64, 4), encoder_cache=cache, encoder_budget=10)
    # items of 8 rows at [4, 12) and [20, 28): 16 rows, over the budget of 10
    a = _mm_seq("a", [(4, 12, "image:x"), (20, 28, "image:y")])
    sched.add(a)
    b1 = _mm_step(sched)
    assert b1.num_new_tokens == [20]  # stops before the second item
    assert [k for _, k in b1.encoder_items] == ["image:x"] and b1.encoder_rows == 8
    assert cache.entries["image:x"].owners == set()  # its prefill passed it: not held
    b2 = _mm_step(sched)
    assert [k for _, k in b2.encoder_items] == ["image:y"] and b2.num_new_tokens == [20]
    # both stay cached, unreferenced: a second request with the same items runs no encoder
    b = _mm_seq("b", [(4, 12, "image:x"), (20, 28, "image:y")])
    sched.add(b)
    batch = _mm_step(sched)
    assert batch.encoder_items == [] and b in batch.seqs


def test_a_full_encoder_cache_waits_and_evicts_only_unreferenced_items():
    from jaxmm.engine.encoder_cache import EncoderCacheManager

    cache = EncoderCacheManager(16, block_rows=4)  # room for one 16-row item
    sched = Scheduler(8, 64, BlockManager(64, 4), encoder_cache=cache, encoder_budget=64)
    a = _mm_seq("a", [(8, 24, "image:a")])
    b = _mm_seq("b", [(8, 24, "image:b")])
    a.token_ids = a.token_ids[:30]
    b.token_ids = b.token_ids[:30]
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    # a takes the cache; b's chunk stops before its item (rows are held by a)
    assert batch.num_new_tokens == [30, 8]
    assert [k for _, k in batch.encoder_items] == ["image:a"]
    for _, key in batch.encoder_items:
        cache.entries[key].ready = True
    for s, n in zip(batch.seqs, batch.num_new_tokens):
        s.num_computed_tokens += n
        sched.release_items(s, upto=s.num_computed_tokens)
    batch = sched.schedule()  # a released its item: evicted for b's
    assert [k for _, k in batch.encoder_items] == ["image:b"]
    assert "image:a" not in cache.entries


def test_preempted_and_finished_sequences_release_their_items():
    from jaxmm.engine.encoder_cache import EncoderCacheManager

    cache = EncoderCacheManager(32, block_rows=4)
    sched = Scheduler(8, 8, BlockManager(64, 4), encoder_cache=cache, encoder_budget=32)
    a = _mm_seq("a", [(2, 30, "image:a")])
    sched.add(a)
    batch = sched.schedule()  # a chunk of 8 covers part of the item: the whole item is encoded
    assert batch.num_new_tokens == [8] and cache.entries["image:a"].owners == {a.seq_id}
    sched.finish(a, "abort")
    # never written (the step did not run), nobody holds it: gone, rows free again
    assert "image:a" not in cache.entries and len(cache.free_blocks) == 8
