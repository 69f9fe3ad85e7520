"""Worker classes that fail on purpose, for the driver's recovery tests (importable by Ray's
workers: the tests' Ray cluster puts this folder on their PYTHONPATH)."""
import os

from workers.evolution_worker import EvolutionWorker


class CrashOnceActor(EvolutionWorker):
    """Kills its own process in evaluate() once: when the file `flag` (set by a subclass) exists,
    it deletes it and exits."""
    flag: str = ""

    def evaluate(self, vector, norm, requests, tasks=None):
        try:
            os.unlink(self.flag)
        except FileNotFoundError:
            pass
        else:
            os._exit(1)
        return super().evaluate(vector, norm, requests, tasks)
