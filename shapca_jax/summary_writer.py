"""A run's scalars as TensorBoard event files, written without TensorFlow.

``SummaryWriter(workdir).scalars(step, record)`` writes every number of ``record`` at ``step``
under its key; nested mappings become ``parent/child`` tags (``{"dev": {"f1": ...}}`` is
``dev/f1``), so the records of ``metrics.jsonl`` read the same in TensorBoard::

  tensorboard --logdir WORKDIR

The writer is TensorBoard's own event file writer (the one ``torch.utils.tensorboard`` uses):
it takes host numbers only and writes them from a background thread, so a call never waits on
the device. Its queue holds a log step's events (one per step since the last log step), so
queuing them does not wait on that thread either. A watching TensorBoard sees each point once
the thread has written it: on a local disk each write lands in the file at once, and on a
filesystem without appends (an object store) the thread flushes every ``FLUSH_SECONDS``.

A resumed run replays the steps after its checkpoint. ``resumed(step)`` marks the restart in the
new event file (TensorBoard's ``SessionLog.START``): TensorBoard's Python loader then drops every
point at a later step that the interrupted run wrote. Its default fast loader ignores the mark
but drops a tag's later points when that tag's step goes back, which the replayed steps and
evaluations do; either way each step shows once.
"""

import numbers
import os
import time
from collections.abc import Iterator, Mapping
from typing import Any

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

FLUSH_SECONDS = 10
QUEUE_EVENTS = 1024  # serialised scalar events of a few hundred bytes each


def flatten(record: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
  """(tag, value) for each number in ``record``, nested keys joined with ``/``; values that are
  not numbers (strings, lists) have no curve and are left out."""
  for key, value in record.items():
    tag = f"{prefix}{key}"
    if isinstance(value, Mapping):
      yield from flatten(value, f"{tag}/")
    elif isinstance(value, numbers.Real):
      yield tag, float(value)


class SummaryWriter:
  """Scalars of one run, appended to an event file in ``logdir``.

  A disabled writer (``enabled=False``: ``config.tensorboard`` off, or a process other than 0
  of a multi-host run, which holds the same replicated metrics) creates no file and writes
  nothing.
  """

  def __init__(self, logdir: str | os.PathLike, *, enabled: bool = True):
    self._writer = (EventFileWriter(str(logdir), max_queue_size=QUEUE_EVENTS,
                                    flush_secs=FLUSH_SECONDS) if enabled else None)

  def resumed(self, step: int) -> None:
    """Marks that the run goes on from its checkpoint of ``step``: TensorBoard drops the points
    after ``step`` that the interrupted run wrote, which the resumed run writes again."""
    if self._writer is not None:
      self._writer.add_event(event_pb2.Event(
          wall_time=time.time(), step=step + 1,
          session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

  def scalars(self, step: int, record: Mapping[str, Any]) -> None:
    """Writes the numbers of ``record`` (nested mappings allowed) as one event at ``step``."""
    if self._writer is None:
      return
    values = [summary_pb2.Summary.Value(tag=tag, simple_value=value)
              for tag, value in flatten(record)]
    if values:
      self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=step,
                                             summary=summary_pb2.Summary(value=values)))

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def __enter__(self) -> "SummaryWriter":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
