"""TFDS builders for Twitter-2015, Twitter-2017, MNRE and JMERE (array_record, no TensorFlow).

The raw folders are read from `manual_dir` (the folder holding `twitter2017/`, `mnre/`, ...).
Records store tokenizer-independent raw fields only: words, labels, spans, the context of one
context source (the builder config) and the image id and path; tokenisation happens later, in
the grain pipeline. Records keep the order of the raw files (`disable_shuffling`), so a record's
index is the example's index in its split. Everything here runs without TensorFlow: datasets
are written as array_record and read back with `tfds.data_source`.
"""

import dataclasses
import hashlib
import os
import pathlib
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

from shapca_jax.data import contexts, labels, readers
from shapca_jax.data.labels import Quintuple, Span
from shapca_jax.data.readers import Example

_MANUAL = """Point `manual_dir` at the folder holding the raw data set folders, laid out as in
`data/README.md`: `twitter2017/{train,valid,test}.txt` and `twitter2017/contexts/`,
`mnre/ours_{train,val,test}.txt` and `mnre/contexts/`, `jmere/{train,val,test}.json`.
Images are optional: `<dataset>/images/<split>/<image id>` or `<dataset>/images/<image id>`
(JMERE uses MNRE's)."""

_CITATION = """@inproceedings{luo2024shapca,
  title={Shapley Value-based Contrastive Alignment for Multimodal Information Extraction},
  author={Luo, Wen and Xia, Yu and Shen, Tianshu and Li, Sujian},
  booktitle={ACM Multimedia}, year={2024}}"""


@dataclasses.dataclass
class ContextConfig(tfds.core.BuilderConfig):
  """Which context source the records carry (None: none) and what a missing context does."""
  context_source: str | None = None
  missing_context: str = "error"


def context_config(dataset: str, context_source: str | None,
                   missing_context: str = "error") -> ContextConfig | str:
  """The builder config for a context source: a built-in config's name, or a custom config for a
  JSONL path or for `missing_context="empty"` (named `<source>-missing_empty`).

  A JSONL config is named after the file and a fingerprint of its content
  (`jsonl-<stem>-<sha256 prefix>`): records prepared from an earlier version of the file, or
  from another file of the same name, are never read back in its place.
  """
  if missing_context not in contexts.MISSING_CONTEXT:
    raise ValueError(f"missing_context={missing_context!r}; expected one of "
                     f"{contexts.MISSING_CONTEXT}")
  builtin = context_source is None or context_source in contexts.builtin_sources(dataset)
  name = "none" if context_source is None else context_source
  if builtin and missing_context == "error":
    return name
  if not builtin:
    source = contexts.resolve_source(dataset, context_source)
    name = "jsonl-" + pathlib.Path(context_source).stem.replace("{split}", "split")
    name += "-" + _fingerprint(sorted({source.path("/", split) for split in readers.SPLITS}))
  if missing_context == "empty":
    name += "-missing_empty"
  return ContextConfig(name=name, context_source=context_source, missing_context=missing_context,
                       description=f"{context_source} contexts, missing ones {missing_context}")


def _fingerprint(paths: Sequence[pathlib.Path]) -> str:
  """A short hash of the files' names and bytes (a missing file counts as empty: the build
  itself then reports it with its path)."""
  digest = hashlib.sha256()
  for path in paths:
    digest.update(str(path).encode() + b"\0")
    if path.is_file():
      digest.update(path.read_bytes())
  return digest.hexdigest()[:12]


def _features(task: str) -> tfds.features.FeaturesDict:
  span = {"start": np.int32, "end": np.int32, "label": tfds.features.Text()}
  task_features = {
      "mner": {"tags": tfds.features.Sequence(tfds.features.ClassLabel(names=labels.MNER_LABELS))},
      "mre": {"head": span, "tail": span,
              "relation": tfds.features.ClassLabel(names=labels.MNRE_RELATIONS)},
      "jmere": {"quintuples": tfds.features.Sequence({
          "head": {"start": np.int32, "end": np.int32,
                   "label": tfds.features.ClassLabel(names=labels.ENTITY_TYPES)},
          "tail": {"start": np.int32, "end": np.int32,
                   "label": tfds.features.ClassLabel(names=labels.ENTITY_TYPES)},
          "relation": tfds.features.ClassLabel(names=labels.JMERE_RELATIONS)})},
  }[task]
  return tfds.features.FeaturesDict({
      "index": np.int32,
      "source": tfds.features.Text(),
      "image_id": tfds.features.Text(),
      "image_path": tfds.features.Text(),
      "words": tfds.features.Sequence(tfds.features.Text()),
      "context": tfds.features.Text(),
      "has_context": np.bool_,
      **task_features,
  })


def to_record(example: Example, index: int) -> dict:
  """An example as a record of the builder's features."""
  record = {"index": index, "source": example.source, "image_id": example.image_id,
            "image_path": example.image_path, "words": list(example.words),
            "context": example.context or "", "has_context": example.context is not None}
  if example.tags:
    record["tags"] = list(example.tags)
  elif example.head is not None:
    record |= {"head": example.head._asdict(), "tail": example.tail._asdict(),
               "relation": example.relation}
  else:
    record["quintuples"] = [{"head": q.head._asdict(), "tail": q.tail._asdict(),
                             "relation": q.relation} for q in example.quintuples]
  return record


