"""Starting and stopping a process's workers: broker, runtime, Dramatiq worker threads.

The one sequence the CLI's ``worker`` command, the embedded (dev) stack and the
benchmark all use, so the order of start-up and shut-down is defined once.
"""

from __future__ import annotations

from dataclasses import dataclass

import dramatiq

from app.embeddings import Models
from app.settings import Settings
from retrieval.vectorstore import VectorStore
from workers.broker import setup_broker, start_worker
from workers.runtime import WorkerRuntime

STOP_TIMEOUT_MS = 10_000


@dataclass(frozen=True)
class RunningWorkers:
    """A started broker, runtime and worker; :meth:`stop` ends them in order."""

    broker: dramatiq.Broker
    runtime: WorkerRuntime
    worker: dramatiq.Worker

    def stop(self) -> None:
        """Finish in-flight messages, close the runtime's clients, close the broker."""
        self.worker.stop(STOP_TIMEOUT_MS)
        self.runtime.stop()
        self.broker.close()


def start_workers(settings: Settings, store: VectorStore | None = None,
                  models: Models | None = None) -> RunningWorkers:
    """Set up the broker, start the runtime (relay, sweeper, clients), then consume."""
    broker = setup_broker(settings)
    runtime = WorkerRuntime(settings, broker, store=store, models=models)
    runtime.start()
    return RunningWorkers(broker, runtime, start_worker(broker, settings.worker.threads))
