"""What the driver dispatches, and the pool that runs it without Ray.

The driver hands a pool a list of `Job`s (a worker method and its arguments) and gets the
results back in job order, None for a job that failed every attempt. Two pools do that:
`dispatch.ActorPool` (Ray actors, one model each, with restarts and timeouts) and
`InProcessPool` here: the same `EvolutionWorker` code in the driver's own process, one worker
per model, jobs run one after another. A job names the model it runs on (`Job.model`, an index
into the run's models) and only an actor holding that model takes it. The in-process pool needs
no Ray, so an evolution runs in a notebook, a debugger or a test; for the same config and seed it
gives the same checkpoints and the same CMA mean.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class Job:
    method: str
    args: tuple
    label: str = ""
    # the job's expected cost (e.g. the tokens of its prompts): the Ray pool starts the costliest
    # first, so short jobs fill the gaps at the end of a generation instead of a long one starting late
    cost: float = 1.0
    model: int = 0      # which of the run's models runs it (0: `model`, i: `transfer_models[i - 1]`)


class InProcessPool:
    """One worker per model, run in this process, each standing in for `slots` actors.

    `actors` has `slots` entries per model (the same worker) and `actor_models` the model of each,
    so the driver splits work into the same chunks as on `slots` Ray actors per model: chunking
    decides how statistics are merged, so equal chunks make equal runs. A job that raises is
    retried up to `max_retries` times, like an actor's; there is no timeout (a job cannot be
    stopped from inside its own process)."""

    def __init__(self, workers: Any, slots: int = 1, max_retries: int = 2, restore_threads: int | None = None):
        self.workers = list(workers) if isinstance(workers, (list, tuple)) else [workers]
        self.restore_threads = restore_threads   # the caller's torch threads, given back at shutdown
        slots = max(1, int(slots))
        self.actors = [w for w in self.workers for _ in range(slots)]
        self.actor_models = [m for m in range(len(self.workers)) for _ in range(slots)]
        self.max_retries = max_retries
        self.failures: list[str] = []

    def run(self, jobs: list[Job]) -> list:
        results: list = [None] * len(jobs)
        for j, job in enumerate(jobs):
            for attempt in range(self.max_retries + 1):
                try:
                    results[j] = getattr(self.workers[job.model], job.method)(*job.args)
                    break
                except Exception as e:  # the Ray pool retries a raising job too; same here
                    message = f"{job.label or job.method} in process: {type(e).__name__}: {e}"
                    self.failures.append(message)
                    log.warning("%s (attempt %d of %d)", message, attempt + 1, self.max_retries + 1)
        return results

    def shutdown(self) -> None:
        if self.restore_threads:
            import torch

            torch.set_num_threads(self.restore_threads)


def in_process_pool(cfg) -> InProcessPool:
    """The run's workers (one per model) built in this process, with the settings a Ray actor gets."""
    from dataclasses import asdict

    import torch

    from workers.evolution_worker import EvolutionWorker

    threads = torch.get_num_threads()
    workers = [EvolutionWorker(model=asdict(m), memory=asdict(cfg.memory), namm=cfg.namm_spec(),
                               torch_threads=cfg.workers.torch_threads, fitness=asdict(cfg.fitness))
               for m in cfg.models]
    return InProcessPool(workers, cfg.workers.num_actors, cfg.workers.max_retries, restore_threads=threads)


def actors_of(pool, model: int) -> int:
    """How many of the pool's actors hold model `model` (chunks of work are split over them)."""
    return sum(1 for m in getattr(pool, "actor_models", [0] * len(pool.actors)) if m == model)
