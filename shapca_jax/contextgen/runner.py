"""Describes many images with a backend, resumably: skip what is done, append what arrives, report.

A rerun with the same contexts file skips the ids already in it, so a killed job is continued
by running the same command again; it loses at most the requests in flight at the kill.
Images that got no context in a run are listed with their reason in the failures file (rewritten
by every run) and in the summary, and are tried again by the next run.
"""

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import pathlib
import time
from collections.abc import Callable, Sequence

import tqdm

from shapca_jax.contextgen import backends
from shapca_jax.contextgen import images as images_lib
from shapca_jax.contextgen import prompts
from shapca_jax.contextgen import store

_Outcome = str | Exception  # A context, or why the image has none.


@dataclasses.dataclass
class RunSummary:
  """What one run did. `failures` maps image id -> reason."""
  contexts_path: pathlib.Path
  failures_path: pathlib.Path
  total: int
  skipped: int
  generated: int = 0
  failures: dict[str, str] = dataclasses.field(default_factory=dict)
  repair: str | None = None
  aborted: str | None = None
  elapsed_s: float = 0.0

  @property
  def ok(self) -> bool:
    """True when every requested image has its context."""
    return self.skipped + self.generated == self.total

  def format(self, max_reasons: int = 10, max_ids: int = 5) -> str:
    """A human-readable report: counts, then the failures grouped by reason."""
    not_attempted = self.total - self.skipped - self.generated - len(self.failures)
    lines = [f"contexts: {self.total} images: {self.skipped} already done (skipped), "
             f"{self.generated} generated, {len(self.failures)} failed"
             + (f", {not_attempted} not attempted" if not_attempted else "")
             + f" in {self.elapsed_s:.1f}s -> {self.contexts_path}"]
    if self.repair:
      lines.append(f"repaired: {self.repair}")
    if self.aborted:
      lines.append(f"aborted: {self.aborted}")
    by_reason: dict[str, list[str]] = collections.defaultdict(list)
    for image_id, reason in self.failures.items():
      by_reason[reason].append(image_id)
    if by_reason:
      lines.append(f"failures (listed in {self.failures_path}):")
    ranked = sorted(by_reason.items(), key=lambda item: -len(item[1]))
    for reason, ids in ranked[:max_reasons]:
      shown = ", ".join(sorted(ids)[:max_ids]) + (", ..." if len(ids) > max_ids else "")
      lines.append(f"  {len(ids)} x {reason}: {shown}")
    if len(ranked) > max_reasons:
      lines.append(f"  ... and {len(ranked) - max_reasons} more reasons")
    return "\n".join(lines)


def _check_one_generator(scan: store.Scan, path: pathlib.Path, generator: str, sha: str) -> None:
  """Refuses to add contexts to a file whose contexts came from another generator or prompt."""
  for image_id, record in scan.done.items():
    if (record.generator, record.prompt_sha) != (generator, sha):
      raise ValueError(
          f"{path}:{record.line}: the context of {image_id!r} comes from generator "
          f"{record.generator!r} with prompt_sha {record.prompt_sha[:12]}..., but this run uses "
          f"{generator!r} with prompt_sha {sha[:12]}...; write to another file, or allow mixing "
          "explicitly (allow_mixed=True, --allow_mixed)")


def _load_batch(batch: Sequence[images_lib.ImageRef]
                ) -> tuple[list[images_lib.LoadedImage], dict[str, _Outcome]]:
  """The images of `batch` that load, and the reason for each that does not."""
  loaded, failures = [], {}
  for ref in batch:
    try:
      loaded.append(images_lib.load_image(ref))
    except images_lib.ImageError as e:
      failures[ref.image_id] = e
  return loaded, failures


async def _describe_batch(backend: backends.Backend,
                          batch: Sequence[images_lib.ImageRef]) -> list[_Outcome]:
  """Per image of `batch`: its context, or the exception saying why it has none."""
  # In a thread: reading and decoding the files must not stall the requests in flight.
  loaded, outcomes = await asyncio.to_thread(_load_batch, batch)
  if loaded:
    try:
      results = await backend.generate(loaded)
    except backends.GenerationError as e:
      results = [e] * len(loaded)
    if len(results) != len(loaded):
      raise RuntimeError(f"backend {backend.generator} returned {len(results)} results for "
                         f"{len(loaded)} images")
    outcomes.update(zip((image.image_id for image in loaded), results))
  return [outcomes[ref.image_id] for ref in batch]


