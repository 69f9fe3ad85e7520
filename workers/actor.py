"""The Ray actor that wraps an EvolutionWorker: one per GPU (or per CPU slot), kept alive across
generations so the model is loaded once. Ray restarts it if its process dies."""
from __future__ import annotations

import os

import ray

from .evolution_worker import EvolutionWorker

# Fault injection for tests of the driver's recovery: when the file named by this variable
# exists, the next evaluate() call deletes it and kills its own process (once).
CRASH_ONCE_ENV = "NAMM_TEST_CRASH_ONCE_FILE"


class _Actor(EvolutionWorker):
    def evaluate(self, vector, norm, requests, tasks=None):
        flag = os.environ.get(CRASH_ONCE_ENV)
        if flag:
            try:
                os.unlink(flag)
            except FileNotFoundError:
                pass
            else:
                os._exit(1)
        if tasks:
            self.prepare(tasks)
        return super().evaluate(vector, norm, requests)

    def reference(self, requests, tasks=None):
        if tasks:
            self.prepare(tasks)
        return super().reference(requests)

    def warm_start(self, imitate, norm, requests, steps, lr, seed, tasks=None):
        if tasks:
            self.prepare(tasks)
        return super().warm_start(imitate, norm, requests, steps, lr, seed)

    def collect_statistics(self, requests, tasks=None):
        if tasks:
            self.prepare(tasks)
        return super().collect_statistics(requests)


EvolutionActor = ray.remote(max_restarts=-1, max_task_retries=0)(_Actor)
