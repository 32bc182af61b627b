"""Side-by-side timing shared by the benchmarks: alternate the contenders call by call."""

import time
from collections.abc import Callable

# A forward pass and the call that waits for its result.
Runner = tuple[Callable[[], object], Callable[[object], None]]


def interleaved_times(runners: dict[str, Runner], warmup: int, iters: int) -> dict[str, list[float]]:
  """Seconds per call of each (fn, sync) runner, alternating runners every iteration so that
  load from other processes on a shared machine hits both sides alike."""
  for fn, sync in runners.values():
    for _ in range(warmup):  # compilation, allocator and thread-pool warm-up
      sync(fn())
  times: dict[str, list[float]] = {name: [] for name in runners}
  for _ in range(iters):
    for name, (fn, sync) in runners.items():
      begin = time.perf_counter()
      sync(fn())
      times[name].append(time.perf_counter() - begin)
  return times
