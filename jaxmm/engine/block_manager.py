"""KV page allocation with reference counts and prefix caching. Plain Python, no JAX.

A page (block) holds `block_size` tokens of one sequence. Full pages are content-addressed:
their hash chains the parent page's hash with the page's token ids (and the keys of any
multimodal items overlapping it), so two prompts sharing a prefix share its pages.
Freed pages keep their hash and stay findable until they are reused, least recently freed
first (LRU); a page hit while free is taken back from the free list.

Page groups (models with sliding-window layers, e.g. Gemma 3): the layers are split into
groups, each with a page table of its own per sequence, all taking pages from this one pool
(the runner lays one page of every group over the same memory: `kv_cache_groups`). Group 0
(`seq.block_table`) holds the full-attention layers; a windowed group (`seq.group_tables`)
gives a page back as soon as no query can reach it any more (every token of it is more than
`window` positions behind the sequence's next token), and marks the entry `NO_PAGE`. So a
long sequence holds global pages per token plus about one window of pages per local group.
Prefix caching covers the groups: a windowed group's pages are published under
(group, page hash), and a prefix is a hit only as far as every windowed group still has the
pages its last window needs.
"""

from __future__ import annotations

from collections import OrderedDict

from .sequence import Sequence

NO_PAGE = -1  # a windowed group's table entry whose page was given back (or never taken)


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] = ()


def block_hash(parent: int | None, token_ids: tuple[int, ...], extra: tuple = ()) -> int:
    return hash((parent, token_ids, extra))


