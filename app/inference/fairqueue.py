"""Tenant-fair waiting for generation slots: weighted deficit round robin.

Each tenant waiting for a pool has its own FIFO queue. When a slot frees, the queues are
visited in turn; on its turn a tenant's credit (*deficit*) grows by ``quantum * weight``
and it is served while its credit covers the cost of its oldest request (estimated
tokens). Over time each backlogged tenant gets slots in proportion to its weight (its
tier), costed in tokens, so one tenant flooding a pool delays another by at most a round,
not by its whole backlog. A tenant whose queue empties loses its credit (DRR's rule: no
saving up while idle).

Sparse tenants first (as FQ-CoDel's "new flows"): a tenant that had nothing waiting is
served at the next free slot, ahead of the backlogged ones, its cost charged to its
credit (which may go negative and is repaid if it stays backlogged). So a tenant asking
one thing at a time waits for one slot, not for a round of every flooding tenant.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


def _always(_: Hashable) -> bool:
    return True


@dataclass(eq=False)
class Entry(Generic[T]):
    """One waiting request: its tenant's key, weight and cost, and what to hand it."""

    key: Hashable
    weight: float
    cost: float
    item: T
    queued: bool = field(default=True, init=False)


class DeficitRoundRobin(Generic[T]):
    """Per-key FIFO queues served by weighted deficit round robin."""

    def __init__(self, quantum: float) -> None:
        if quantum <= 0:
            raise ValueError("quantum must be positive")
        self.quantum = quantum
        self._queues: dict[Hashable, deque[Entry[T]]] = {}
        self._deficit: dict[Hashable, float] = {}
        self._new: deque[Hashable] = deque()  # keys that had nothing waiting: served first
        self._order: deque[Hashable] = deque()  # backlogged keys, in turn order
        self._turn_started = False  # the key at the head of _order has had its quantum
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def depth(self, key: Hashable) -> int:
        """How many entries ``key`` has waiting."""
        queue = self._queues.get(key)
        return len(queue) if queue else 0

    def push(self, entry: Entry[T]) -> None:
        """Add ``entry`` at the back of its key's queue."""
        if entry.cost < 0 or entry.weight <= 0:
            raise ValueError("cost must be >= 0 and weight > 0")
        queue = self._queues.get(entry.key)
        if queue is None:
            queue = self._queues[entry.key] = deque()
            self._deficit[entry.key] = 0.0
            self._new.append(entry.key)
        queue.append(entry)
        entry.queued = True
        self._size += 1

    def remove(self, entry: Entry[T]) -> bool:
        """Take ``entry`` out (it gave up: timeout, disconnect). False if not queued."""
        if not entry.queued:
            return False
        queue = self._queues[entry.key]
        queue.remove(entry)
        entry.queued = False
        self._size -= 1
        if not queue:
            self._drop_key(entry.key)
        return True

    def pop(self, eligible: Callable[[Hashable], bool] | None = None) -> Entry[T] | None:
        """The next entry to serve, or None if nothing (eligible) waits. ``eligible``
        skips keys that may not be served now (e.g. at their share of a pool); they keep
        their place and credit but gain none while skipped."""
        ok = eligible or _always
        for key in self._new:  # a sparse tenant's first request: served now, on credit
            if not ok(key):
                continue
            self._new.remove(key)
            queue = self._queues[key]
            head = queue.popleft()
            head.queued = False
            self._size -= 1
            self._deficit[key] -= head.cost
            if queue:
                self._order.append(key)  # still more: it joins the round robin, in debt
            else:
                del self._queues[key], self._deficit[key]
            return head
        if not any(ok(key) for key in self._order):
            return None
        while True:
            key = self._order[0]
            if not ok(key):
                self._order.rotate(-1)
                self._turn_started = False
                continue
            queue = self._queues[key]
            if not self._turn_started:
                self._deficit[key] += self.quantum * queue[0].weight
                self._turn_started = True
            head = queue[0]
            if self._deficit[key] >= head.cost:
                self._deficit[key] -= head.cost
                queue.popleft()
                head.queued = False
                self._size -= 1
                if not queue:
                    self._drop_key(key)
                return head
            self._order.rotate(-1)
            self._turn_started = False
            self._skip_idle_rounds(ok)

    def _drop_key(self, key: Hashable) -> None:
        del self._queues[key]
        del self._deficit[key]
        if key in self._new:
            self._new.remove(key)
            return
        if self._order and self._order[0] == key:
            self._turn_started = False
        self._order.remove(key)

    def _skip_idle_rounds(self, ok: Callable[[Hashable], bool]) -> None:
        """When a whole round would serve nobody (costs far above the quantum), grant
        the rounds at once instead of spinning through them."""
        if self._turn_started:
            return
        rounds = math.inf
        for key in self._order:
            if not ok(key):
                continue
            head = self._queues[key][0]
            need = head.cost - self._deficit[key]
            rounds = min(rounds, math.ceil(need / (self.quantum * head.weight)))
        if rounds > 1 and rounds != math.inf:
            for key in self._order:
                if not ok(key):
                    continue
                self._deficit[key] += (rounds - 1) * self.quantum * self._queues[key][0].weight
