"""Feeding recorded traffic through the same core the live collector runs.

``replay`` takes capture records (``shared.capture``) and drives a ``FeedCore`` exactly as
the live shell does: received frames go to ``on_frame``, recorded REST responses (book
snapshots, instrument lists) to ``on_rest``, a recorded reconnection to
``on_disconnected``; silence is checked against the recorded receive times. Outputs go to
``emit`` as they are produced. With ``speed`` set, records are paced by their receive
times (1.0 = as recorded); otherwise they run as fast as possible.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from services.collector.core import FeedCore
from shared.capture import Record
from shared.models import Message

SILENCE_CHECK_NS = 100_000_000


def replay(
    core: FeedCore,
    records: Iterable[Record],
    emit: Callable[[list[Message]], None],
    *,
    speed: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Run ``records`` through ``core``; returns the number of records used."""
    count = 0
    first_recorded = first_wall = 0.0
    next_check = 0
    connected = False
    for record in records:
        if speed is not None and record.recv_ns:
            if not first_recorded:
                first_recorded, first_wall = record.recv_ns, time.perf_counter()
            due = first_wall + (record.recv_ns - first_recorded) / 1e9 / speed
            delay = due - time.perf_counter()
            if delay > 0:
                sleep(delay)
        kind = record.kind
        if kind == "ws":
            core.on_frame(record.data, record.recv_ns)
        elif kind == "rest":
            core.on_rest(record.url, record.data, record.recv_ns)
        elif kind == "open":
            if connected:  # the recording reconnected: books are unknown until resynced
                core.on_disconnected(record.recv_ns, "reconnected")
            connected = True
            core.on_connected(record.recv_ns)
        else:
            continue
        if record.recv_ns and record.recv_ns >= next_check:
            core.check_silence(record.recv_ns)
            next_check = record.recv_ns + SILENCE_CHECK_NS
        if core.outputs:
            emit(core.take())
        core.actions.clear()  # a recording cannot answer requests: its snapshots arrive in-stream
        count += 1
    return count
