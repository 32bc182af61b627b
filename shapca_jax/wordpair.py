"""Word-pair grids for joint entity-relation extraction (MJERE): scoring and decoding (METHOD §1).

A grid is an int array [W, W] over the words of one sentence. Class 0 is "none", classes
1..E are the entity types and E+1..E+R the relations of a `GridVocab`; -1 marks ignored cells
(padding, the lower triangle). Only the upper triangle (i <= j) carries labels: every cell of
an entity span holds its type, and for each head word a and tail word p the cell
(min(a, p), max(a, p)) holds the relation.

Decoding reads entity spans off the diagonal (maximal runs of one entity id) and gives two
spans the majority class over their word-pair cells, a relation unless that majority is 0 or
an entity id (ties go to the lower class id, so a tie with 0 means no relation).

Because a cell sits at (min, max), the grid does not store which span is the head. The
decoder recovers it from the relation's type signature when that decides it (e.g. MNRE's
`/per/org/member_of`: the `per` span is the head); when both spans have the same type it uses
a per-relation convention: the earlier span is the head, unless the relation is listed in
`GridVocab.head_follows_tail` (see `later_head_relations`, which fits that list on training
data). `unrepresentable` lists the gold quintuples the format loses for this and other reasons.

Entities are `((start, end), type)` and quintuples `((h_start, h_end), h_type, (t_start,
t_end), t_type, relation)`, with end-exclusive word spans, as `metrics.jmere_f1` expects.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Span = tuple[int, int]
Entity = tuple[Span, str]
Quintuple = tuple[Span, str, Span, str, str]
Signatures = Mapping[str, frozenset[tuple[str, str]]]

IGNORE = -1
NONE = 0


@dataclasses.dataclass(frozen=True)
class GridVocab:
  """Class ids of a grid and the rules that orient its relations.

  Attributes:
    entity_types: the entity types, class ids 1..E in this order.
    relations: the relation names, class ids E+1..E+R in this order.
    signatures: relation name -> the (head type, tail type) pairs it admits.
    head_follows_tail: relations whose head is the later span when the types do not decide.
  """

  entity_types: tuple[str, ...]
  relations: tuple[str, ...]
  signatures: Signatures = dataclasses.field(default_factory=dict)
  head_follows_tail: frozenset[str] = frozenset()

  @property
  def num_classes(self) -> int:
    return 1 + len(self.entity_types) + len(self.relations)


class Decoded(NamedTuple):
  """What one grid says: its entities and quintuples, each sorted."""

  entities: list[Entity]
  quintuples: list[Quintuple]


class Unrepresentable(NamedTuple):
  """Gold items a grid cannot carry, by reason (each item under its first reason only)."""

  entities: dict[str, list[Entity]]
  quintuples: dict[str, list[Quintuple]]


def signatures_from_mnre_labels(labels: Iterable[str]) -> dict[str, frozenset[tuple[str, str]]]:
  """Type signatures from MNRE labels `/<head type>/<tail type>/<name>` (`None` is skipped).

  A name may carry several signatures: MNRE has `/per/per/alternate_names` and
  `/org/org/alternate_names`.
  """
  signatures = collections.defaultdict(set)
  for label in labels:
    if label == "None":
      continue
    parts = label.split("/")
    if len(parts) != 4 or parts[0] or not all(parts[1:]):
      raise ValueError(f"MNRE label {label!r} is not of the form /<head type>/<tail type>/<name>")
    signatures[parts[3]].add((parts[1], parts[2]))
  return {name: frozenset(pairs) for name, pairs in signatures.items()}


def _head_by_types(signatures: Signatures, earlier_type: str, later_type: str,
                   relation: str) -> bool | None:
  """Whether the earlier span is the head by type signature, or None when it cannot tell."""
  allowed = signatures.get(relation, frozenset())
  forward = (earlier_type, later_type) in allowed
  backward = (later_type, earlier_type) in allowed
  return forward if forward != backward else None


def head_is_earlier(vocab: GridVocab, earlier_type: str, later_type: str, relation: str) -> bool:
  """The decoder's orientation rule for a relation between two spans of the given types."""
  by_types = _head_by_types(vocab.signatures, earlier_type, later_type, relation)
  if by_types is not None:
    return by_types
  return relation not in vocab.head_follows_tail


