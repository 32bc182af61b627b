"""Statistics of a data set copy: what `python -m shapca_jax.data inspect` prints.

Per split: examples, entities (MNER: BIO chunks counted the seqeval way), relation instances or
quintuples, label counts, JMERE grid conflicts, context coverage per source, and word-piece
length percentiles of the text, the context and the joint `[CLS] text [SEP] context [SEP]`.
"""

import collections
import os
import pathlib
from collections.abc import Sequence

import numpy as np

from shapca_jax.data import contexts, readers, tokenization
from shapca_jax.data.readers import Example

PERCENTILES = (50, 90, 95, 99, 100)


def available_sources(dataset: str, data_dir: os.PathLike | str) -> list[str]:
  """Built-in context sources whose files exist for every available split."""
  splits = readers.available_splits(dataset, data_dir)
  return [name for name in contexts.builtin_sources(dataset)
          if all(contexts.resolve_source(dataset, name).path(data_dir, s).is_file()
                 for s in splits)]


def percentiles(values: Sequence[int]) -> dict[str, float]:
  """`p50 ... p99` and `max` of a list of lengths."""
  if not len(values):
    return {}
  points = np.percentile(np.asarray(values), PERCENTILES)
  return {("max" if p == 100 else f"p{p}"): round(float(v), 1) for p, v in zip(PERCENTILES, points)}


def label_counts(examples: Sequence[Example], task: str) -> dict[str, dict[str, int]]:
  """MNER: tags and entity types; MRE: relations; JMERE: relations and entity types."""
  if task == "mner":
    return {"tags": _count(t for e in examples for t in e.tags),
            "entity_types": _count(s.label for e in examples for s in e.entities)}
  if task == "mre":
    return {"relations": _count(e.relation for e in examples)}
  return {"relations": _count(q.relation for e in examples for q in e.quintuples),
          "entity_types": _count(s.label for e in examples for s in e.entities)}


def _count(items) -> dict[str, int]:
  return dict(sorted(collections.Counter(items).items()))


def split_summary(examples: Sequence[Example], task: str) -> dict:
  """Tokenizer- and context-independent counts of one split."""
  summary = {
      "examples": len(examples),
      "images": len({contexts.image_key(e.image_id) for e in examples}),
      "words": sum(len(e.words) for e in examples),
      "entities": sum(len(e.entities) for e in examples),
  }
  if task == "mre":
    summary["relation_instances"] = len(examples)
    summary["relation_instances_not_none"] = sum(1 for e in examples if e.relation != "None")
  if task == "jmere":
    summary["quintuples"] = sum(len(e.quintuples) for e in examples)
    conflicts = [tokenization.example_grid(e).conflicts for e in examples]
    summary["grid_conflict_cells"] = sum(conflicts)
    summary["grid_conflict_examples"] = sum(1 for c in conflicts if c)
  summary["labels"] = label_counts(examples, task)
  return summary


def summarize(dataset: str, data_dir: os.PathLike | str, *, sources: Sequence[str] | None = None,
              tokenizer_dir: os.PathLike | str | None = None,
              missing_context: str = "empty") -> dict:
  """Everything `inspect` prints, as one JSON-ready dict.

  Args:
    dataset: `twitter2015`, `twitter2017`, `mnre` or `jmere`.
    data_dir: the folder holding the data set folders.
    sources: context sources to join (names or JSONL paths); default every built-in source
      present in `data_dir`.
    tokenizer_dir: checkpoint folder of the tokenizer (default: the installed all-MiniLM-L6-v2).
    missing_context: `empty` (default here: missing contexts are counted and reported) or
      `error`.
  """
  sources = available_sources(dataset, data_dir) if sources is None else list(sources)
  tokenizer_dir = pathlib.Path(tokenizer_dir or tokenization.default_tokenizer_dir())
  task = readers.TASKS[dataset]
  encoder = tokenization.Encoder(tokenizer_dir, task)
  out = {"dataset": dataset, "task": task, "data_dir": str(data_dir),
         "tokenizer": str(tokenizer_dir), "context_sources": sources, "splits": {}}
  for split in readers.available_splits(dataset, data_dir):
    examples = readers.read_split(dataset, split, data_dir)
    summary = split_summary(examples, task)
    text_pieces = encoder.pieces(examples)
    summary["text_tokens"] = percentiles([len(p.text_ids) for p in text_pieces])
    summary["contexts"] = {}
    for source in sources:
      joined, report = contexts.attach_contexts(examples, dataset, split, data_dir, source,
                                                missing_context=missing_context)
      pieces = encoder.pieces(joined)
      summary["contexts"][source] = report.as_dict() | {
          "context_tokens": percentiles([len(p.context_ids) for p in pieces]),
          "joint_tokens": percentiles([encoder.length(p) for p in pieces]),
      }
    out["splits"][split] = summary
  return out
