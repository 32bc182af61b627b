"""Context sources (image-derived text) and how they join to examples.

A context source is named (`blip2`, `pgim` for Twitter; `BLIP`, `instruct`, `llavanext`,
`caption`, `minicpm` for MNRE and JMERE) or is the path of a generic JSONL file
`{"image_id", "context", "generator", ...}` (extra keys ignored; a `{split}` in the path selects
one file per split). Contexts join to examples on the image id, with or without its extension;
PGIM files carry no ids and join by position, each entry checked against its tweet's words.

Every id in a context file must match an image of the data set it was written for, and every
example must find a non-empty context, unless `missing_context="empty"`, in which case the
missing ones get no context, the empty ones keep theirs, and both are counted in the returned
report and logged.
"""

import ast
import dataclasses
import functools
import json
import logging
import os
import pathlib
import re
from collections.abc import Callable, Sequence
from typing import NamedTuple

from shapca_jax.data import readers
from shapca_jax.data.errors import (DataFormatError, blocks, check_json_nesting, check_python_line,
                                    count_crlf, read_lines, where)
from shapca_jax.data.readers import Example

TWITTER_SOURCES = ("blip2", "pgim")
MNRE_SOURCES = ("BLIP", "instruct", "llavanext", "caption", "minicpm")
MISSING_CONTEXT = ("error", "empty")

_IMAGE_EXTENSION = re.compile(r"\.(jpe?g|png|gif|bmp|webp)$", re.IGNORECASE)
# CAMIM's caption files each end with an entry for `inf.png`, an image of no MNRE split.
_CAMIM_PLACEHOLDERS = frozenset({"inf"})


class ContextEntry(NamedTuple):
  """One context read from a file: its join key (image key, or the tweet's words for PGIM)."""
  key: str | tuple[str, ...]
  text: str
  line: int


@dataclasses.dataclass(frozen=True)
class ContextSource:
  """Where a context source lives and how it is read and joined.

  Attributes:
    name: the source name (or the JSONL path).
    pattern: file path relative to the data folder (absolute for JSONL); `{split}` is replaced
      by the data set's spelling of the split.
    reader: parses one file into entries.
    by_order: entries join to examples by position (PGIM), not by image id.
    owner: the data set whose images the file describes (JMERE uses MNRE's contexts).
    placeholders: image keys the files carry that belong to no image; dropped and counted.
  """
  name: str
  pattern: str
  reader: Callable[[pathlib.Path], list[ContextEntry]]
  owner: str
  by_order: bool = False
  placeholders: frozenset[str] = frozenset()

  @property
  def per_split(self) -> bool:
    return "{split}" in self.pattern

  def path(self, data_dir: os.PathLike | str, split: str) -> pathlib.Path:
    name = readers.SPLIT_NAMES[self.owner][split]
    return pathlib.Path(data_dir) / self.pattern.format(split=name)


@dataclasses.dataclass
class ContextReport:
  """How well one context source covers one split; goes into `inspect` output and logs."""
  source: str
  split: str
  files: list[str]
  examples: int
  with_context: int
  missing: int
  empty_texts: int
  placeholders_dropped: int
  crlf_lines: int

  @property
  def coverage(self) -> float:
    return self.with_context / self.examples if self.examples else 1.0

  def as_dict(self) -> dict:
    return dataclasses.asdict(self) | {"coverage": round(self.coverage, 6)}


def image_key(image_id: str) -> str:
  """The join key of an image id: the id without an image extension (`123.jpg` -> `123`)."""
  return _IMAGE_EXTENSION.sub("", image_id.strip())


def read_caption_file(path: pathlib.Path) -> list[ContextEntry]:
  """BLIP-2 caption file: one `<id>.jpg :<caption>` per line."""
  entries = []
  for i, line in enumerate(read_lines(path)):
    image_id, sep, caption = line.partition(" :")
    if not sep or not image_id.strip():
      raise DataFormatError(f"{where(path, i + 1)}: expected '<image id> :<caption>', got {line!r}")
    entries.append(ContextEntry(image_key(image_id), caption.strip(), i + 1))
  return entries


def read_camim_file(path: pathlib.Path) -> list[ContextEntry]:
  """MNRE captioner file (CAMIM): one dict literal `{'img_id': ..., 'text': ...}` per line."""
  entries = []
  for i, line in enumerate(read_lines(path)):
    check_python_line(line, where(path, i + 1))
    try:
      record = ast.literal_eval(line)
    except (ValueError, SyntaxError, RecursionError, MemoryError) as err:  # see check_python_line
      raise DataFormatError(f"{where(path, i + 1)}: expected a Python dict literal "
                            f"{{'img_id': ..., 'text': ...}}, got {line[:80]!r}") from err
    entries.append(_keyed_entry(record, "img_id", "text", path, i + 1))
  return entries


