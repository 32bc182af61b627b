"""Readers for the raw files of Twitter-2015/2017 (CoNLL), MNRE (dict literals) and JMERE (JSON).

Every reader validates as it goes: a malformed line, an unknown label or a span outside its
sentence raises `DataFormatError` naming the file, the line (JMERE: the item of the JSON list)
and what was expected. Nothing is skipped.
"""

import ast
import dataclasses
import json
import os
import pathlib
from collections.abc import Callable, Sequence

from shapca_jax.data import labels
from shapca_jax.data.errors import (DataFormatError, blocks, check_json_nesting, check_python_line,
                                    read_lines, where)
from shapca_jax.data.labels import Quintuple, Span

DATASETS = ("twitter2015", "twitter2017", "mnre", "jmere")
SPLITS = ("train", "valid", "test")
TASKS = {"twitter2015": "mner", "twitter2017": "mner", "mnre": "mre", "jmere": "jmere"}

# How each data set spells its split files (and the split part of its context file names).
SPLIT_NAMES = {
    "twitter2015": {"train": "train", "valid": "valid", "test": "test"},
    "twitter2017": {"train": "train", "valid": "valid", "test": "test"},
    "mnre": {"train": "train", "valid": "val", "test": "test"},
    "jmere": {"train": "train", "valid": "val", "test": "test"},
}
_FILE_PATTERNS = {
    "twitter2015": "twitter2015/{split}.txt",
    "twitter2017": "twitter2017/{split}.txt",
    "mnre": "mnre/ours_{split}.txt",
    "jmere": "jmere/{split}.json",
}
MNRE_REL2ID_FILE = "mnre/ours_rel2id.json"


@dataclasses.dataclass(frozen=True)
class Example:
  """One raw, tokenizer-independent example of any of the three tasks.

  Attributes:
    image_id: the image file name as the data set spells it (Twitter: `<IMGID>.jpg`).
    words: the sentence.
    source: `file:line` (JMERE: `file:item`) the example was read from, for error messages.
    tags: MNER BIO tags, one per word (`OTHER` already normalised to `MISC`).
    head, tail: MRE entity spans; their labels are the entity types of the relation prefix
      (empty for `None`).
    relation: MRE relation, one of `labels.MNRE_RELATIONS`.
    quintuples: JMERE relations with typed head and tail spans.
    context: the image-derived text joined from a context source; None when absent.
    image_path: path of the image file when one was found, else empty.
  """
  image_id: str
  words: tuple[str, ...]
  source: str
  tags: tuple[str, ...] = ()
  head: Span | None = None
  tail: Span | None = None
  relation: str | None = None
  quintuples: tuple[Quintuple, ...] = ()
  context: str | None = None
  image_path: str = ""

  @property
  def entities(self) -> tuple[Span, ...]:
    """The distinct entity spans: BIO chunks (MNER), head and tail (MRE), quintuple ends (JMERE)."""
    if self.tags:
      return tuple(labels.bio_spans(self.tags))
    if self.head is not None:
      return (self.head, self.tail)
    return tuple(dict.fromkeys(s for q in self.quintuples for s in (q.head, q.tail)))


def split_path(dataset: str, split: str, data_dir: os.PathLike | str) -> pathlib.Path:
  """The raw file of one split, e.g. `mnre/ours_val.txt` for (`mnre`, `valid`)."""
  _check_choice("dataset", dataset, DATASETS)
  _check_choice("split", split, SPLITS)
  return pathlib.Path(data_dir) / _FILE_PATTERNS[dataset].format(split=SPLIT_NAMES[dataset][split])


def read_split(dataset: str, split: str, data_dir: os.PathLike | str) -> list[Example]:
  """Reads one split of one data set, validating every line.

  Args:
    dataset: `twitter2015`, `twitter2017`, `mnre` or `jmere`.
    split: `train`, `valid` or `test` (mapped to each data set's file names).
    data_dir: the folder holding one sub-folder per data set (`data/` or the shared copy).

  Raises:
    DataFormatError: the file is missing, unreadable, malformed or holds no example.
  """
  path = split_path(dataset, split, data_dir)
  if dataset == "mnre":
    check_rel2id(pathlib.Path(data_dir) / MNRE_REL2ID_FILE)
  examples = _READERS[dataset](path)
  if not examples:
    raise DataFormatError(f"{path}: no examples in the {split} split; expected at least one")
  return examples