def from_record(record: dict, task: str) -> Example:
  """A record read back by `tfds.data_source` as an example (class labels -> names)."""
  fields = {}
  if task == "mner":
    fields["tags"] = tuple(labels.MNER_LABELS[t] for t in record["tags"])
  elif task == "mre":
    fields["head"], fields["tail"] = (
        Span(int(record[k]["start"]), int(record[k]["end"]), _text(record[k]["label"]))
        for k in ("head", "tail"))
    fields["relation"] = labels.MNRE_RELATIONS[record["relation"]]
  else:
    q = record["quintuples"]
    spans = {k: [Span(int(s), int(e), labels.ENTITY_TYPES[t])
                 for s, e, t in zip(q[k]["start"], q[k]["end"], q[k]["label"])]
             for k in ("head", "tail")}
    fields["quintuples"] = tuple(Quintuple(h, t, labels.JMERE_RELATIONS[r])
                                 for h, t, r in zip(spans["head"], spans["tail"], q["relation"]))
  return Example(image_id=_text(record["image_id"]), words=tuple(_text(w) for w in record["words"]),
                 source=_text(record["source"]), image_path=_text(record["image_path"]),
                 context=_text(record["context"]) if record["has_context"] else None, **fields)


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class ExampleSource(Sequence):
  """A TFDS data source seen as a sequence of `Example`s (decoded on access)."""

  def __init__(self, data_source, task: str):
    self.data_source = data_source
    self.task = task

  def __len__(self) -> int:
    return len(self.data_source)

  def __getitem__(self, index: int) -> Example:
    if not -len(self) <= index < len(self):
      raise IndexError(index)
    return from_record(self.data_source[index % len(self)], self.task)


def find_image(root: pathlib.Path, dataset: str, split: str, image_id: str) -> str:
  """The image file of an example under the raw folder, or "" when there is none."""
  owner = "mnre" if dataset == "jmere" else dataset
  folder = root / owner / "images"
  for path in (folder / readers.SPLIT_NAMES[owner][split] / image_id, folder / image_id):
    if path.is_file():
      return str(path)
  return ""


class _RawDataBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared logic of the four builders; subclasses name their data set."""
  DATASET: ClassVar[str]
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Raw words, labels, spans, one context source, image id and path."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=f"{self.DATASET} for Shap-CA (raw, tokenizer-independent)",
        features=_features(readers.TASKS[self.DATASET]), disable_shuffling=True,
        citation=_CITATION)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = pathlib.Path(dl_manager.manual_dir)
    splits = readers.available_splits(self.DATASET, root)
    if not splits:
      raise FileNotFoundError(f"{root}: no split file of {self.DATASET} found, e.g. "
                              f"{readers.split_path(self.DATASET, 'train', root)}")
    return {split: self._generate_examples(root, split) for split in splits}

  def _generate_examples(self, root: pathlib.Path, split: str):
    examples = readers.read_split(self.DATASET, split, root)
    config = self.builder_config
    if config.context_source is not None:
      examples, _ = contexts.attach_contexts(examples, self.DATASET, split, root,
                                             config.context_source,
                                             missing_context=config.missing_context)
    for index, example in enumerate(examples):
      image_path = find_image(root, self.DATASET, split, example.image_id)
      yield index, to_record(dataclasses.replace(example, image_path=image_path), index)


def _configs(sources: Sequence[str]) -> list[ContextConfig]:
  return ([ContextConfig(name=s, context_source=s, description=f"{s} contexts") for s in sources]
          + [ContextConfig(name="none", description="no contexts")])


class Twitter2015(_RawDataBuilder):
  """Twitter-2015 multimodal NER (`OTHER` read as `MISC`)."""
  DATASET = "twitter2015"
  BUILDER_CONFIGS = _configs(contexts.TWITTER_SOURCES)


class Twitter2017(_RawDataBuilder):
  """Twitter-2017 multimodal NER."""
  DATASET = "twitter2017"
  BUILDER_CONFIGS = _configs(contexts.TWITTER_SOURCES)


class Mnre(_RawDataBuilder):
  """MNRE v2 multimodal relation extraction."""
  DATASET = "mnre"
  BUILDER_CONFIGS = _configs(contexts.MNRE_SOURCES)


class Jmere(_RawDataBuilder):
  """JMERE joint multimodal entity-relation extraction (MNRE's images and contexts)."""
  DATASET = "jmere"
  BUILDER_CONFIGS = _configs(contexts.MNRE_SOURCES)


BUILDERS = {b.DATASET: b for b in (Twitter2015, Twitter2017, Mnre, Jmere)}


def prepare(dataset: str, raw_dir: os.PathLike | str, build_dir: os.PathLike | str,
            context_source: str | None, *, missing_context: str = "error"):
  """Builds (once) the array_record dataset of `dataset` under `build_dir`; returns the builder."""
  if dataset not in BUILDERS:
    raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(BUILDERS)}")
  builder = BUILDERS[dataset](data_dir=str(build_dir), file_format="array_record",
                              config=context_config(dataset, context_source, missing_context))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(raw_dir)))
  return builder


def load_split(dataset: str, split: str, build_dir: os.PathLike | str, context_source: str | None,
               *, missing_context: str = "error") -> ExampleSource:
  """A prepared split read back with `tfds.data_source`, as a sequence of examples."""
  config = context_config(dataset, context_source, missing_context)
  name = f"{dataset}/{config if isinstance(config, str) else config.name}"
  source = tfds.data_source(name, split=split, data_dir=str(build_dir))
  return ExampleSource(source, readers.TASKS[dataset])
