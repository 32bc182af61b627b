"""Grain pipeline: raw examples -> fixed-shape, length-bucketed batches of numpy arrays.

Batches are planned once per epoch from the seed alone: shuffle the examples, group them by
length bucket, cut each group into global batches of `batch_size * shard_count` rows, shuffle
the batch order. Every process computes the same plan and keeps its own `batch_size` rows of
each global batch, so all processes see the same bucket (shape) at every step. Each example
always lands in the same bucket, so it is tokenised and laid out once, when the pipeline is
built; a batch is then one gather per field (and its images, loaded in the grain map). The
iterator's `get_state`/`set_state` resume a killed run at the same batch of the same order.

Batch fields (B rows, L tokens, W words of the batch's bucket): see `tokenization.Encoder.row`
plus `image_group` (same value <=> same image), `example_index` (index into `examples`, -1 on
padding rows), `valid` (False on padding rows) and, with an image loader, `pixel_values`.
"""

import dataclasses
import functools
import logging
import os
import pathlib
from collections.abc import Callable, Iterator, Sequence

import grain
import numpy as np

from shapca_jax.data import tokenization
from shapca_jax.data.contexts import image_key
from shapca_jax.data.readers import Example
from shapca_jax.data.tokenization import Bucket, Encoder


@dataclasses.dataclass
class PipelineReport:
  """What the layout does to the data; counted before the first batch, from the pieces."""
  examples: int
  batches_per_epoch: int
  examples_per_bucket: dict[str, int]
  missing_context: int
  context_truncated: int
  text_truncated: int
  grid_conflicts: int
  # Share of the token positions of an epoch's batches (epoch 0 when batches are dropped) that
  # are padding: padding rows and the positions after each input.
  padded_token_fraction: float = 0.0

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