def available_splits(dataset: str, data_dir: os.PathLike | str) -> tuple[str, ...]:
  """The splits whose file exists (Twitter-2015 ships without its test split)."""
  return tuple(s for s in SPLITS if split_path(dataset, s, data_dir).is_file())


def _check_choice(kind: str, value: str, choices: Sequence[str]) -> None:
  if value not in choices:
    raise ValueError(f"unknown {kind} {value!r}; expected one of {', '.join(choices)}")


def read_conll(path: os.PathLike | str) -> list[Example]:
  """Twitter CoNLL: `IMGID:<id>`, then `token<TAB>tag` lines, a blank line between tweets."""
  lines = read_lines(path)
  return [_conll_tweet(path, lines, start, end) for start, end in blocks(lines)]


def _conll_tweet(path, lines: list[str], start: int, end: int) -> Example:
  header = lines[start]
  if not header.startswith("IMGID:") or not header[len("IMGID:"):].strip():
    raise DataFormatError(f"{where(path, start + 1)}: expected 'IMGID:<image id>' opening a tweet, "
                          f"got {header!r}")
  if end == start + 1:
    raise DataFormatError(f"{where(path, start + 1)}: expected token lines after {header!r}")
  words, tags = [], []
  for i in range(start + 1, end):
    fields = lines[i].split("\t")
    if len(fields) != 2 or not fields[0]:
      raise DataFormatError(f"{where(path, i + 1)}: expected 'token<TAB>tag', got {lines[i]!r}")
    words.append(fields[0])
    tags.append(_mner_tag(fields[1], path, i + 1))
  image_id = header[len("IMGID:"):].strip() + ".jpg"
  return Example(image_id=image_id, words=tuple(words), tags=tuple(tags),
                 source=where(path, start + 1))


def _mner_tag(tag: str, path, line: int) -> str:
  prefix, dash, kind = tag.partition("-")
  normalised = f"{prefix}-{labels.MNER_TYPE_ALIASES.get(kind, kind)}" if dash else tag
  if normalised not in labels.MNER_LABEL_IDS:
    raise DataFormatError(
        f"{where(path, line)}: unknown tag {tag!r}; expected one of {', '.join(labels.MNER_LABELS)}"
        " (or B-/I-OTHER)")
  return normalised


def read_mnre(path: os.PathLike | str) -> list[Example]:
  """MNRE: one Python dict literal per line, `{'token', 'h', 't', 'img_id', 'relation'}`."""
  examples = []
  for i, line in enumerate(read_lines(path)):
    loc = where(path, i + 1)
    check_python_line(line, loc)
    try:
      record = ast.literal_eval(line)
    except (ValueError, SyntaxError, RecursionError, MemoryError) as err:  # see check_python_line
      raise DataFormatError(f"{loc}: expected a Python dict literal, got {line[:80]!r}") from err
    words = _words(record, "token", loc)
    relation = _field(record, "relation", str, loc)
    if relation not in labels.MNRE_RELATION_IDS:
      raise DataFormatError(f"{loc}: unknown relation {relation!r}; expected one of "
                            f"{', '.join(labels.MNRE_RELATIONS)}")
    head_type, tail_type = relation.split("/")[1:3] if relation != "None" else ("", "")
    examples.append(Example(
        image_id=_field(record, "img_id", str, loc), words=words, relation=relation,
        head=_span(_field(record, "h", dict, loc), head_type, words, f"{loc}: 'h'"),
        tail=_span(_field(record, "t", dict, loc), tail_type, words, f"{loc}: 't'"),
        source=loc))
  return examples


def check_rel2id(path: pathlib.Path) -> None:
  """A data set's own `rel2id` file, when present, must agree with `labels.MNRE_RELATIONS`."""
  if not path.is_file():
    return
  rel2id = json.loads("\n".join(read_lines(path)))
  expected = {name: i for i, name in enumerate(labels.MNRE_RELATIONS)}
  if rel2id != expected:
    raise DataFormatError(f"{path}: expected the 23 MNRE relations in the order of "
                          f"labels.MNRE_RELATIONS, got {rel2id}")


