"""Batches prepared and put on the devices ahead of the step that uses them.

``DevicePrefetcher`` runs ``put(next(source))`` on a background thread, ``depth`` batches
ahead of the training loop, so that reading, assembling and copying the next batches overlap
the step the devices are computing (double buffering with ``depth`` 2). A checkpoint must
record the batches the loop has *consumed*, not those prepared ahead: each prepared batch
carries the source's state after it, and ``get_state`` returns the state of the last batch
handed out, so a run resumed from it continues at the first batch no step has seen.

``depth`` 0 reads and puts each batch on the caller's thread when it is asked for: for a CPU
backend, whose "device" is the host, there is nothing for a thread to overlap, and its Python
work would hold the GIL the loop needs to dispatch the step.
"""

import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

_END = object()  # the source is exhausted


class _Failure(NamedTuple):
  error: BaseException


class DevicePrefetcher(Iterator):
  """``put(batch)`` of every batch of ``source`` (a grain iterator: ``get_state``), in order.

  Args:
    source: an iterator with ``get_state()``, positioned where the loop starts (after any
      ``set_state``); it is read from the background thread only.
    put: host batch -> device batch (e.g. ``sharding.global_batch`` on the run's mesh).
    depth: batches ready ahead of the consumer; 0: no thread, each batch is read and put when
      ``__next__`` asks for it.

  ``seconds`` holds the background thread's time reading the source (``input``) and putting
  batches on the devices (``host_to_device``); with ``depth`` 0 the caller's thread's time.
  Use it as a context manager, or ``close`` it.
  """

  def __init__(self, source: Any, put: Callable[[Any], Any], depth: int = 2):
    if depth < 0:
      raise ValueError(f"prefetch depth must be >= 0, got {depth}")
    self._source = source
    self._put = put
    self._state = source.get_state()
    self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
    self._stop = threading.Event()
    self.seconds = {"input": 0.0, "host_to_device": 0.0}
    self._thread = None
    if depth:
      self._thread = threading.Thread(target=self._fill, name="device-prefetch", daemon=True)
      self._thread.start()

  def _prepare(self) -> Any:
    """``(put(next batch), source state after it)``, or ``_END``."""
    began = time.perf_counter()
    try:
      batch = next(self._source)
    except StopIteration:
      return _END
    state = self._source.get_state()
    put_began = time.perf_counter()
    item = (self._put(batch), state)
    self.seconds["input"] += put_began - began
    self.seconds["host_to_device"] += time.perf_counter() - put_began
    return item

  def _fill(self) -> None:
    try:
      while not self._stop.is_set():
        item = self._prepare()
        if not self._offer(item) or item is _END:
          return
    except BaseException as error:  # pylint: disable=broad-except  # re-raised in __next__
      self._offer(_Failure(error))

  def _offer(self, item: Any) -> bool:
    """Queues ``item`` unless the prefetcher is closed meanwhile; returns whether it did."""
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.05)
        return True
      except queue.Full:
        pass
    return False

  def __next__(self) -> Any:
    if self._thread is None and self._queue.empty():
      try:
        self._queue.put(self._prepare())
      except Exception as error:  # pylint: disable=broad-except  # raised below, and again
        self._queue.put(_Failure(error))
    item = self._queue.get()
    if item is _END or isinstance(item, _Failure):
      self._queue.put(item)  # every later call ends the same way
      if item is _END:
        raise StopIteration
      raise item.error
    batch, self._state = item
    return batch

  def get_state(self) -> Any:
    """The source's state after the last batch handed out (its start state before any)."""
    return self._state

  def close(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()

  def __enter__(self) -> "DevicePrefetcher":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
