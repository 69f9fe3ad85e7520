"""Stop requests (Ctrl-C, SIGTERM from `ray job stop` or `kill`) that never land inside a write to
the tracking store.

A signal raises KeyboardInterrupt wherever the main thread happens to be. Inside an MLflow call
that is a database transaction cut in half (SQLAlchemy then logs a traceback while it rolls back);
inside `deferred()` the stop is held until the call returns, then raised as usual. Calls take
milliseconds, so a stop still takes effect at once.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager

_depth = 0          # how deep the main thread is in deferred() blocks
_pending = False    # a stop arrived while it was


def request_stop(*_signal_args) -> None:
    """The signal handler: raise KeyboardInterrupt now, or when the current deferred() block ends."""
    global _pending
    if _depth > 0:
        _pending = True
        return
    raise KeyboardInterrupt


@contextmanager
def deferred():
    """Hold stop requests until the block ends (main thread only; other threads are not signalled)."""
    global _depth, _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
    if _depth == 0 and _pending:   # the block finished: the held stop takes effect now
        _pending = False
        raise KeyboardInterrupt


class ShieldedClient:
    """An MlflowClient whose every call runs inside `deferred()`."""

    def __init__(self, client):
        self._client = client

    def __getattr__(self, name):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            with deferred():
                return attr(*args, **kwargs)
        return call
