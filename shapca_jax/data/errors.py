"""The error raised for bad input files, and reading raw text files so that every failure names
the file and the line."""

import os
import pathlib
import re
from collections.abc import Iterator

import numpy as np

# Python's parser and json recurse once per nesting level (and per operator of a chain such as
# `- - - 1`), so a pathological line would end in a bare RecursionError or MemoryError. Real
# records nest 4 levels deep and have lines of at most 3,529 characters (MiniCPM contexts).
MAX_LINE_CHARS = 100_000
MAX_NESTING = 100
_PYTHON_STRING = re.compile(r"'(?:[^'\\\n]|\\.)*'" + r'|"(?:[^"\\\n]|\\.)*"')
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_OPERATORS = re.compile(r"[-+~*/%@&|^<>!]")


# The exit status of every command-line tool after an expected user error (bad files, flags,
# config), told apart from a crash (1).
USAGE_EXIT_CODE = 2


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
  text = text.removeprefix("\ufeff")  # the byte-order mark some Windows editors write
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


def check_python_line(line: str, loc: str) -> None:
  """Raises `DataFormatError` at `loc` for a line too long or too deeply nested (brackets or
  operators outside string literals) for `ast.literal_eval` to parse safely."""
  if len(line) > MAX_LINE_CHARS:
    raise DataFormatError(f"{loc}: the line has {len(line):,} characters; expected at most "
                          f"{MAX_LINE_CHARS:,}")
  code = _PYTHON_STRING.sub("''", line)
  if len(_OPERATORS.findall(code)) > MAX_NESTING:
    raise DataFormatError(f"{loc}: more than {MAX_NESTING} operators outside strings; expected "
                          "a literal")
  _check_depth(code, lambda position: loc)


def check_json_nesting(text: str, path: os.PathLike | str, first_line: int = 1) -> None:
  """Raises `DataFormatError` naming the file and line where `text` (JSON starting at line
  `first_line` of `path`) nests deeper than `MAX_NESTING` outside strings."""
  _check_depth(_JSON_STRING.sub('""', text),
               lambda position: where(path, first_line + text.count("\n", 0, position)))


def _check_depth(code: str, loc_at) -> None:
  """`code` is text with its string literals emptied, so only real brackets count (string
  lengths change, but never the newlines before a position, which `loc_at` counts)."""
  chars = np.frombuffer(code.encode("utf-8", "replace"), np.uint8)
  step = np.isin(chars, np.frombuffer(b"([{", np.uint8)).astype(np.int32)
  step -= np.isin(chars, np.frombuffer(b")]}", np.uint8))
  depth = np.cumsum(step)
  if depth.size and depth.max() > MAX_NESTING:
    position = int(np.argmax(depth > MAX_NESTING))
    raise DataFormatError(f"{loc_at(position)}: brackets nest more than {MAX_NESTING} levels "
                          "deep; expected a record a few levels deep")