def _extra_for_block(seq: Sequence, start: int, end: int) -> tuple:
    return tuple(key for s, e, key in seq.extra_keys if s < end and e > start)


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        recurrent_state: bool = False,
        group_windows: tuple[int | None, ...] = (None,),
    ):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        # hybrid models: a cached prefix is usable only with the linear layers' state at its
        # end; `has_state_snapshot(page_hash)` says whether one is kept (state_cache.py).
        # Without it such a model takes no hit (its pages are still published)
        self.recurrent_state = recurrent_state
        self.has_state_snapshot = None
        # one sliding window (tokens) or None per page group; group 0 is never windowed
        if not group_windows or group_windows[0] is not None:
            raise ValueError("page group 0 holds the full-attention layers: window None")
        self.group_windows = tuple(group_windows)
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        # prefix-cache statistics, in tokens
        self.prefix_queries = 0
        self.prefix_hits = 0

    # -- accounting ---------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free) / self.num_blocks

    @property
    def hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    # -- allocation ---------------------------------------------------------------------
    def _take_free(self) -> int:
        block_id, _ = self.free.popitem(last=False)  # least recently freed
        block = self.blocks[block_id]
        if block.hash is not None and self.hash_to_block.get(block.hash) == block_id:
            del self.hash_to_block[block.hash]  # evict its cached content
        block.hash = None
        block.token_ids = ()
        block.ref_count = 1
        return block_id

    def _ref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1

    def admit(self, seq: Sequence) -> int:
        """Take the longest cached prefix of a new sequence; returns the cached token count.

        At least one token is always left to compute (its logits are needed), so a prompt
        that is entirely cached recomputes its last page.
        """
        assert not seq.block_table
        G = self.block_size
        seq.block_hashes = []
        hits: list[int] = []
        usable = not self.recurrent_state or self.has_state_snapshot is not None
        if self.enable_prefix_caching and usable:
            parent = None
            for i in range((len(seq) - 1) // G):
                tokens = tuple(seq.block_tokens(i, G))
                h = block_hash(parent, tokens, _extra_for_block(seq, i * G, (i + 1) * G))
                block_id = self.hash_to_block.get(h)
                if block_id is None or self.blocks[block_id].token_ids != tokens:
                    break
                hits.append(block_id)
                seq.block_hashes.append(h)
                parent = h
            if self.recurrent_state:  # up to the last page with a state snapshot
                while hits and not self.has_state_snapshot(seq.block_hashes[-1]):
                    hits.pop()
                    seq.block_hashes.pop()
            # windowed groups: as far as each still has its last window's pages
            while hits and self._window_hits(seq, len(hits)) is None:
                hits.pop()
                seq.block_hashes.pop()
            self.prefix_queries += len(seq)
            self.prefix_hits += len(hits) * G
        groups = self._window_hits(seq, len(hits)) if hits else None
        for block_id in hits:
            self._ref(block_id)
        seq.block_table = hits
        seq.group_tables = []
        for g in range(1, len(self.group_windows)):
            table = groups[g - 1] if groups is not None else []
            for block_id in table:
                if block_id != NO_PAGE:
                    self._ref(block_id)
            seq.group_tables.append(table)
        seq.num_hashed_blocks = len(hits)
        seq.num_computed_tokens = seq.num_cached_tokens = len(hits) * G
        return len(hits) * G

    def _first_live_page(self, g: int, start: int) -> int:
        """The first page of group g a query at position >= start can still read."""
        w = self.group_windows[g]
        return 0 if w is None else max(0, start - w + 1) // self.block_size

    def _window_hits(self, seq: Sequence, n: int) -> list[list[int]] | None:
        """For a prefix of n cached pages, each windowed group's table (NO_PAGE before the
        window of the first uncomputed token), or None when a group lacks one of them."""
        tables = []
        for g in range(1, len(self.group_windows)):
            lo = self._first_live_page(g, n * self.block_size)
            table = [NO_PAGE] * lo
            for i in range(lo, n):
                block_id = self.hash_to_block.get((g, seq.block_hashes[i]))
                if block_id is None or self.blocks[block_id].token_ids != tuple(
                    seq.block_tokens(i, self.block_size)
                ):
                    return None
                table.append(block_id)
            tables.append(table)
        return tables

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        assert block.ref_count >= 0
        if block.ref_count == 0:
            self.free[block_id] = None

    def ensure_slots(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow the block tables to hold num_tokens tokens; all or nothing. Windowed groups
        first give back the pages no query from `seq.num_computed_tokens` on can reach."""
        start = seq.num_computed_tokens
        if len(seq.group_tables) != len(self.group_windows) - 1:  # never admitted
            seq.group_tables = [[] for _ in self.group_windows[1:]]
        for g, table in enumerate(seq.group_tables, start=1):
            for i in range(min(self._first_live_page(g, start), len(table))):
                if table[i] != NO_PAGE:
                    self._release(table[i])
                    table[i] = NO_PAGE
        n = self.blocks_needed(num_tokens)
        need = max(0, n - len(seq.block_table))
        need += sum(max(0, n - len(t)) for t in seq.group_tables)
        if need == 0:
            return True
        if need > len(self.free):
            return False
        for table in (seq.block_table, *seq.group_tables):
            table.extend(self._take_free() for _ in range(n - len(table)))
        return True

    def pages_held(self, seq: Sequence) -> int:
        """Pages the sequence holds across its groups (windowed groups: about a window)."""
        held = len(seq.block_table)
        return held + sum(sum(b != NO_PAGE for b in t) for t in seq.group_tables)

    def register_full_blocks(self, seq: Sequence) -> None:
        """Publish the sequence's newly computed full pages to the prefix cache."""
        if not self.enable_prefix_caching:
            return
        G = self.block_size
        n_full = min(seq.num_computed_tokens, len(seq)) // G
        while seq.num_hashed_blocks < n_full:
            i = seq.num_hashed_blocks
            parent = seq.block_hashes[i - 1] if i > 0 else None
            tokens = tuple(seq.block_tokens(i, G))
            h = block_hash(parent, tokens, _extra_for_block(seq, i * G, (i + 1) * G))
            self._publish(h, seq.block_table[i], tokens)
            for g, table in enumerate(seq.group_tables, start=1):
                if table[i] != NO_PAGE:  # given back before it was published: not cached
                    self._publish((g, h), table[i], tokens)
            seq.block_hashes.append(h)
            seq.num_hashed_blocks += 1

    def _publish(self, key, block_id: int, tokens: tuple[int, ...]) -> None:
        block = self.blocks[block_id]
        if block.hash is None and key not in self.hash_to_block:
            block.hash = key
            block.token_ids = tokens
            self.hash_to_block[key] = block_id

    def free_seq(self, seq: Sequence) -> None:
        """Drop the sequence's references; pages at the tail are evicted first."""
        for table in (*seq.group_tables, seq.block_table):
            for block_id in reversed(table):
                if block_id != NO_PAGE:
                    self._release(block_id)
        seq.block_table = []
        seq.group_tables = []
        seq.block_hashes = []
        seq.num_hashed_blocks = 0
        seq.num_computed_tokens = 0

    def reset_prefix_cache(self) -> None:
        for block_id in self.free:
            self.blocks[block_id].hash = None
            self.blocks[block_id].token_ids = ()
        self.hash_to_block = {
            h: b for h, b in self.hash_to_block.items() if self.blocks[b].ref_count > 0
        }