def read_jmere(path: os.PathLike | str) -> list[Example]:
  """JMERE: a JSON list of `{'token', 'img_id', 'label_list'}`, `label_list` a list of lists of
  `{'beg_ent': {name, pos, tags}, 'sec_ent': {...}, 'relation'}`."""
  text = "\n".join(read_lines(path))
  check_json_nesting(text, path)
  try:
    items = json.loads(text)
  except json.JSONDecodeError as err:
    raise DataFormatError(f"{where(path, err.lineno)}: expected JSON ({err.msg}, "
                          f"column {err.colno})") from err
  if not isinstance(items, list):
    raise DataFormatError(f"{path}: expected a JSON list of samples, got {type(items).__name__}")
  return [_jmere_sample(item, f"{path}:item {i}") for i, item in enumerate(items)]


def _jmere_sample(item, loc: str) -> Example:
  if not isinstance(item, dict):
    raise DataFormatError(f"{loc}: expected a JSON object, got {type(item).__name__}")
  words = _words(item, "token", loc)
  groups = _field(item, "label_list", list, loc)
  quintuples = []
  for g, group in enumerate(groups):
    if not isinstance(group, list):
      raise DataFormatError(f"{loc}: label_list[{g}]: expected a list of relations")
    for r, relation in enumerate(group):
      rloc = f"{loc}: label_list[{g}][{r}]"
      if not isinstance(relation, dict):
        raise DataFormatError(f"{rloc}: expected a relation object, got {relation!r}")
      name = _field(relation, "relation", str, rloc)
      if name not in labels.JMERE_RELATIONS:
        raise DataFormatError(f"{rloc}: unknown relation {name!r}; expected one of "
                              f"{', '.join(labels.JMERE_RELATIONS)}")
      head, tail = (_jmere_entity(_field(relation, key, dict, rloc), words, f"{rloc}.{key}")
                    for key in ("beg_ent", "sec_ent"))
      quintuples.append(Quintuple(head, tail, name))
  return Example(image_id=_field(item, "img_id", str, loc), words=words,
                 quintuples=tuple(quintuples), source=loc)


def _jmere_entity(entity: dict, words: tuple[str, ...], loc: str) -> Span:
  kind = _field(entity, "tags", str, loc)
  if kind not in labels.ENTITY_TYPES:
    raise DataFormatError(f"{loc}: unknown entity type {kind!r}; expected one of "
                          f"{', '.join(labels.ENTITY_TYPES)}")
  return _span(entity, kind, words, loc)


def _field(record, key: str, kind: type, loc: str):
  if not isinstance(record, dict) or key not in record:
    raise DataFormatError(f"{loc}: expected a field {key!r}")
  value = record[key]
  if not isinstance(value, kind):
    raise DataFormatError(f"{loc}: expected {key!r} to be a {kind.__name__}, got {value!r}")
  return value


def _words(record, key: str, loc: str) -> tuple[str, ...]:
  words = _field(record, key, list, loc)
  if not words or not all(isinstance(w, str) and w for w in words):
    raise DataFormatError(f"{loc}: expected {key!r} to be a non-empty list of non-empty strings")
  return tuple(words)


def _span(entity: dict, label: str, words: tuple[str, ...], loc: str) -> Span:
  """`{'name', 'pos': [start, end)}` checked against the sentence."""
  pos = _field(entity, "pos", list, loc)
  if len(pos) != 2 or not all(isinstance(p, int) for p in pos):
    raise DataFormatError(f"{loc}: expected 'pos' to be [start, end), got {pos!r}")
  start, end = pos
  if not 0 <= start < end <= len(words):
    raise DataFormatError(f"{loc}: span {pos} is outside the sentence of {len(words)} words; "
                          f"expected 0 <= start < end <= {len(words)}")
  name = _field(entity, "name", str, loc)
  if " ".join(words[start:end]) != name:
    raise DataFormatError(f"{loc}: span {pos} covers {' '.join(words[start:end])!r}, expected the "
                          f"entity name {name!r}")
  return Span(start, end, label)


_READERS: dict[str, Callable[[pathlib.Path], list[Example]]] = {
    "twitter2015": read_conll,
    "twitter2017": read_conll,
    "mnre": read_mnre,
    "jmere": read_jmere,
}
