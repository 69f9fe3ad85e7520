"""The Ray actor that wraps an EvolutionWorker: one per GPU (or per CPU slot), kept alive across
generations so the model is loaded once. Ray restarts it if its process dies."""
from __future__ import annotations

import ray

from .evolution_worker import EvolutionWorker


def remote_actor(cls=None):
    """The Ray actor class of `cls` (an EvolutionWorker subclass; tests inject faulty ones)."""
    return ray.remote(max_restarts=-1, max_task_retries=0)(cls or EvolutionWorker)


EvolutionActor = remote_actor()