class BatchPipeline:
  """Length-bucketed batches of one split.

  Args:
    examples: raw examples with contexts attached (a list, or `builders.ExampleSource` over a
      TFDS data source); any random-access sequence.
    encoder: tokenizer, task and text/context layout.
    batch_size: rows per batch on this process.
    buckets: padded shapes, smallest first; an example goes to the smallest that holds it whole,
      or is truncated (context first) into the largest.
    shuffle: shuffle examples and batch order each epoch (training); off, batches come bucket
      by bucket in example order (evaluation).
    seed: fixes the order of every epoch.
    num_epochs: passes over the data; None repeats forever.
    drop_remainder: drop each bucket's last incomplete global batch (training); otherwise it is
      padded with rows whose `valid` is False.
    shard_index, shard_count: this process's share of every global batch.
    image_loader: path -> float32 [H, W, 3] array; adds `pixel_values` to the batches.
    image_dir: folder of the images (file name = image id); without it each example's
      `image_path` is used.
    num_threads, prefetch: grain read options (threads preparing batches, batches buffered).
  """

  def __init__(
      self,
      examples: Sequence[Example],
      encoder: Encoder,
      *,
      batch_size: int,
      buckets: Sequence[Bucket] = tokenization.DEFAULT_BUCKETS,
      shuffle: bool = False,
      seed: int = 0,
      num_epochs: int | None = 1,
      drop_remainder: bool = False,
      shard_index: int = 0,
      shard_count: int = 1,
      image_loader: Callable[[str], np.ndarray] | None = None,
      image_dir: os.PathLike | str | None = None,
      num_threads: int = 2,
      prefetch: int = 4,
  ):
    if batch_size < 1 or not 0 <= shard_index < shard_count:
      raise ValueError(f"expected batch_size >= 1 and 0 <= shard_index < shard_count, got "
                       f"{batch_size}, {shard_index}, {shard_count}")
    if not buckets or list(buckets) != sorted(buckets, key=lambda b: (b.tokens, b.words)):
      raise ValueError(f"expected buckets sorted from smallest to largest, got {buckets}")
    self.examples = examples
    self.encoder = encoder
    self.batch_size = batch_size
    self.buckets = tuple(buckets)
    self.shuffle = shuffle
    self.seed = seed
    self.drop_remainder = drop_remainder
    self.shard_index = shard_index
    self.shard_count = shard_count
    self.image_loader = image_loader
    self.image_dir = None if image_dir is None else pathlib.Path(image_dir)
    (self._bucket_of, self._image_keys, self._tables, self._slot, self.report,
     tokens_of) = self._measure()
    if self.report.batches_per_epoch == 0:
      raise ValueError(f"{len(examples)} examples make no batch of {self._global_size} rows "
                       "with drop_remainder=True")
    self.report.padded_token_fraction = self._padded_fraction(tokens_of)
    self._image_shape = self._load_image(0).shape if image_loader else None
    worrying = self.report.text_truncated or self.report.missing_context
    (logging.warning if worrying else logging.info)("batch pipeline: %s", self.report.as_dict())
    self.dataset = (
        grain.MapDataset.range(self.report.batches_per_epoch)
        .repeat(num_epochs)
        .map_with_index(lambda index, _: self.batch(index))
        .to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)))

  @property
  def _global_size(self) -> int:
    return self.batch_size * self.shard_count

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    """A grain `DatasetIterator`: `get_state()` / `set_state(state)` resume mid-epoch."""
    return iter(self.dataset)

  def _measure(self):
    """One pass over the examples: the bucket, image key and laid-out row of each, and the
    report. Rows are kept per bucket as one array per field (`tables[b]`), the example's row at
    `slot[i]` of its bucket's table and a padding row last."""
    examples = list(self.examples)  # a TFDS source decodes on every access: read it once
    pieces = self.encoder.pieces(examples)
    bucket_of = np.array([self.encoder.bucket(p, self.buckets) for p in pieces], np.int32)
    fits = [self.encoder.fit(p, self.buckets[b]) for p, b in zip(pieces, bucket_of)]
    sizes = np.bincount(bucket_of, minlength=len(self.buckets))
    batches = sizes // self._global_size if self.drop_remainder else -(-sizes // self._global_size)
    slot = np.zeros(len(examples), np.int64)
    tables = []
    for b, bucket in enumerate(self.buckets):
      members = np.flatnonzero(bucket_of == b)
      slot[members] = np.arange(len(members))
      rows = [self.encoder.row(examples[i], pieces[i], bucket) for i in members]
      rows.append(self.encoder.empty_row(bucket))
      tables.append({k: np.stack([r[k] for r in rows]) for k in rows[-1]})
    grid_conflicts = 0
    if self.encoder.task == "jmere":
      grid_conflicts = sum(tokenization.example_grid(e, f.words).conflicts
                           for e, f in zip(examples, fits))
    report = PipelineReport(
        examples=len(pieces),
        batches_per_epoch=int(batches.sum()),
        examples_per_bucket={f"{b.tokens}x{b.words}": int(n) for b, n in zip(self.buckets, sizes)},
        missing_context=sum(1 for e in examples if e.context is None)
        if self.encoder.uses_context else 0,
        context_truncated=sum(1 for p, f in zip(pieces, fits) if f.context < len(p.context_ids)),
        text_truncated=sum(1 for p, f in zip(pieces, fits) if f.words < len(p.word_starts)),
        grid_conflicts=grid_conflicts)
    specials = 3 if self.encoder.uses_context else 2
    tokens_of = np.array([specials + f.text + f.context for f in fits], np.int64)
    return bucket_of, [image_key(e.image_id) for e in examples], tables, slot, report, tokens_of

  def _padded_fraction(self, tokens_of: np.ndarray) -> float:
    positions = sum(self._global_size * self.buckets[b].tokens for b, _ in self.plan(0))
    real = sum(int(tokens_of[members].sum()) for _, members in self.plan(0))
    return round(1.0 - real / positions, 4)

  @functools.lru_cache(maxsize=2)
  def plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
    """The global batches of one epoch: (bucket index, example indices)."""
    rng = np.random.default_rng([self.seed, epoch])
    count = len(self._bucket_of)
    order = rng.permutation(count) if self.shuffle else np.arange(count)
    batches = []
    for b in range(len(self.buckets)):
      members = order[self._bucket_of[order] == b]
      stop = len(members)
      if self.drop_remainder:
        stop -= stop % self._global_size
      batches += [(b, members[i:i + self._global_size]) for i in range(0, stop, self._global_size)]
    if self.shuffle:
      batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches

  def batch(self, index: int) -> dict[str, np.ndarray]:
    """Batch `index` of the whole run (epoch-major), this process's rows only."""
    b, members = self._planned(index)
    rows = np.full(self._global_size, -1, np.int64)
    rows[:len(members)] = members
    return self._assemble(b, rows)

  def bucket_index(self, index: int) -> int:
    """The bucket (index into `buckets`) of batch `index` of the whole run."""
    return self._planned(index)[0]

  def padding_batch(self, bucket_index: int) -> dict[str, np.ndarray]:
    """A batch of bucket `bucket_index` made of padding rows only: the shapes and dtypes of
    that bucket's batches, e.g. to compile a step for it before the first real batch."""
    return self._assemble(bucket_index, np.full(self._global_size, -1, np.int64))

  def _planned(self, index: int) -> tuple[int, np.ndarray]:
    epoch, step = divmod(index, self.report.batches_per_epoch)
    return self.plan(epoch)[step]

  def _assemble(self, bucket_index: int, rows: np.ndarray) -> dict[str, np.ndarray]:
    """The batch of global `rows` (example indices, -1 for padding), this process's share."""
    groups = _image_groups([self._image_keys[i] if i >= 0 else None for i in rows])
    mine = slice(self.shard_index * self.batch_size, (self.shard_index + 1) * self.batch_size)
    rows, groups = rows[mine], groups[mine]
    table = self._tables[bucket_index]
    padding = len(table["num_words"]) - 1
    at = np.where(rows >= 0, self._slot[np.maximum(rows, 0)], padding)
    batch = {k: v[at] for k, v in table.items()}
    batch["image_group"] = groups
    batch["example_index"] = rows.astype(np.int32)
    batch["valid"] = rows >= 0
    if self.image_loader is not None:
      blank = np.zeros(self._image_shape, np.float32)
      batch["pixel_values"] = np.stack(
          [self._load_image(int(i)) if i >= 0 else blank for i in rows]).astype(np.float32)
    return batch

  def _load_image(self, index: int) -> np.ndarray:
    example = self.examples[index]
    if self.image_dir is not None:
      path = self.image_dir / example.image_id
    elif example.image_path:
      path = pathlib.Path(example.image_path)
    else:
      raise ValueError(f"{example.source}: no image path for image {example.image_id!r}; "
                       "expected an image_dir or examples built with their images")
    return np.asarray(self.image_loader(str(path)))


def _image_groups(image_keys: Sequence[str | None]) -> np.ndarray:
  """Equal image keys get equal groups; every padding row (None) a group of its own."""
  groups, seen = [], {}
  for i, key in enumerate(image_keys):
    groups.append(seen.setdefault(key if key is not None else ("padding", i), len(seen)))
  return np.asarray(groups, np.int32)