async def _run_batches(backend: backends.Backend,
                       batches: Sequence[Sequence[images_lib.ImageRef]],
                       on_done: Callable[[Sequence[images_lib.ImageRef], list[_Outcome]], None]
                       ) -> str | None:
  """Runs the batches, `backend.concurrency` at a time, calling `on_done` as each finishes.

  Each of `backend.concurrency` workers takes the next batch when it is done with one. `on_done`
  runs in one writer thread, a call at a time: its fsync must not stall the requests in flight.
  After a FatalBackendError no batch starts; those already running finish and are recorded. On
  Ctrl-C the running batches are cancelled; what is written so far stays valid.
  Returns the fatal error's message, or None.
  """
  queue = collections.deque(batches)
  fatal: list[str] = []
  loop = asyncio.get_running_loop()

  async def worker(writer: concurrent.futures.Executor) -> None:
    while queue and not fatal:
      batch = queue.popleft()
      try:
        outcomes = await _describe_batch(backend, batch)
      except backends.FatalBackendError as e:
        fatal.append(str(e))
        continue
      await loop.run_in_executor(writer, on_done, batch, outcomes)

  with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="contextgen-writer") as writer:
    async with backend:
      await asyncio.gather(*(worker(writer) for _ in range(backend.concurrency)))
  return fatal[0] if fatal else None


def generate_contexts(refs: Sequence[images_lib.ImageRef], backend: backends.Backend,
                      contexts_path: str | pathlib.Path, *,
                      failures_path: str | pathlib.Path | None = None, sort: bool = False,
                      allow_mixed: bool = False, progress: bool = True) -> RunSummary:
  """Writes a context for every image of `refs` not yet in `contexts_path`.

  Args:
    refs: the images to describe (unique ids).
    backend: the multimodal model (see `backends`).
    contexts_path: the JSONL file of contexts; appended to, created if missing.
    failures_path: the JSONL file listing this run's failures with reasons; default
      `<contexts stem>.failures.jsonl` beside the contexts file.
    sort: rewrite the contexts file ordered by image id at the end (atomic rename).
    allow_mixed: add to a file whose contexts came from another generator or prompt.
    progress: show a progress bar (rate and ETA) on stderr.

  Returns:
    The run's summary; `summary.ok` says whether every image has its context.
  """
  start = time.monotonic()
  images_lib.check_unique(refs)
  contexts_path = pathlib.Path(contexts_path)
  failures_path = pathlib.Path(failures_path or store.default_failures_path(contexts_path))
  contexts_path.parent.mkdir(parents=True, exist_ok=True)
  sha = prompts.prompt_sha(backend.prompt)
  scan = store.scan_contexts(contexts_path)
  if scan.repair:
    logging.warning("%s", scan.repair)
  if not allow_mixed:
    _check_one_generator(scan, contexts_path, backend.generator, sha)
  todo = [ref for ref in refs if ref.image_id not in scan.done]
  summary = RunSummary(contexts_path, failures_path, total=len(refs),
                       skipped=len(refs) - len(todo), repair=scan.repair)
  batches = [todo[i:i + backend.batch_size] for i in range(0, len(todo), backend.batch_size)]
  with (store.JsonlAppender(contexts_path) as contexts,
        # Failures need no fsync: the next run retries every image missing from the contexts.
        store.JsonlAppender(failures_path, truncate=True, durable=False) as failures,
        tqdm.tqdm(total=len(todo), unit="img", desc="contexts", disable=not progress,
                  dynamic_ncols=True) as bar):

    def record(batch: Sequence[images_lib.ImageRef], outcomes: list[_Outcome]) -> None:
      for ref, outcome in zip(batch, outcomes):
        fields = {"image_id": ref.image_id}
        if isinstance(outcome, str):
          contexts.write(fields | {"context": outcome, "generator": backend.generator,
                                   "prompt_sha": sha})
          summary.generated += 1
        else:
          failures.write(fields | {"error": str(outcome), "path": str(ref.path),
                                   "generator": backend.generator, "prompt_sha": sha})
          summary.failures[ref.image_id] = str(outcome)
      bar.update(len(batch))
      bar.set_postfix(failed=len(summary.failures), refresh=False)

    summary.aborted = asyncio.run(_run_batches(backend, batches, record))
  if sort:
    store.sort_contexts(contexts_path)
  summary.elapsed_s = time.monotonic() - start
  return summary