def read_jsonl(path: pathlib.Path) -> list[ContextEntry]:
  """Generic JSONL: one `{"image_id", "context", "generator", ...}` object per line; only
  `image_id` and `context` are read."""
  entries = []
  for i, line in enumerate(read_lines(path)):
    check_json_nesting(line, path, first_line=i + 1)
    try:
      record = json.loads(line)
    except json.JSONDecodeError as err:
      raise DataFormatError(f"{where(path, i + 1)}: expected a JSON object "
                            f"{{\"image_id\", \"context\", \"generator\"}} ({err.msg})") from err
    entries.append(_keyed_entry(record, "image_id", "context", path, i + 1))
  return entries


def _keyed_entry(record, id_key: str, text_key: str, path, line: int) -> ContextEntry:
  if not (isinstance(record, dict) and isinstance(record.get(id_key), str)
          and isinstance(record.get(text_key), str) and record[id_key].strip()):
    raise DataFormatError(f"{where(path, line)}: expected string fields {id_key!r} and "
                          f"{text_key!r}, got {str(record)[:80]!r}")
  return ContextEntry(image_key(record[id_key]), record[text_key].strip(), line)


def read_pgim_file(path: pathlib.Path) -> list[ContextEntry]:
  """PGIM file: per tweet its `token<TAB>tag` lines, `<EOS><TAB>X`, then the generated text one
  `word<TAB>X` per line; a blank line between tweets. Keys are the tweets' words."""
  lines = read_lines(path)
  entries = []
  for start, end in blocks(lines):
    fields = [lines[i].split("\t") for i in range(start, end)]
    for i, f in enumerate(fields):
      if len(f) != 2 or not f[0]:
        raise DataFormatError(f"{where(path, start + i + 1)}: expected 'token<TAB>tag', "
                              f"got {lines[start + i]!r}")
    eos = next((i for i, f in enumerate(fields) if f[0] == "<EOS>"), None)
    if eos is None:
      raise DataFormatError(f"{where(path, start + 1)}: expected a line '<EOS><TAB>X' between "
                            f"the tweet and its text (block ends at line {end})")
    words = tuple(f[0] for f in fields[:eos])
    entries.append(ContextEntry(words, " ".join(f[0] for f in fields[eos + 1:]), start + 1))
  return entries


def builtin_sources(dataset: str) -> tuple[str, ...]:
  """The named context sources of a data set."""
  return TWITTER_SOURCES if dataset.startswith("twitter") else MNRE_SOURCES


def resolve_source(dataset: str, source: str) -> ContextSource:
  """A named source of `dataset`, or a JSONL path (anything ending in `.jsonl`)."""
  if dataset not in readers.DATASETS:
    raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(readers.DATASETS)}")
  if source.endswith(".jsonl"):
    return ContextSource(source, str(pathlib.Path(source).resolve()), read_jsonl, owner=dataset)
  if source not in builtin_sources(dataset):
    raise ValueError(f"unknown context source {source!r} for {dataset}; expected one of "
                     f"{', '.join(builtin_sources(dataset))} or a path ending in .jsonl")
  if source == "blip2":
    return ContextSource(source, f"{dataset}/contexts/blip2.txt", read_caption_file, dataset)
  if source == "pgim":
    return ContextSource(source, f"{dataset}/contexts/pgim/{{split}}.txt", read_pgim_file, dataset,
                         by_order=True)
  return ContextSource(source, f"mnre/contexts/{source}_{{split}}.txt", read_camim_file, "mnre",
                       placeholders=_CAMIM_PLACEHOLDERS)


