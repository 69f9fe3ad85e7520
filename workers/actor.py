"""The Ray actor that wraps an EvolutionWorker: one per GPU (or per CPU slot), kept alive across
generations so the model is loaded once. Ray restarts it if its process dies."""
from __future__ import annotations

import ray

from .evolution_worker import EvolutionWorker


class _Actor(EvolutionWorker):
    def evaluate(self, vector, norm, requests, tasks=None):
        if tasks:
            self.prepare(tasks)
        return super().evaluate(vector, norm, requests)

    def reference(self, requests, tasks=None):
        if tasks:
            self.prepare(tasks)
        return super().reference(requests)

    def warm_start(self, imitate, norm, requests, steps, lr, seed, rounds=1, tasks=None, threads=None):
        if tasks:
            self.prepare(tasks)
        return super().warm_start(imitate, norm, requests, steps, lr, seed, rounds, threads)

    def collect_statistics(self, requests, tasks=None):
        if tasks:
            self.prepare(tasks)
        return super().collect_statistics(requests)


def remote_actor(cls=None):
    """The Ray actor class of `cls` (an _Actor subclass; tests inject faulty ones)."""
    return ray.remote(max_restarts=-1, max_task_retries=0)(cls or _Actor)


EvolutionActor = remote_actor()