def later_head_relations(quintuples: Iterable[Quintuple], signatures: Signatures) -> frozenset[str]:
  """Relations whose head is more often the later span when the types leave it open.

  Fit on the training split and pass as `GridVocab.head_follows_tail` (JMERE train gives
  `contain`: "Paris, France" puts the containing place second).
  """
  head_later = collections.Counter()
  undecided = collections.Counter()
  for head, head_type, tail, tail_type, relation in quintuples:
    if head[0] < tail[0]:
      earlier_type, later_type = head_type, tail_type
    else:
      earlier_type, later_type = tail_type, head_type
    if _head_by_types(signatures, earlier_type, later_type, relation) is None:
      undecided[relation] += 1
      head_later[relation] += head[0] > tail[0]
  return frozenset(r for r, n in undecided.items() if 2 * head_later[r] > n)


def _check_grid(grid: np.ndarray, vocab: GridVocab) -> None:
  if grid.ndim != 2 or grid.shape[0] != grid.shape[1]:
    raise ValueError(f"a word-pair grid must be square [W, W], got shape {grid.shape}")
  if grid.size and (grid.min() < IGNORE or grid.max() >= vocab.num_classes):
    raise ValueError(f"grid values must lie in [{IGNORE}, {vocab.num_classes - 1}] for "
                     f"{vocab.num_classes} classes, got [{grid.min()}, {grid.max()}]")


def decode_grid(grid: np.ndarray, vocab: GridVocab) -> Decoded:
  """Entities and quintuples of one grid (int [W, W], -1 for ignored cells)."""
  grid = np.asarray(grid)
  _check_grid(grid, vocab)
  num_entity_types = len(vocab.entity_types)
  diagonal = np.diagonal(grid)
  boundaries = np.flatnonzero(diagonal[1:] != diagonal[:-1]) + 1
  starts = np.concatenate([[0], boundaries])[: diagonal.size]
  ends = np.concatenate([boundaries, [diagonal.size]])[: diagonal.size]
  classes = diagonal[starts]
  keep = (classes > NONE) & (classes <= num_entity_types)
  starts, ends, classes = starts[keep], ends[keep], classes[keep]
  types = [vocab.entity_types[c - 1] for c in classes]
  spans = [(int(s), int(e)) for s, e in zip(starts, ends)]
  entities = sorted(zip(spans, types))

  # Class counts over the cells of every span pair (k earlier than l), without a pair loop.
  num_spans = len(spans)
  span_of_word = np.repeat(np.arange(num_spans), ends - starts)
  words = np.concatenate([np.arange(s, e) for s, e in spans]) if spans else np.zeros(0, int)
  block = grid[np.ix_(words, words)]
  cells = (span_of_word[:, None] < span_of_word[None, :]) & (block != IGNORE)
  pair = span_of_word[:, None] * num_spans + span_of_word[None, :]
  counts = np.bincount(pair[cells] * vocab.num_classes + block[cells],
                       minlength=num_spans * num_spans * vocab.num_classes)
  majority = counts.reshape(num_spans, num_spans, vocab.num_classes).argmax(-1)

  quintuples = []
  for k, l in zip(*np.nonzero(majority > num_entity_types)):
    relation = vocab.relations[majority[k, l] - num_entity_types - 1]
    if head_is_earlier(vocab, types[k], types[l], relation):
      quintuples.append((spans[k], types[k], spans[l], types[l], relation))
    else:
      quintuples.append((spans[l], types[l], spans[k], types[k], relation))
  return Decoded(entities, sorted(quintuples))


def decode_grids(grids: np.ndarray | Sequence[np.ndarray], vocab: GridVocab) -> list[Decoded]:
  """`decode_grid` over a batch [B, W, W] (e.g. the output of `predict_grid`)."""
  return [decode_grid(grid, vocab) for grid in np.asarray(grids)]


