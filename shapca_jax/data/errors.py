"""The error raised for bad input files, and reading raw text files so that every failure names
the file and the line."""

import os
import pathlib
from collections.abc import Iterator


class DataFormatError(ValueError):
  """A data or context file does not hold what its format promises."""


def where(path: os.PathLike | str, line: int | None = None) -> str:
  """`path:line`, the prefix of every error message about file contents."""
  return f"{path}:{line}" if line is not None else str(path)


def read_lines(path: os.PathLike | str) -> list[str]:
  """The lines of a UTF-8 text file without their line ends (LF or CRLF); line i is [i - 1].

  Raises:
    DataFormatError: the file is missing, unreadable or not UTF-8; the message names the file
      and, for bad bytes, the line.
  """
  path = pathlib.Path(path)
  try:
    raw = path.read_bytes()
  except OSError as err:
    raise DataFormatError(f"{path}: cannot read the file ({err.strerror or err})") from err
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as err:
    line = raw.count(b"\n", 0, err.start) + 1
    raise DataFormatError(
        f"{where(path, line)}: expected UTF-8 text, found the byte {raw[err.start:err.start + 1]!r}"
    ) from err
  lines = [line.removesuffix("\r") for line in text.split("\n")]
  if lines and not lines[-1]:
    lines.pop()  # the final line end does not start another line
  return lines


def count_crlf(path: os.PathLike | str) -> int:
  """How many lines of a (readable) file end in CRLF; reported, since some sources use it."""
  return pathlib.Path(path).read_bytes().count(b"\r\n")


def blocks(lines: list[str]) -> Iterator[tuple[int, int]]:
  """`[start, end)` line ranges of the blank-line separated blocks (CoNLL tweets, PGIM entries)."""
  start = 0
  while start < len(lines):
    if not lines[start].strip():
      start += 1
      continue
    end = start
    while end < len(lines) and lines[end].strip():
      end += 1
    yield start, end
    start = end
