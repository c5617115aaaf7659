"""Page groups in the block manager (sliding-window layers give their pages back): plain
Python, no JAX."""

from jaxmm.engine.block_manager import NO_PAGE, BlockManager
from jaxmm.engine.scheduler import Scheduler
from jaxmm.engine.sequence import Sequence

G, WINDOW = 4, 8  # tokens per page, sliding window of the local groups


def seq(tokens, rid="r"):
    return Sequence(request_id=rid, token_ids=list(tokens), num_prompt_tokens=len(tokens))


def step(sched: Scheduler, new_token: int = 7):
    batch = sched.schedule()
    for s in sched.postprocess(batch):
        s.token_ids.append(new_token)
    return batch


def test_local_groups_hold_a_window_while_the_global_group_grows():
    bm = BlockManager(200, G, group_windows=(None, WINDOW, WINDOW))
    sched = Scheduler(max_num_seqs=4, max_num_batched_tokens=6, block_manager=bm)
    s = seq(range(30))
    sched.add(s)
    held = []
    for _ in range(60):  # prefill in chunks of 6, then decodes: 90 tokens in all
        step(sched)
        local = [sum(b != NO_PAGE for b in t) for t in s.group_tables]
        held.append((len(s.block_table), local, bm.num_free_blocks))
        # every page a query of the next step can read is still there: from the page of
        # position (next token - window + 1) on
        first = max(0, s.num_computed_tokens - WINDOW + 1) // G
        for t in s.group_tables:
            assert all(b != NO_PAGE for b in t[first:])
    n_global = [h[0] for h in held]
    assert n_global[-1] == -(-len(s) // G) > 20  # the global group keeps every page
    # a local group holds at most a window plus a step (and a page at each end), whatever
    # the context: KV per token stops growing for local layers
    bound = -(-(WINDOW + 6) // G) + 1
    assert max(max(h[1]) for h in held) <= bound
    assert held[-1][1] == held[-20][1]
    # pages in use = global pages + a bounded number of local pages
    used = 200 - held[-1][2]
    assert used == n_global[-1] + sum(held[-1][1]) < n_global[-1] + 2 * bound + 1
    sched.finish(s, "stop")
    assert bm.num_free_blocks == 200


def test_prefix_hit_takes_the_local_groups_last_window():
    bm = BlockManager(100, G, group_windows=(None, WINDOW))
    sched = Scheduler(max_num_seqs=4, max_num_batched_tokens=64, block_manager=bm)
    prompt = list(range(100, 137))  # 37 tokens: 9 full pages
    a = seq(prompt, "a")
    sched.add(a)
    step(sched)  # prefill in one step, pages published
    while len(a) < 45:  # decodes: the local group gives back its early pages
        step(sched)
    assert a.group_tables[0][:2] == [NO_PAGE, NO_PAGE]
    sched.finish(a, "stop")

    b = seq(prompt + [1, 2, 3], "b")
    sched.add(b)
    batch = sched.schedule()
    assert b.num_cached_tokens == 36  # 9 pages hit (the early local pages were cached)
    assert b.block_table[:9] == [bm.hash_to_block[h] for h in b.block_hashes[:9]]
    first = (36 - WINDOW + 1) // G  # the page of the first key the next query reads
    local = b.group_tables[0]
    assert local[:first] == [NO_PAGE] * first
    assert all(x != NO_PAGE for x in local[first:])
    assert batch.num_new_tokens == [4]


def test_prefix_hit_stops_where_a_local_page_was_evicted():
    bm = BlockManager(100, G, group_windows=(None, WINDOW))
    sched = Scheduler(max_num_seqs=4, max_num_batched_tokens=64, block_manager=bm)
    prompt = list(range(100, 137))
    a = seq(prompt, "a")
    sched.add(a)
    step(sched)
    sched.finish(a, "stop")
    assert sum(isinstance(k, tuple) for k in bm.hash_to_block) == 9  # local pages published
    probe = seq(prompt, "probe")  # its admission names the page hashes
    bm.admit(probe)
    h8 = probe.block_hashes[8]
    bm.free_seq(probe)
    # the local group's copy of page 8 is reused by someone else: evicted from the cache
    bm.blocks[bm.hash_to_block.pop((1, h8))].hash = None

    b = seq(prompt + [1, 2], "b")
    sched.add(b)
    sched.schedule()
    # page 8 of the global group is cached, but the local group lacks it: the hit is 8 pages
    assert b.num_cached_tokens == 32


def test_one_group_models_are_unchanged():
    bm = BlockManager(16, G)
    s = seq(range(10))
    assert bm.admit(s) == 0 and s.group_tables == []
    assert bm.ensure_slots(s, 10) and len(s.block_table) == 3 and bm.pages_held(s) == 3


def test_a_sequence_never_admitted_gets_its_group_tables():
    bm = BlockManager(16, G, group_windows=(None, WINDOW))
    s = seq(range(10))
    assert bm.ensure_slots(s, 10)
    assert len(s.block_table) == 3 and [len(t) for t in s.group_tables] == [3]
    assert bm.num_free_blocks == 10
