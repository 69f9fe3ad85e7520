"""Worker classes that fail on purpose, for the driver's recovery tests (importable by Ray's
workers: the tests' Ray cluster puts this folder on their PYTHONPATH)."""
import os

from workers.actor import _Actor


class CrashOnceActor(_Actor):
    """Kills its own process in evaluate() once: when the flag file exists, it deletes it and exits."""

    def evaluate(self, vector, norm, requests, tasks=None):
        flag = os.environ.get("NAMM_CRASH_FLAG") or self.flag
        try:
            os.unlink(flag)
        except (FileNotFoundError, TypeError):
            pass
        else:
            os._exit(1)
        return super().evaluate(vector, norm, requests, tasks)

    flag = None
