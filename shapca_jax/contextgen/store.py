"""JSONL files of generated contexts that survive a killed run.

The contexts file holds one line per image, `{"image_id", "context", "generator",
"prompt_sha"}`, appended as results arrive; each line is flushed and fsynced before the next
one, so a kill loses only the requests still in flight. A kill in the middle of a write can
leave a partial last line: `scan_contexts` detects it, saves the fragment beside the file and
cuts it off before anything new is appended. Failures go to a separate JSONL file (`image_id`,
`error`, `path`, `generator`, `prompt_sha`), so the contexts file only ever holds contexts.
"""

import dataclasses
import json
import os
import pathlib
import time
from collections.abc import Iterator

CONTEXT_FIELDS = ("image_id", "context", "generator", "prompt_sha")


@dataclasses.dataclass(frozen=True)
class DoneRecord:
  """Where an already generated context sits, and what produced it."""
  line: int
  generator: str
  prompt_sha: str


@dataclasses.dataclass(frozen=True)
class Scan:
  """The contexts already in a file, and a note on any repair made to the file."""
  done: dict[str, DoneRecord]
  repair: str | None = None


def default_failures_path(contexts_path: str | pathlib.Path) -> pathlib.Path:
  """`contexts.jsonl` -> `contexts.failures.jsonl` (beside it)."""
  path = pathlib.Path(contexts_path)
  stem = path.name[:-len(".jsonl")] if path.name.endswith(".jsonl") else path.name
  return path.with_name(stem + ".failures.jsonl")


def _parse_record(text: str) -> dict[str, str]:
  """The record on one line; ValueError saying what is wrong with it."""
  try:
    record = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"not valid JSON ({e})") from None
  if not isinstance(record, dict):
    raise ValueError(f"expected a JSON object, got {type(record).__name__}")
  for field in CONTEXT_FIELDS:
    if not isinstance(record.get(field), str):
      raise ValueError(f"field {field!r} is missing or not a string")
  return record


def _is_complete_record(fragment: bytes) -> bool:
  try:
    _parse_record(fragment.decode("utf-8"))
  except (UnicodeDecodeError, ValueError):
    return False
  return True


def _fsync_dir(folder: pathlib.Path) -> None:
  """Makes a new or renamed directory entry durable (no-op where a directory cannot be opened)."""
  try:
    fd = os.open(folder, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _repair_last_line(path: pathlib.Path, data: bytes) -> tuple[bytes, str | None]:
  """Fixes a last line without newline: completes a whole record, cuts off a partial one."""
  if not data or data.endswith(b"\n"):
    return data, None
  cut = data.rfind(b"\n") + 1
  fragment = data[cut:]
  if _is_complete_record(fragment):
    with open(path, "ab") as f:
      f.write(b"\n")
      f.flush()
      os.fsync(f.fileno())
    return data + b"\n", f"added the missing newline after the last record of {path}"
  saved = path.with_name(f"{path.name}.partial-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
  saved.write_bytes(fragment)
  with open(path, "r+b") as f:
    f.truncate(cut)
    f.flush()
    os.fsync(f.fileno())
  return data[:cut], (f"{path} ended with a partial line ({len(fragment)} bytes, left by an "
                      f"interrupted run); cut it off and saved it to {saved}")


def _records(path: pathlib.Path, data: bytes) -> Iterator[tuple[int, str, dict[str, str]]]:
  """(line number, line text, record) for each non-blank line; ValueError names file and line."""
  for number, raw in enumerate(data.split(b"\n")[:-1], start=1):
    try:
      text = raw.decode("utf-8")
      if not text.strip():
        continue
      yield number, text, _parse_record(text)
    except (UnicodeDecodeError, ValueError) as e:
      raise ValueError(f"{path}:{number}: not a context record: {e}") from None


def scan_contexts(path: str | pathlib.Path) -> Scan:
  """Reads the contexts already generated into `path` (none when it does not exist).

  Repairs a partial last line first (see the module docstring). Raises ValueError naming the
  file and line for any other malformed line, or for an id that occurs twice.
  """
  path = pathlib.Path(path)
  if not path.exists():
    return Scan({})
  data, repair = _repair_last_line(path, path.read_bytes())
  done: dict[str, DoneRecord] = {}
  for number, _, record in _records(path, data):
    image_id = record["image_id"]
    if image_id in done:
      raise ValueError(f"{path}:{number}: image id {image_id!r} already appears on line "
                       f"{done[image_id].line}")
    done[image_id] = DoneRecord(number, record["generator"], record["prompt_sha"])
  return Scan(done, repair)


def sort_contexts(path: str | pathlib.Path) -> None:
  """Rewrites the contexts file ordered by image id, atomically (temporary file + rename)."""
  path = pathlib.Path(path)
  data = path.read_bytes()
  lines = sorted((record["image_id"], text) for _, text, record in _records(path, data))
  tmp = path.with_name(f".{path.name}.sorting-{os.getpid()}")
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(text + "\n" for _, text in lines)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  _fsync_dir(path.parent)


class JsonlAppender:
  """Appends one JSON object per line, flushed when `write` returns.

  With `durable` (the default) each line is also fsynced, so it survives a crash of the machine,
  not only of the process; that costs a few milliseconds per line, nothing next to a model call.
  """

  def __init__(self, path: str | pathlib.Path, truncate: bool = False, durable: bool = True):
    self.path = pathlib.Path(path)
    self._durable = durable
    created = truncate or not self.path.exists()
    self._file = open(self.path, "w" if truncate else "a", encoding="utf-8")
    if created:
      _fsync_dir(self.path.parent)

  def write(self, record: dict[str, str]) -> None:
    self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
    self._file.flush()
    if self._durable:
      os.fsync(self._file.fileno())

  def close(self) -> None:
    self._file.close()

  def __enter__(self) -> "JsonlAppender":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