def _overlaps(a: Span, b: Span) -> bool:
  return a[0] < b[1] and b[0] < a[1]


def unrepresentable(entities: Iterable[Entity], quintuples: Iterable[Quintuple],
                    vocab: GridVocab) -> Unrepresentable:
  """The gold entities and quintuples of one sentence that a grid may not give back.

  Reasons, checked in this order:
    `overlapping_entities`: a span shares a word with another entity (the diagonal holds one
      class per word; which one survives depends on the encoder's write order), or a
      quintuple's head and tail share a word (their cells hold the entity type).
    `adjacent_same_type`: a span touches another entity of its type; their runs merge.
    `shared_pair`: two quintuples on the same pair of spans share its cells; one is lost.
    `direction`: same-type spans (or types the signature does not decide) whose head is not
      the one `head_is_earlier` picks.

  Args:
    entities: the sentence's entities; the quintuples' own entities are added.
    quintuples: its quintuples.
    vocab: the grid vocabulary (for the orientation rule).
  """
  quintuples = sorted(set(quintuples))
  all_entities = set(entities)
  for head, head_type, tail, tail_type, _ in quintuples:
    all_entities.update([(head, head_type), (tail, tail_type)])
  for (start, end), entity_type in all_entities:
    if not 0 <= start < end:
      raise ValueError(f"entity {((start, end), entity_type)} has an empty or negative span")

  entity_reasons = {}
  for entity in sorted(all_entities):
    others = all_entities - {entity}
    if any(_overlaps(entity[0], other[0]) for other in others):
      entity_reasons[entity] = "overlapping_entities"
    elif any(other[1] == entity[1] and (other[0][1] == entity[0][0] or entity[0][1] == other[0][0])
             for other in others):
      entity_reasons[entity] = "adjacent_same_type"

  pair_counts = collections.Counter(frozenset([q[0], q[2]]) for q in quintuples)
  lost_entities = collections.defaultdict(list)
  lost_quintuples = collections.defaultdict(list)
  for entity, reason in entity_reasons.items():
    lost_entities[reason].append(entity)
  for quintuple in quintuples:
    head, head_type, tail, tail_type, relation = quintuple
    reason = entity_reasons.get((head, head_type)) or entity_reasons.get((tail, tail_type))
    if reason is None and _overlaps(head, tail):
      reason = "overlapping_entities"
    if reason is None and pair_counts[frozenset([head, tail])] > 1:
      reason = "shared_pair"
    if reason is None:
      head_first = head[0] < tail[0]
      earlier_type, later_type = (head_type, tail_type) if head_first else (tail_type, head_type)
      if head_is_earlier(vocab, earlier_type, later_type, relation) != head_first:
        reason = "direction"
    if reason is not None:
      lost_quintuples[reason].append(quintuple)
  return Unrepresentable(dict(lost_entities), dict(lost_quintuples))


def valid_cells(num_words: jax.Array, max_words: int) -> jax.Array:
  """bool [B, W, W]: the upper-triangle cells (i <= j) inside each sentence of `num_words` [B]."""
  index = jnp.arange(max_words)
  upper = index[:, None] <= index[None, :]
  inside = index[None, None, :] < jnp.asarray(num_words)[:, None, None]
  return upper[None] & inside


@functools.partial(jax.jit, static_argnames="num_entity_types")
def predict_grid(logits: jax.Array, valid: jax.Array, num_entity_types: int) -> jax.Array:
  """Predicted grid int32 [..., W, W] from class logits [..., W, W, C].

  The argmax class on valid cells, -1 elsewhere. Diagonal cells may only be none or an
  entity type: a gold grid never has a relation there (a word is not related to itself).
  """
  num_words, num_classes = logits.shape[-2], logits.shape[-1]
  relation_on_diagonal = (jnp.eye(num_words, dtype=bool)[:, :, None]
                          & (jnp.arange(num_classes) > num_entity_types))
  scores = jnp.where(relation_on_diagonal, -jnp.inf, logits)
  return jnp.where(valid, jnp.argmax(scores, axis=-1).astype(jnp.int32), IGNORE)