def attach_contexts(
    examples: Sequence[Example],
    dataset: str,
    split: str,
    data_dir: os.PathLike | str,
    source: str,
    *,
    missing_context: str = "error",
) -> tuple[list[Example], ContextReport]:
  """Joins a context source to the examples of one split.

  Args:
    examples: `readers.read_split(dataset, split, data_dir)`.
    dataset, split, data_dir: what the examples were read from.
    source: a name of `builtin_sources(dataset)` or a JSONL path.
    missing_context: `error` (default) raises on an example without context or with an empty
      one; `empty` leaves a missing `context` None, keeps an empty one, and counts both in the
      report.

  Returns:
    The examples with `context` set, and the coverage report.

  Raises:
    DataFormatError: a malformed context file, an id matching no image of the data set, two
      different contexts for one image, or (with `missing_context="error"`) a missing or empty
      context.
  """
  if missing_context not in MISSING_CONTEXT:
    raise ValueError(f"missing_context={missing_context!r}; expected one of {MISSING_CONTEXT}")
  spec = resolve_source(dataset, source)
  path = spec.path(data_dir, split)
  entries = spec.reader(path)
  if spec.by_order:
    texts = _align_by_order(examples, entries, path)
    lines = [e.line for e in entries]
    dropped = 0
  else:
    table, first_lines, dropped = _table(entries, path, spec.placeholders)
    _check_all_matched(table, _owner_keys(spec, data_dir, split), path)
    texts = [table.get(image_key(e.image_id)) for e in examples]
    lines = [first_lines.get(image_key(e.image_id)) for e in examples]
  missing = [e for e, t in zip(examples, texts) if t is None]
  empty = [(e, line) for e, t, line in zip(examples, texts, lines) if t == ""]
  if missing and missing_context == "error":
    listed = "; ".join(f"{e.source} (image {e.image_id})" for e in missing[:5])
    raise DataFormatError(
        f"{path}: {len(missing)} of {len(examples)} examples have no context, e.g. {listed}; "
        "expected one per example (pass missing_context='empty' to count them instead)")
  if empty and missing_context == "error":
    (example, line), others = empty[0], len(empty) - 1
    raise DataFormatError(
        f"{where(path, line)}: the context of {example.source} (image {example.image_id}) is "
        f"empty{f', and {others} more' if others else ''}; expected text (pass "
        "missing_context='empty' to count empty contexts instead)")
  report = ContextReport(
      source=spec.name, split=split, files=[str(path)], examples=len(examples),
      with_context=len(examples) - len(missing), missing=len(missing),
      empty_texts=sum(1 for t in texts if t == ""), placeholders_dropped=dropped,
      crlf_lines=count_crlf(path))
  if missing or empty:
    logging.warning("%s: %d of %d %s/%s examples have no context and %d an empty one "
                    "(missing_context=empty)", path, len(missing), len(examples), dataset, split,
                    len(empty))
  return [dataclasses.replace(e, context=t) for e, t in zip(examples, texts)], report


def _table(entries: list[ContextEntry], path, placeholders: frozenset[str]):
  table, lines = {}, {}
  dropped = 0
  for entry in entries:
    if entry.key in placeholders:
      dropped += 1
      continue
    if entry.key in table and table[entry.key] != entry.text:
      raise DataFormatError(f"{where(path, entry.line)}: image {entry.key!r} already has a "
                            f"different context at line {lines[entry.key]}; expected one per image")
    table[entry.key] = entry.text
    lines.setdefault(entry.key, entry.line)
  return table, lines, dropped


def _owner_keys(spec: ContextSource, data_dir, split: str) -> set[str]:
  """Image keys of the data set the file was written for: of the split (one file per split) or
  of every split (one file for all). Read from the split files, since the examples being joined
  may be a subset."""
  splits = [split] if spec.per_split else readers.available_splits(spec.owner, data_dir)
  keys = set()
  for s in splits:
    path = readers.split_path(spec.owner, s, data_dir)
    version = path.stat().st_mtime_ns if path.is_file() else -1  # read_split names a missing file
    keys |= _split_image_keys(spec.owner, s, str(data_dir), version)
  return keys


@functools.lru_cache(maxsize=16)
def _split_image_keys(dataset: str, split: str, data_dir: str, mtime_ns: int) -> frozenset[str]:
  """Cached per file version (`mtime_ns`): joining several sources re-reads no split file."""
  del mtime_ns
  return frozenset(image_key(e.image_id) for e in readers.read_split(dataset, split, data_dir))


def _check_all_matched(table: dict[str, str], keys: set[str], path) -> None:
  unmatched = [k for k in table if k not in keys]
  if unmatched:
    raise DataFormatError(
        f"{path}: {len(unmatched)} context ids match no image of the data set, e.g. "
        f"{unmatched[:5]}; expected ids of the data set's images (with or without extension)")


def _align_by_order(examples: Sequence[Example], entries: list[ContextEntry], path):
  if len(entries) > len(examples):
    raise DataFormatError(f"{where(path, entries[len(examples)].line)}: entry {len(examples) + 1} "
                          f"has no tweet; expected at most {len(examples)} entries, one per tweet")
  for example, entry in zip(examples, entries):
    if entry.key != example.words:
      raise DataFormatError(f"{where(path, entry.line)}: expected the words of the tweet at "
                            f"{example.source}, got {' '.join(entry.key)[:80]!r}")
  return [e.text for e in entries] + [None] * (len(examples) - len(entries))
