"""Where a dispatched request runs, and an open stream holding its slot until it ends.

The chat path gets these back from the dispatcher: :class:`Dispatched` names the pool and
replica (for metering and cost, with the request's GPU time), :class:`DispatchedStream`
relays the upstream's events and gives the slot back when they end, counting a failure
mid-stream against the replica.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from app.errors import UpstreamError, UpstreamTimeoutError
from app.inference.slots import Lease
from app.inference.upstream import StreamEvent, UpstreamStream


@dataclass
class Dispatched:
    """Where a request ran: the pool and replica, for metering."""

    pool: str
    replica: str
    attempts: int
    lease: Lease | None = field(default=None, repr=False)

    @classmethod
    def of(cls, lease: Lease, attempts: int) -> Dispatched:
        """Where ``lease`` runs."""
        return cls(lease.pool.name, lease.replica.url, attempts, lease)

    @property
    def gpu_seconds(self) -> float | None:
        """The request's GPU time on its replica (see :meth:`Lease.gpu_seconds`)."""
        return self.lease.gpu_seconds() if self.lease is not None else None


class DispatchedStream:
    """An open upstream stream holding its replica slot until it ends."""

    def __init__(self, stream: UpstreamStream, lease: Lease, attempts: int) -> None:
        self._stream = stream
        self._lease = lease
        self.where = Dispatched.of(lease, attempts)

    async def events(self) -> AsyncIterator[StreamEvent]:
        """The upstream's events; the slot is released when they end (a failure
        mid-stream counts against the replica)."""
        ok: bool | None = None
        try:
            async for event in self._stream.events():
                if event.chunk is None:  # [DONE]: the replica did its job (callers stop
                    ok = True            # reading here, so the loop may never end)
                    self._lease.release(True)
                yield event
            ok = True
        except (UpstreamError, UpstreamTimeoutError):
            ok = False
            raise
        finally:
            self._lease.release(ok)

    async def close(self) -> None:
        """Close without reading."""
        try:
            await self._stream.close()
        finally:
            self._lease.release(None)
