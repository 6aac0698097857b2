"""Periodic jobs, run inside ``ktizo serve``. Each run is one transaction; on PostgreSQL several replicas may
run the same job at once, and ``SELECT … FOR UPDATE SKIP LOCKED`` keeps them from doing the same work twice."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from ktizo.services.registry import Services
from ktizo.services.transactions import transaction

log = logging.getLogger("ktizo.jobs")


@dataclass(frozen=True)
class Job:
    name: str
    every: float  # seconds
    run: Callable[[], int]  # returns how many things it did, for the log
    own_transactions: bool = False  # the job commits its own steps (webhooks: claim, send, record)


def default_jobs(services: Services) -> list[Job]:
    work = services.housekeeping
    return [
        Job("expire-discovered", 60.0, work.expire_discovered),
        Job("expire-device-codes", 300.0, work.expire_device_codes),
        Job("expire-enrollments", 60.0, services.agents.expire),
        Job("prune-audit", 3600.0, work.prune_audit),
        Job("prune-events", 3600.0, work.prune_events),
        *(
            [Job("gitops", services.gitops.interval, services.gitops.run, own_transactions=True)]
            if services.gitops
            else []
        ),
        Job("webhooks", 2.0, services.webhooks.run, own_transactions=True),
    ]


def _in_transaction(job: Job) -> int:
    if job.own_transactions:
        return job.run()
    with transaction():
        return job.run()


class JobRunner:
    def __init__(self, jobs: list[Job]) -> None:
        self.jobs = jobs
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._loop(job), name=f"ktizo-job-{job.name}") for job in self.jobs]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    @staticmethod
    async def _loop(job: Job) -> None:
        while True:
            try:
                done = await asyncio.to_thread(_in_transaction, job)
                if done:
                    log.info("job %s: %d done", job.name, done)
            except Exception:  # a failing job must not stop the server; it is tried again next round
                log.exception("job %s failed", job.name)
            await asyncio.sleep(job.every)
