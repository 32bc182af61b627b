"""Evaluation metrics for the three Shap-CA tasks (METHOD §1), on the host in numpy/Python.

- MNER: entity-level micro precision / recall / F1 and a per-type report over BIO word tags,
  with the entities of `data.labels.bio_spans`: equal to seqeval's default (conlleval) mode,
  where `B-x` always starts an entity, an `I-x` that does not continue an entity of type x (a
  "stray" I-) starts one, and an entity ends at `O`, at `B-`, at a type change and at the end
  of the sentence. seqeval itself is only the tests' oracle.
- MRE: micro P/R/F1 over the non-`None` labels; a `None` prediction or gold label counts only
  as a miss or a false alarm (scikit-learn's `f1_score(labels=non_none, average="micro")`).
- MJERE: exact-match P/R/F1 over per-example sets of tuples (quintuples, entities).

Every function returns a plain dict of Python floats and ints, ready for JSON.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any

from shapca_jax.data import labels

Scores = dict[str, Any]


def prf(num_correct: int, num_pred: int, num_gold: int) -> Scores:
  """Precision, recall and F1 from counts; a ratio with a zero denominator is 0."""
  precision = num_correct / num_pred if num_pred else 0.0
  recall = num_correct / num_gold if num_gold else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return {
      "precision": float(precision),
      "recall": float(recall),
      "f1": float(f1),
      "num_correct": int(num_correct),
      "num_pred": int(num_pred),
      "num_gold": int(num_gold),
  }


def set_f1(
    gold: Sequence[Iterable[Hashable]],
    pred: Sequence[Iterable[Hashable]],
    type_of: Callable[[Any], str] | None = None,
) -> Scores:
  """Micro P/R/F1 of exact matches between per-example sets of items.

  Args:
    gold: one iterable of hashable items (e.g. quintuples) per example; duplicates within an
      example count once.
    pred: the predicted items, aligned with `gold`.
    type_of: if given, maps an item to its type and adds a `per_type` report over every type
      seen in gold or predictions (as seqeval's classification report does).

  Returns:
    `precision`, `recall`, `f1`, `num_correct`, `num_pred`, `num_gold`, and `per_type`
    (type -> the same keys) when `type_of` is given.
  """
  if len(gold) != len(pred):
    raise ValueError(f"gold has {len(gold)} examples but pred has {len(pred)}")
  counts = collections.defaultdict(lambda: [0, 0, 0])  # type -> [correct, pred, gold]
  total = [0, 0, 0]
  for gold_items, pred_items in zip(gold, pred):
    gold_set, pred_set = set(gold_items), set(pred_items)
    for column, items in ((0, gold_set & pred_set), (1, pred_set), (2, gold_set)):
      total[column] += len(items)
      if type_of is not None:
        for item in items:
          counts[type_of(item)][column] += 1
  scores = prf(*total)
  if type_of is not None:
    scores["per_type"] = {t: prf(*counts[t]) for t in sorted(counts)}
  return scores


def entity_f1(gold_tags: Sequence[Sequence[str]], pred_tags: Sequence[Sequence[str]]) -> Scores:
  """Entity-level micro P/R/F1 and per-type report over BIO-tagged sentences (MNER).

  Equal to seqeval's `precision_score`, `recall_score`, `f1_score` and `classification_report`
  in the default mode; entities never cross sentence boundaries.

  Args:
    gold_tags: one list of BIO tags per sentence.
    pred_tags: the predicted tags, the same number of words per sentence.

  Returns:
    See `set_f1`; `per_type` is always present and `num_gold` is seqeval's support.
  """
  if len(gold_tags) != len(pred_tags):
    raise ValueError(f"gold has {len(gold_tags)} sentences but pred has {len(pred_tags)}")
  for n, (gold, pred) in enumerate(zip(gold_tags, pred_tags)):
    if len(gold) != len(pred):
      raise ValueError(f"sentence {n}: {len(gold)} gold tags but {len(pred)} predicted tags")
  gold_spans = [labels.bio_spans(tags, f"gold sentence {n}") for n, tags in enumerate(gold_tags)]
  pred_spans = [labels.bio_spans(tags, f"predicted sentence {n}")
                for n, tags in enumerate(pred_tags)]
  return set_f1(gold_spans, pred_spans, type_of=lambda span: span.label)


def relation_f1(
    gold: Sequence[Hashable], pred: Sequence[Hashable], negative_label: Hashable = "None"
) -> Scores:
  """Micro P/R/F1 of relation classification over the labels other than `negative_label` (MRE).

  A prediction is correct when it equals the gold label and is not negative; a negative
  prediction of a positive gold label is only a miss, a positive prediction of a negative
  gold label only a false alarm.

  Args:
    gold: one label (name or id) per instance.
    pred: the predicted labels, aligned with `gold`.
    negative_label: the "no relation" label (`"None"` for names, usually 0 for ids).
  """
  if len(gold) != len(pred):
    raise ValueError(f"gold has {len(gold)} instances but pred has {len(pred)}")
  num_correct = sum(g == p and g != negative_label for g, p in zip(gold, pred))
  num_pred = sum(p != negative_label for p in pred)
  num_gold = sum(g != negative_label for g in gold)
  return prf(num_correct, num_pred, num_gold)


def jmere_f1(
    gold_entities: Sequence[Iterable[Hashable]],
    pred_entities: Sequence[Iterable[Hashable]],
    gold_quintuples: Sequence[Iterable[Hashable]],
    pred_quintuples: Sequence[Iterable[Hashable]],
) -> dict[str, Scores]:
  """Exact-match quintuple and entity scores for joint entity-relation extraction (MJERE).

  Args:
    gold_entities: per example, entities `((start, end), type)`.
    pred_entities: the predicted entities, aligned with `gold_entities`.
    gold_quintuples: per example, `((h_start, h_end), h_type, (t_start, t_end), t_type,
      relation)` with end-exclusive word spans.
    pred_quintuples: the predicted quintuples.

  Returns:
    `{"quintuple": scores, "entity": scores with per_type}` (see `set_f1`).
  """
  return {
      "quintuple": set_f1(gold_quintuples, pred_quintuples),
      "entity": set_f1(gold_entities, pred_entities, type_of=lambda entity: entity[1]),
  }
