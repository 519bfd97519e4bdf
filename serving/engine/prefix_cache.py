"""The prefix cache: KV of earlier prompts kept in the pool's slots and reused by new sequences
whose prompts start with the same tokens (chat traffic repeats its system prompt).

As vLLM does, a slot's tokens are cut into blocks of `block_size` tokens and each full block is
named by a chain hash, `hash((parent block's hash, block tokens))`: equal hashes at block i mean
equal tokens in blocks 0..i (the match is also checked token by token, so a hash collision can
never change a result). The index maps a block hash to the slots holding that block at the same
positions: running sequences (their prompt blocks, once prefilled) and finished ones.

A finished sequence's slot stays allocated in the pool, owned by the cache (least recently used
first out); the scheduler evicts cached slots whenever a new sequence needs one, so cached
prefixes never make a START busy. A new sequence whose prompt starts with indexed blocks gets
their KV copied into its slot (one numpy row copy per layer; ~5 ms for 512 tokens of the gpt2
shape, against ~1 s to prefill them on 2 cores) or, when no free slot is left, takes the cached
slot over as it is. It then prefills only the rest of its prompt: at least one token, whose
logits the step answers with.

Only positions below `pool.max_length - 1` are indexed: a ride-along row of a full sequence
writes its dummy token at the last position (see scheduler.py).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import numpy as np

from serving.engine.kv_cache import KVPool

logger = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = 16


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompts looked up
    hits: int = 0  # prompts that reused at least one block
    query_tokens: int = 0  # prompt tokens looked up
    hit_tokens: int = 0  # prompt tokens whose KV was reused
    evictions: int = 0  # cached slots given back to the pool for a new sequence


@dataclass(frozen=True)
class Match:
    slot: int  # the slot holding the prefix
    tokens: int  # how many prompt tokens it covers (a multiple of the block size)
    cached: bool  # the slot is a finished sequence's (owned by the cache), not a running one's


class PrefixCache:
    def __init__(self, pool: KVPool, *, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.pool, self.block_size = pool, int(block_size)
        self.tokens = np.zeros((pool.max_sequences, pool.max_length), dtype=np.int64)  # each slot's tokens
        self._hashes: dict[int, list[int]] = {}  # slot -> its indexed blocks' hashes, in order
        self._index: dict[int, set[int]] = {}  # block hash -> slots holding it
        self._cached: OrderedDict[int, None] = OrderedDict()  # finished slots, least recently used first
        self.stats = PrefixCacheStats()

    @property
    def cached_slots(self) -> tuple[int, ...]:
        return tuple(self._cached)

    # ------------------------------------------------------------------ lookup

    def match(self, prompt: np.ndarray) -> Optional[Match]:
        """The longest indexed prefix of `prompt` (whole blocks, leaving at least its last token
        to compute), or None."""
        best: Optional[Match] = None
        parent = None
        for i in range((len(prompt) - 1) // self.block_size):
            block = prompt[i * self.block_size:(i + 1) * self.block_size]
            parent = _block_hash(parent, block)
            slots = self._index.get(parent)
            if not slots:
                break
            n = (i + 1) * self.block_size
            slot = min(slots, key=lambda s: (s not in self._cached, s))  # prefer a cached one, then low
            if not np.array_equal(self.tokens[slot, :n], prompt[:n]):  # a hash collision
                break
            best = Match(slot, n, slot in self._cached)
        return best

    # ------------------------------------------------------------------ slots

    def assign(self, slot: int, prompt_tokens: int, match: Optional[Match]) -> None:
        """`slot` now holds a new sequence (a prompt of `prompt_tokens`): give it the KV and
        tokens of `match` — a row copy per layer, or nothing when the sequence takes the matched
        cached slot over itself. Counts the query."""
        self.stats.queries += 1
        self.stats.query_tokens += prompt_tokens
        if match is None or slot != match.slot:
            self.forget(slot)  # a slot from the pool: whatever it held is gone
        if match is None:
            return
        n = match.tokens
        self.stats.hits += 1
        self.stats.hit_tokens += n
        if match.cached and slot != match.slot:
            self._cached.move_to_end(match.slot)  # recently used
        if slot == match.slot:  # taken over: blocks past the match will be overwritten
            self._cached.pop(slot, None)
            self._truncate(slot, n // self.block_size)
        else:
            for layer in range(self.pool.n_layer):
                self.pool.keys[layer][slot, :, :n] = self.pool.keys[layer][match.slot, :, :n]
                self.pool.values[layer][slot, :, :n] = self.pool.values[layer][match.slot, :, :n]
            self.tokens[slot, :n] = self.tokens[match.slot, :n]
            self.publish(slot, n)
        self.pool.lengths[slot] = n

    def record(self, slot: int, start: int, tokens: np.ndarray) -> None:
        """The tokens a step wrote into `slot` at positions [start, start + len(tokens))."""
        self.tokens[slot, start:start + len(tokens)] = tokens

    def publish(self, slot: int, length: int) -> None:
        """Index the full blocks of `slot`'s first `length` positions (those not indexed yet)."""
        hashes = self._hashes.setdefault(slot, [])
        limit = min(length, self.pool.max_length - 1) // self.block_size
        parent = hashes[-1] if hashes else None
        for i in range(len(hashes), limit):
            parent = _block_hash(parent, self.tokens[slot, i * self.block_size:(i + 1) * self.block_size])
            hashes.append(parent)
            self._index.setdefault(parent, set()).add(slot)

    def retire(self, slot: int, length: int) -> None:
        """A sequence ended normally: keep its slot's blocks (the most recently used), or give the
        slot back when it has none."""
        self.publish(slot, length)
        if self._hashes.get(slot):
            self._cached[slot] = None
            self._cached.move_to_end(slot)
        else:
            self.forget(slot)
            self.pool.free(slot)

    def forget(self, slot: int) -> None:
        """`slot`'s contents are no longer trusted (its sequence failed, or it is reallocated)."""
        self._cached.pop(slot, None)
        self._truncate(slot, 0)

    def evict(self, *, keep: Optional[int] = None) -> Optional[int]:
        """Give the least recently used cached slot (not `keep`) back to the pool; its number,
        or None when there is none."""
        for slot in self._cached:
            if slot != keep:
                self.forget(slot)
                self.pool.free(slot)
                self.stats.evictions += 1
                logger.debug("prefix cache: evicted slot %d", slot)
                return slot
        return None

    def _truncate(self, slot: int, blocks: int) -> None:
        hashes = self._hashes.get(slot, [])
        for h in hashes[blocks:]:
            holders = self._index.get(h)
            if holders is not None:
                holders.discard(slot)
                if not holders:
                    del self._index[h]
        if blocks:
            self._hashes[slot] = hashes[:blocks]
        else:
            self._hashes.pop(slot, None)


def _block_hash(parent: Optional[int], block: np.ndarray) -> int:
    """vLLM's chain hash: the parent block's hash and this block's tokens."""
    return hash((parent, tuple(int(t) for t in block)))
