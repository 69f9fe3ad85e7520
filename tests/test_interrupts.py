"""Stop requests held while the tracking store is written (orchestrator/interrupts.py)."""
import os
import signal

import pytest

from orchestrator.interrupts import ShieldedClient, deferred, request_stop


def test_a_stop_outside_a_held_block_is_immediate():
    with pytest.raises(KeyboardInterrupt):
        request_stop()


def test_a_stop_inside_a_held_block_takes_effect_when_it_ends():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with deferred():
            with deferred():            # nested: held until the outermost block ends
                request_stop()
                done.append("inner")
            done.append("outer")
    assert done == ["inner", "outer"]
    with deferred():                    # the held stop was spent: a new block runs through
        done.append("again")
    assert done[-1] == "again"


def test_a_real_signal_during_a_shielded_call_stops_after_the_call():
    class Store:
        def __init__(self):
            self.writes = []

        def log_batch(self, value):
            os.kill(os.getpid(), signal.SIGTERM)   # arrives mid-call
            self.writes.append(value)              # the write still completes
            return value

    previous = signal.signal(signal.SIGTERM, request_stop)
    try:
        store = Store()
        client = ShieldedClient(store)
        with pytest.raises(KeyboardInterrupt):
            client.log_batch(1)
        assert store.writes == [1]
        assert client.writes == [1]             # attributes pass through
    finally:
        signal.signal(signal.SIGTERM, previous)
