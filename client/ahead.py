"""Run an iterator a few items ahead in a background thread, so that a consumer's ``next`` finds
its item ready (decoding the next message overlaps the training step instead of stalling it)."""

from __future__ import annotations

import atexit
import queue
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

_ITEM, _END, _ERROR = range(3)
#: How long ``close`` waits for the thread: it ends within one queue timeout once interrupted.
_JOIN_S = 5.0
#: Threads still running, stopped at interpreter exit: a thread left inside gRPC while the
#: interpreter tears gRPC down can abort the process.
_LIVE: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for ahead in list(_LIVE):
        ahead.close()


class Ahead(Generic[T]):
    """Iterate ``source`` in a daemon thread, at most ``depth`` items ahead of the consumer.

    The source's exception is raised in the consumer, after the items before it. ``close()`` (or
    the consumer's iteration ending early) stops the thread: ``interrupt`` is called to wake a
    source blocked inside a call (it cancels the gRPC stream), and the thread closes the source.
    """

    def __init__(self, source: Iterator[T], depth: int, interrupt: Callable[[], None] | None = None,
                 name: str = "tokenfeed-ahead") -> None:
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        self._queue: queue.Queue[tuple[int, object]] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._interrupt = interrupt
        self._thread = threading.Thread(target=self._run, args=(source,), name=name, daemon=True)
        self._thread.start()
        _LIVE.add(self)

    def _put(self, kind: int, value: object) -> bool:
        """Hand an item over; False when the consumer stopped first."""
        while not self._stop.is_set():
            try:
                self._queue.put((kind, value), timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, source: Iterator[T]) -> None:
        try:
            for item in source:
                if not self._put(_ITEM, item):
                    return
            self._put(_END, None)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, raised there
            if not self._stop.is_set():
                self._put(_ERROR, err)
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    def __iter__(self) -> Iterator[T]:
        try:
            while True:
                kind, value = self._queue.get()
                if kind == _ITEM:
                    yield value  # type: ignore[misc]
                elif kind == _END:
                    return
                else:
                    raise value  # type: ignore[misc]
        finally:
            self.close()

    def close(self) -> None:
        """Stop the thread and wait for it (it ends once its current item is done or interrupted)."""
        if not self._stop.is_set():
            self._stop.set()
            if self._interrupt is not None:
                self._interrupt()
        if self._thread is not threading.current_thread():
            self._thread.join(_JOIN_S)
        _LIVE.discard(self)
