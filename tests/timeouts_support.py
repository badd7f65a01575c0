"""``deadline``: fail a test step instead of letting it hang (shared by the bad-input tests)."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Raise TimeoutError after ``seconds`` (SIGALRM also interrupts a blocking open of a
    FIFO); main thread only."""

    def expired(signum: int, frame: object) -> None:
        raise TimeoutError(f"hung for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
