"""Build the next items of a sequence in a background thread while the caller uses the current one.

The trainer prepares micro-batches (prompt encoding, q reads, labels: host work, much of it
outside the GIL) while the accelerator runs the previous one. One thread, a bounded queue: the
results come in the order of the inputs, whatever the timing, so training stays deterministic.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator

_END = object()


class Prefetch:
    """`make(x)` for each `x` of `items`, computed up to `depth` ahead in a thread; iterate for the
    results in order. An exception in `make` is raised by the iteration that would have returned
    its result. Use as a context manager: leaving it stops the thread (also mid-sequence)."""

    def __init__(self, make: Callable, items: Iterable, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(make, items), daemon=True, name="prefetch")
        self._thread.start()

    def _put(self, value) -> bool:
        """Queue `value` unless the consumer has left; whether it was queued."""
        while not self._stop.is_set():
            try:
                self._queue.put(value, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, make: Callable, items: Iterable) -> None:
        try:
            for item in items:
                if not self._put((make(item), None)):
                    return
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, raised there
            self._put((None, err))
            return
        self._put((_END, None))

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        value, err = self._queue.get()
        if err is not None:
            raise err
        if value is _END:
            self._queue.put((_END, None))  # stays exhausted
            raise StopIteration
        return value

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> "Prefetch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
