"""Training and evaluation of Shap-CA on any of its three tasks (METHOD §1, §3-§6).

``train_and_evaluate(config, workdir)`` is the whole job: data -> model -> jitted steps ->
checkpoints -> dev-selected test scores in ``workdir/results.json``. Starting it again in the
same workdir resumes from the latest checkpoint (params, optimizer state, step, data order and
RNG) and ends with the same numbers as an uninterrupted run.

One loop serves every ``config.task``; what differs is chosen in two places: the model's head,
loss and prediction (``ShapCA(task=...)``) and the host-side scorer (``make_scorer``):

  mner   CRF tags       -> entity P/R/F1 (seqeval convention)
  mre    relation ids   -> micro P/R/F1 over the non-None relations
  mjere  word-pair grid -> decoded quintuple P/R/F1 (the selection metric) and entity P/R/F1

Model selection always ranks the dev split's top-level ``f1``.
"""

import collections
import contextlib
import dataclasses
import functools
import gzip
import json
import logging
import pathlib
import threading
import time
from typing import Any, Callable, Iterable, NamedTuple, Optional, Sequence

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from shapca_jax import checkpoint
from shapca_jax import cpu_threefry
from shapca_jax import losses
from shapca_jax import metrics as metrics_lib
from shapca_jax import optim
from shapca_jax import runlog
from shapca_jax import sharding
from shapca_jax import steps
from shapca_jax import summary_writer
from shapca_jax import wordpair
from shapca_jax.config import default_config, separate_views, validate_config
from shapca_jax.data import builders, images, labels, readers, tokenization
from shapca_jax.data.pipeline import BatchPipeline
from shapca_jax.data.readers import Example
from shapca_jax.models import weights
from shapca_jax.models.shapca import ShapCA
from shapca_jax.prefetch import DevicePrefetcher

Scores = dict[str, Any]
# The model's classes per task (mjere: the grid classes "none", entity types, relations).
TASK_LABELS = {"mner": labels.MNER_LABELS, "mre": labels.MNRE_RELATIONS,
               "mjere": labels.GRID_LABELS}
RESULTS_FILE = "results.json"
METRICS_LOG = "metrics.jsonl"
# The dev-selected model's test predictions, one JSON line per test example in order, with the
# example's counts of the selection metric so that intervals (bootstrap over examples) can be
# recomputed without the model.
TEST_PREDICTIONS_FILE = "test_predictions.jsonl.gz"
# Keys that may change when a run is resumed: they steer bookkeeping or where the run stops, not
# the numbers of the steps it takes (a run may continue on another mesh: checkpoints restore
# onto any sharding).
RESUME_IGNORE_KEYS = ("log_every_steps", "progress_bar", "tensorboard", "eval_batch_size",
                      "mesh.*", "stop_after_epochs", "early_stop_patience", "cpu_threefry")
# Batches put on the accelerators ahead of the step (2: the next one while the current one runs).
PREFETCH_DEPTH = 2
# Row fields that place an evaluated row in its split (see `predict_split`).
ROW_FIELDS = ("example_index", "valid", "num_words")


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite."""


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass
class Data:
  """The three splits of one run as batch pipelines, plus the raw examples for scoring."""
  train: BatchPipeline
  valid: BatchPipeline
  test: BatchPipeline
  vocab_size: int
  blank_images: "_ImageLoader | None"

  def reports(self) -> dict[str, Any]:
    out = {s: getattr(self, s).report.as_dict() for s in ("train", "valid", "test")}
    if self.blank_images is not None:
      out["blank_images"] = self.blank_images.num_blank
    return out


class _ImageLoader:
  """Path -> preprocessed image, counting the blanks used for unreadable files."""

  def __init__(self, processor: images.ImageProcessor, missing_image: str):
    self.processor = processor
    self.missing_image = missing_image
    self.num_blank = 0
    self._lock = threading.Lock()  # grain prepares batches in several threads

  def __call__(self, path: str) -> np.ndarray:
    pixels, blank = images.load_images([path], self.processor, self.missing_image)
    with self._lock:
      self.num_blank += blank
    return pixels[0]


def text_encoder_dir(config: ml_collections.ConfigDict) -> pathlib.Path:
  return pathlib.Path(config.text_encoder) if config.text_encoder else (
      tokenization.default_tokenizer_dir())


def input_layout(config: ml_collections.ConfigDict) -> str:
  """The layout (``tokenization.LAYOUTS``) of evaluation and inference inputs."""
  return "joint" if config.use_context else "none"


def build_data(config: ml_collections.ConfigDict, workdir: pathlib.Path,
               mesh: Optional[jax.sharding.Mesh] = None) -> Data:
  """TFDS records (prepared once under ``workdir/tfds``) -> grain batch pipelines.

  ``config.batch_size`` and ``config.eval_batch_size`` are global: each process reads its
  share of every global batch, the rows that ``mesh`` (default: all devices) puts on its own
  devices.
  """
  context_source = config.contexts if config.use_context else None
  build_dir = workdir / "tfds"
  prepare = functools.partial(builders.prepare, config.dataset, config.data_dir, build_dir,
                              context_source, missing_context=config.missing_context)
  if jax.process_count() == 1:
    prepare()
  else:  # process 0 writes the records; the others find them (on a shared workdir) or redo them
    if jax.process_index() == 0:
      prepare()
    multihost_utils.sync_global_devices("shapca_jax: TFDS records prepared")
    if jax.process_index() != 0:
      prepare()
  encoder = tokenization.Encoder(text_encoder_dir(config), readers.TASKS[config.dataset],
                                 input_layout(config))
  # Only training aligns: evaluation batches never carry the separate views.
  train_encoder = tokenization.Encoder(
      text_encoder_dir(config), readers.TASKS[config.dataset],
      "views") if separate_views(config) else encoder
  loader = None
  if config.use_image:
    loader = _ImageLoader(images.ImageProcessor.from_checkpoint(
        config.image_encoder, max_pixels=config.max_image_pixels), config.missing_image)
  shard_index, shard_count = sharding.process_batch_shard(mesh or sharding.make_mesh())
  for key in ("batch_size", "eval_batch_size"):
    if config[key] % shard_count:
      raise ValueError(f"config.{key}={config[key]} does not split over {shard_count} processes")
  splits = {split: list(builders.load_split(config.dataset, split, build_dir, context_source,
                                            missing_context=config.missing_context))
            for split in ("train", "valid", "test")}
  buckets = run_buckets(config, encoder, splits)

  def pipeline(split: str, train: bool) -> BatchPipeline:
    return BatchPipeline(
        splits[split], train_encoder if train else encoder, buckets=buckets, seed=config.seed,
        batch_size=(config.batch_size if train else config.eval_batch_size) // shard_count,
        shuffle=train, drop_remainder=train, num_epochs=config.num_epochs if train else 1,
        image_loader=loader, image_dir=config.image_dir or None, shard_index=shard_index,
        shard_count=shard_count)

  return Data(pipeline("train", True), pipeline("valid", False), pipeline("test", False),
              vocab_size=encoder.tokenizer.vocab_size, blank_images=loader)


def run_buckets(config: ml_collections.ConfigDict, encoder: tokenization.Encoder,
                splits: dict[str, Sequence[Example]]) -> tuple[tokenization.Bucket, ...]:
  """The padded shapes of the run.

  ``config.max_buckets`` 0: the default buckets up to ``config.max_length``. Otherwise a ladder
  of at most that many token sizes, multiples of ``config.bucket_multiple`` and
  ``config.max_length`` itself, that pads the training inputs the least
  (``tokenization.bucket_ladder``; every size takes a global batch at least), with the word
  slots that the inputs of all splits landing in each need.
  """
  if config.max_buckets == 0:
    buckets = tuple(b for b in tokenization.DEFAULT_BUCKETS if b.tokens <= config.max_length)
    if not buckets:
      raise ValueError(f"config.max_length={config.max_length} is below the smallest bucket "
                       f"({tokenization.DEFAULT_BUCKETS[0].tokens} tokens)")
    return buckets
  pieces = {split: encoder.pieces(examples) for split, examples in splits.items()}
  sizes = tokenization.bucket_ladder(
      [encoder.length(p) for p in pieces["train"]], max_length=config.max_length,
      multiple=config.bucket_multiple, max_buckets=config.max_buckets,
      min_examples=config.batch_size)
  every = [p for split in pieces.values() for p in split]
  return tokenization.ladder_buckets(sizes, [encoder.length(p) for p in every],
                                     [len(p.word_starts) for p in every])


# ----------------------------------------------------------------------------- model


def build_model(config: ml_collections.ConfigDict, vocab_size: int):
  """The model and its pretrained encoder params (``{"text_encoder": ..., "image_encoder": ...}``).

  ``vocab_size`` is the tokenizer's, with any tokens the data layer added (MRE's four entity
  markers): the word-embedding table grows by that many rows (``weights.add_token_embeddings``,
  pretrained rows untouched) and the BERT config is rebuilt with the new size.
  """
  dtype = jnp.bfloat16 if config.compute_dtype == "bfloat16" else jnp.float32
  _, text_params, text_config = weights.load_hf_encoder(text_encoder_dir(config))
  added = len(tokenization.MARKERS) if config.task == "mre" else 0
  if vocab_size != text_config.vocab_size + added:
    raise ValueError(f"the tokenizer of {text_encoder_dir(config)} has {vocab_size} tokens"
                     f"{f' with the {added} entity markers' if added else ''} but its model "
                     f"{text_config.vocab_size} embeddings; expected {vocab_size - added}")
  if added:
    marker_rng = jax.random.fold_in(jax.random.key(config.seed), vocab_size)
    text_params = weights.add_token_embeddings(text_params, added, marker_rng)
    text_config = dataclasses.replace(text_config, vocab_size=vocab_size)
  pretrained = {"text_encoder": text_params}
  vision_config = None
  if config.use_image:
    _, image_params, vision_config = weights.load_hf_encoder(config.image_encoder)
    pretrained["image_encoder"] = image_params
  model = ShapCA(text_config, TASK_LABELS[config.task], task=config.task,
                 num_entity_types=len(labels.ENTITY_TYPES), pair_dim=config.pair_dim,
                 vision_config=vision_config,
                 use_context=config.use_context,
                 align_views="separate" if separate_views(config) else "joint",
                 proj_dim=config.proj_dim, dropout_rate=config.dropout_rate,
                 fusion_mode=config.fusion.mode, fusion_heads=config.fusion.num_heads,
                 constrained_training=config.crf.constrained_training, dtype=dtype)
  return model, pretrained


def init_params(model: ShapCA, pretrained: dict[str, Any], batch: steps.Batch, rng: jax.Array):
  """Random init of the new layers, pretrained weights for the encoders (shapes checked first)."""
  shapes = jax.eval_shape(lambda r: model.init(r, batch)["params"], rng)
  for name, tree in pretrained.items():
    expected = jax.tree.map(lambda s: (s.shape, s.dtype), shapes[name])
    got = jax.tree.map(lambda a: (a.shape, a.dtype), tree)
    if expected != got:
      raise ValueError(f"pretrained {name} params do not fit the model: {got} vs {expected}")
  params = jax.jit(lambda r: model.init(r, batch)["params"])(rng)
  return {**params, **pretrained}


# ----------------------------------------------------------------------------- scoring


class Prediction(NamedTuple):
  """One example's row of ``eval_step`` output and the number of its words the layout kept."""
  value: np.ndarray
  num_words: int


Scorer = Callable[[Sequence[Example], Sequence[Prediction]], Scores]


def score_mner(examples: Sequence[Example], predictions: Sequence[Prediction]) -> Scores:
  """Entity P/R/F1 (seqeval default convention); words cut off by truncation count as O."""
  gold = [list(e.tags) for e in examples]
  pred = [[labels.MNER_LABELS[t] for t in p.value[:p.num_words]]
          + ["O"] * (len(e.tags) - p.num_words) for e, p in zip(examples, predictions)]
  return metrics_lib.entity_f1(gold, pred)


def score_mre(examples: Sequence[Example], predictions: Sequence[Prediction]) -> Scores:
  """Micro P/R/F1 over the relations other than None (id 0)."""
  gold = [labels.MNRE_RELATION_IDS[e.relation] for e in examples]
  return metrics_lib.relation_f1(gold, [int(p.value) for p in predictions], negative_label=0)


def _entity(span: labels.Span) -> wordpair.Entity:
  return (span.start, span.end), span.label


def _quintuple(q: labels.Quintuple) -> wordpair.Quintuple:
  return (q.head.start, q.head.end), q.head.label, (q.tail.start, q.tail.end), q.tail.label, (
      q.relation)


@dataclasses.dataclass(frozen=True)
class JmereScorer:
  """Decodes predicted grids (``wordpair.decode_grid``) and scores quintuples and entities.

  Top-level P/R/F1 are the quintuple scores (the selection metric); ``entity`` holds entity
  P/R/F1 with a per-type report. Gold quintuples and entities lost to truncation count as
  misses.
  """
  vocab: wordpair.GridVocab

  @classmethod
  def fit(cls, train_examples: Iterable[Example]) -> "JmereScorer":
    """The grid vocabulary: MNRE type signatures orient relations, and the same-type
    orientation convention is fit on the training split (``wordpair.later_head_relations``)."""
    signatures = wordpair.signatures_from_mnre_labels(labels.MNRE_RELATIONS)
    quintuples = [_quintuple(q) for e in train_examples for q in e.quintuples]
    return cls(wordpair.GridVocab(labels.ENTITY_TYPES, labels.JMERE_RELATIONS, signatures,
                                  wordpair.later_head_relations(quintuples, signatures)))

  def scores(self, examples: Sequence[Example], grids: Sequence[np.ndarray]) -> Scores:
    decoded = [wordpair.decode_grid(grid, self.vocab) for grid in grids]
    scores = metrics_lib.jmere_f1(
        [[_entity(s) for s in e.entities] for e in examples], [d.entities for d in decoded],
        [[_quintuple(q) for q in e.quintuples] for e in examples], [d.quintuples for d in decoded])
    return {**scores["quintuple"], "entity": scores["entity"]}

  def __call__(self, examples: Sequence[Example], predictions: Sequence[Prediction]) -> Scores:
    return self.scores(examples, [p.value[:p.num_words, :p.num_words] for p in predictions])

  def ceiling(self, examples: Sequence[Example]) -> Scores:
    """Scores of the gold grids themselves: the best any model on this grid format can do."""
    return self.scores(examples, [tokenization.example_grid(e).grid for e in examples])


def make_scorer(task: str, train_examples: Iterable[Example]) -> Scorer:
  """The host-side scorer of ``task``; mjere fits its decoder on ``train_examples``."""
  if task == "mner":
    return score_mner
  if task == "mre":
    return score_mre
  return JmereScorer.fit(train_examples)


def predict_split(eval_fn: Callable, state: steps.TrainState,
                  pipeline: BatchPipeline) -> list[Prediction]:
  """``eval_fn`` over a split: one prediction per example, in example order.

  ``eval_fn(state, batch)`` returns the predictions of the rows of ``batch``, or (``mesh_eval_fn``)
  a dict of the whole global batch: its predictions ``value`` and its ``ROW_FIELDS``.
  """
  predictions = {}
  for batch in pipeline:
    out = jax.device_get(eval_fn(state, batch))
    rows = out if isinstance(out, dict) else {"value": out, **{k: batch[k] for k in ROW_FIELDS}}
    values = np.asarray(rows["value"])
    for row in np.flatnonzero(rows["valid"]):
      index = int(rows["example_index"][row])
      if index in predictions:
        raise RuntimeError(f"example {index} was evaluated twice")
      predictions[index] = Prediction(values[row], int(rows["num_words"][row]))
  if len(predictions) != len(pipeline.examples):
    raise RuntimeError(f"evaluation scored {len(predictions)} of {len(pipeline.examples)} "
                       "examples")
  return [predictions[i] for i in range(len(pipeline.examples))]


def evaluate(eval_fn: Callable, state: steps.TrainState, pipeline: BatchPipeline,
             scorer: Optional[Scorer] = None) -> Scores:
  """The scores of one split, every example scored once.

  ``scorer`` defaults to the pipeline's task scorer for MNER and MRE; JMERE needs one fit on
  its training split (``make_scorer("mjere", train_examples)``).
  """
  if scorer is None:
    if pipeline.encoder.task == "jmere":
      raise ValueError("evaluating JMERE needs a scorer fit on the training split: pass "
                       "scorer=make_scorer('mjere', train_examples)")
    scorer = score_mre if pipeline.encoder.task == "mre" else score_mner
  return scorer(list(pipeline.examples), predict_split(eval_fn, state, pipeline))


# ----------------------------------------------------------------------------- compilation


def _padding_batches(pipeline: BatchPipeline, batch_indices: Iterable[int],
                     mesh: jax.sharding.Mesh) -> list[dict[str, jax.Array]]:
  """One global all-padding batch per bucket that the batches ``batch_indices`` of ``pipeline``
  fall in, smallest first: the shapes to compile a step for."""
  buckets = sorted({pipeline.bucket_index(i) for i in batch_indices})
  return [sharding.global_batch(pipeline.padding_batch(b), mesh) for b in buckets]


def _batch_key(batch: dict[str, Any]) -> tuple:
  return tuple((name, np.shape(x), np.dtype(x.dtype).name) for name, x in sorted(batch.items()))


def _describe(key: tuple) -> str:
  return "{" + ", ".join(f"{name}: {dtype}{list(shape)}" for name, shape, dtype in key) + "}"


def compile_per_bucket(jitted: Callable, state: Any, batches: Iterable[dict[str, Any]],
                       *args: Any) -> Callable:
  """``jitted(state, batch, *args)`` compiled before the loop once per shape of ``batches``.

  A batch of a shape outside ``batches`` raises instead of compiling, so a shape or dtype that
  leaks between steps cannot recompile every few steps unnoticed, and no compilation lands
  inside the timed steps. Compiling every bucket up front also brings an error of the largest
  bucket (out of memory, say) to the start of a run instead of its first long batch.
  """
  executables = {}
  for batch in batches:
    key = _batch_key(batch)
    if key not in executables:
      executables[key] = jitted.lower(state, batch, *args).compile()

  def run(state, batch, *args):
    key = _batch_key(batch)
    if key not in executables:
      raise RuntimeError(f"no step was compiled for a batch of {_describe(key)}, only for "
                         f"{', '.join(map(_describe, executables)) or 'none'}; some input "
                         "changes shape or dtype between batches")
    return executables[key](state, batch, *args)

  return run


def warm_up(step_fn: Callable, state: Any, batches: Iterable[dict[str, Any]], *args: Any) -> None:
  """Runs ``step_fn`` once per batch on a copy of ``state`` (which the step donates), results
  discarded. An executable's first call pays one-time runtime set-up: on a CPU the tiny model's
  step took 80-130 ms at its first call per bucket against 10-20 ms after. That cost belongs with
  the compilation, not with the first training steps, whose time is the loop's steps/s."""
  for batch in batches:
    jax.block_until_ready(step_fn(sharding.device_copy(state), batch, *args))


def mesh_eval_fn(mesh: jax.sharding.Mesh, shardings: Any, state: steps.TrainState,
                 pipelines: Sequence[BatchPipeline]) -> Callable:
  """An ``eval_fn`` for ``predict_split`` over ``mesh``: this process's rows in, the global
  batch's predictions and row fields out, gathered once onto every process. It is compiled
  for every bucket that ``pipelines`` batch into (``compile_per_bucket``)."""

  def predict(state, batch):
    return {"value": steps.eval_step(state, batch), **{k: batch[k] for k in ROW_FIELDS}}

  jitted = sharding.jit_eval_step(predict, mesh, shardings)
  batches = [batch for p in pipelines
             for batch in _padding_batches(p, range(p.report.batches_per_epoch), mesh)]
  compiled = compile_per_bucket(jitted, state, batches)
  return lambda state, batch: compiled(state, sharding.global_batch(batch, mesh))


# ----------------------------------------------------------------------------- loop


class LoopTimer:
  """Where the training loop's wall time goes, by named section.

  ``rate()`` is training steps per second with compilation, evaluation and checkpoint writes
  left out (the seconds of what was left out are kept by name in ``excluded``). ``sections``
  holds the host seconds of the loop's other parts (``section``): they overlap the steps the
  device is still computing, so they show where the host spends its time, not what it costs.
  """

  def __init__(self):
    self.steps, self._elapsed, self._since = 0, 0.0, None
    self.excluded: dict[str, float] = collections.defaultdict(float)
    self.sections: dict[str, float] = collections.defaultdict(float)
    self.loop_seconds = 0.0  # first step dispatched to last step done, everything included

  def start(self):
    self._since = time.perf_counter()

  @contextlib.contextmanager
  def section(self, name: str):
    began = time.perf_counter()
    try:
      yield
    finally:
      self.sections[name] += time.perf_counter() - began

  @contextlib.contextmanager
  def excluding(self, name: str):
    running = self._since is not None
    if running:
      self._elapsed += time.perf_counter() - self._since
      self._since = None
    began = time.perf_counter()
    try:
      yield
    finally:
      self.excluded[name] += time.perf_counter() - began
      if running:
        self.start()

  def rate(self) -> float:
    elapsed = self._elapsed + (time.perf_counter() - self._since if self._since else 0.0)
    return self.steps / elapsed if elapsed > 0 else 0.0


@dataclasses.dataclass
class LoopProbe:
  """What ``train_and_evaluate(..., probe=...)`` leaves for a benchmark of its loop: the
  compiled train step and its key, every batch the loop fed it (in order; host batches where
  ``loop_input`` passes them to the step), ``put`` that places such a batch on the mesh, the
  state after the last step, and the loop's timer."""
  step_fn: Optional[Callable] = None
  rng: Optional[jax.Array] = None
  batches: list = dataclasses.field(default_factory=list)
  put: Optional[Callable] = None
  state: Any = None
  timer: Optional[LoopTimer] = None


def loop_input(mesh: jax.sharding.Mesh) -> tuple[Callable, int]:
  """How the loop's batches reach the step: ``(put, prefetch depth)`` for ``DevicePrefetcher``.

  On one process with a CPU backend the step takes the host batch as it is: its compiled call
  copies the fields in C++ (about 0.1 ms a batch, where ``jax.device_put`` spends 1.5 ms in
  Python), and a prefetch thread would overlap nothing (the step's threads already use every
  core) while holding the GIL the loop needs to dispatch the next step. Elsewhere a thread
  puts each batch on the mesh ``PREFETCH_DEPTH`` steps ahead of its step.
  """
  if jax.default_backend() == "cpu" and jax.process_count() == 1:
    return (lambda batch: batch), 0
  return functools.partial(sharding.global_batch, mesh=mesh), PREFETCH_DEPTH


def _host_metrics(pending: list[tuple[int, dict[str, jax.Array]]]) -> list[tuple[int, dict]]:
  """Fetches the metrics of the steps since the last log step in one transfer."""
  fetched = jax.device_get([m for _, m in pending])
  return [(step, {k: float(v) for k, v in m.items()}) for (step, _), m in zip(pending, fetched)]


def _check_finite(logged: list[tuple[int, dict]], last_saved: Optional[int]) -> None:
  for step, values in logged:
    if not np.isfinite(values["loss"]):
      kept = f"step {last_saved}" if last_saved is not None else "none was written yet"
      raise NonFiniteLossError(f"training loss is {values['loss']} at step {step}; stopping. "
                               f"Last good checkpoint: {kept}")


def _append_jsonl(path: pathlib.Path, records: Sequence[dict]) -> None:
  if jax.process_index() != 0:  # every process holds the same replicated metrics
    return
  with path.open("a") as f:
    f.write("".join(json.dumps(record) + "\n" for record in records))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
                       probe: Optional[LoopProbe] = None) -> dict:
  """Trains, selects the best dev checkpoint, scores it on test; returns the results dict.

  ``probe`` (benchmarks) is filled with the loop's compiled step, batches, state and timer.
  """
  validate_config(config)
  if config.cpu_threefry and jax.default_backend() == "cpu":
    cpu_threefry.install()
  mesh = sharding.mesh_from_config(config)
  for key in ("batch_size", "eval_batch_size"):
    if config[key] % mesh.size:
      raise ValueError(f"config.{key}={config[key]} does not split over the {mesh.size} devices "
                       f"of config.mesh ({dict(mesh.shape)})")
  start_time = time.time()
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  data = build_data(config, workdir, mesh)
  model, pretrained = build_model(config, data.vocab_size)
  scorer = make_scorer(config.task, data.train.examples)
  steps_per_epoch = data.train.report.batches_per_epoch
  total_steps = config.num_epochs * steps_per_epoch
  if config.max_steps > 0:
    total_steps = min(total_steps, config.max_steps)

  rng = jax.random.key(config.seed)
  init_rng, train_rng = jax.random.split(rng)
  params = init_params(model, pretrained, data.train.batch(0), init_rng)
  tx = optim.make_optimizer(
      params, learning_rates=dict(config.learning_rate), total_steps=total_steps,
      warmup_ratio=config.warmup_ratio, weight_decay=config.weight_decay,
      grad_clip_norm=config.grad_clip_norm)
  learning_rates = optim.learning_rate_table(dict(config.learning_rate), total_steps,
                                             config.warmup_ratio)
  state, shardings = sharding.create_sharded(
      functools.partial(steps.create_train_state, model, tx=tx), params, mesh)
  del params, pretrained
  train_rng = sharding.shard(train_rng, sharding.replicated(mesh))

  iterator = iter(data.train)
  metrics_log = workdir / METRICS_LOG

  with contextlib.ExitStack() as cleanup:
    ckpt = cleanup.enter_context(checkpoint.TrainCheckpointer(
        workdir, config.to_dict(), save_every_steps=config.checkpoint_every_steps,
        keep_latest=config.keep_checkpoints, best_metric="f1",
        resume_ignore_keys=RESUME_IGNORE_KEYS, schema_defaults=default_config().to_dict()))
    summaries = cleanup.enter_context(summary_writer.SummaryWriter(
        workdir, enabled=config.tensorboard and jax.process_index() == 0))
    restored = ckpt.restore_latest(sharding.with_shardings(state, shardings))
    first_step = 0
    if restored is not None:
      state, first_step = restored.state, restored.step
      iterator.set_state(restored.data_state)
      logging.warning("resumed from step %d (checkpoint %s)", first_step, restored.path)
      summaries.resumed(first_step)
    if jax.process_index() == 0:
      runlog.rewind(metrics_log, first_step)  # the steps after it are trained again
    last_saved = first_step if restored is not None else None
    stop_step = total_steps
    if config.stop_after_epochs > 0:
      stop_step = min(total_steps, config.stop_after_epochs * steps_per_epoch)
    evaluated = eval_steps(steps_per_epoch, config.evals_per_epoch, stop_step)

    def patience_spent(step: int) -> bool:
      best_step = ckpt.best["step"] if ckpt.best else None
      return (config.early_stop_patience > 0 and step in evaluated
              and evaluations_since_best(evaluated, step, best_step) >= config.early_stop_patience)

    last_step = first_step if patience_spent(first_step) else stop_step

    compile_began = time.perf_counter()
    jitted_step = sharding.jit_train_step(
        functools.partial(steps.train_step, align=config.align), mesh, shardings)
    # The shapes of the batches this run still trains on (up to its stop, not the schedule's end).
    train_shapes = _padding_batches(data.train, range(first_step, last_step), mesh)
    step_fn = compile_per_bucket(jitted_step, state, train_shapes, train_rng)
    warm_up(step_fn, state, train_shapes, train_rng)
    eval_fn = mesh_eval_fn(mesh, shardings, state, (data.valid, data.test))
    diagnostics_fn = None
    if config.align.kind != "none":
      diagnostics_fn = compile_per_bucket(
          jax.jit(functools.partial(steps.diagnostics_step, align=config.align),
                  in_shardings=(shardings, sharding.batch_sharding(mesh),
                                sharding.replicated(mesh)),
                  out_shardings=sharding.replicated(mesh)),
          state, train_shapes, train_rng)
    ckpt.compile_checks(state, state.params)
    compile_seconds = time.perf_counter() - compile_began

    pending: list[tuple[int, dict]] = []
    best_dev = None  # the dev scores of the best checkpoint, when this process evaluated it
    bar = tqdm.tqdm(total=total_steps, initial=first_step, disable=not config.progress_bar,
                    desc="train", unit="step", dynamic_ncols=True)
    timer = LoopTimer()
    put, depth = loop_input(mesh)
    batches = cleanup.enter_context(DevicePrefetcher(iterator, put, depth=depth))
    loop_began = time.perf_counter()
    timer.start()
    for step in range(first_step + 1, last_step + 1):
      ckpt.check_writes()
      with timer.section("input_wait"):
        batch = next(batches)
      if probe is not None:
        probe.batches.append(batch)
      is_eval = step in evaluated
      is_log = step % config.log_every_steps == 0 or is_eval
      diagnostics = {}
      if diagnostics_fn is not None and is_log:  # before the step: the params it differentiates
        with timer.section("device_wait"):  # the steps still queued are loop time, not theirs
          jax.block_until_ready(state)
        with timer.excluding("diagnostics"):
          diagnostics = jax.block_until_ready(diagnostics_fn(state, batch, train_rng))
      with timer.section("dispatch"):
        state, step_metrics = step_fn(state, batch, train_rng)
      pending.append((step, {**step_metrics, **diagnostics}))
      timer.steps += 1
      if is_log or ckpt.should_save(step):
        with timer.section("device_wait"):
          jax.block_until_ready(pending[-1][1])
        with timer.section("logging"):
          logged = _host_metrics(pending)
          pending = []
          _check_finite(logged, last_saved)
          records = [(s, {**values, "learning_rate": {g: float(lr[s - 1]) for g, lr in
                                                       learning_rates.items()}})
                     for s, values in logged]
          _append_jsonl(metrics_log, [{"step": s, **record} for s, record in records])
          for s, record in records:
            summaries.scalars(s, record)
          # The bar moves only here, where the steps are known to be done: its rate and ETA
          # count completed steps, not dispatched ones.
          bar.set_postfix(loss=f"{logged[-1][1]['loss']:.4f}",
                          steps_per_s=f"{timer.rate():.2f}", refresh=False)
          bar.update(step - bar.n)
          if step == last_step:
            bar.close()  # before the last evaluation, whose time is not a step's
      if is_eval:
        with timer.excluding("evaluation"):
          dev = evaluate(eval_fn, state, data.valid, scorer)
        record = {"epoch": step / steps_per_epoch, "seconds": round(time.time() - start_time, 2),
                  "dev": _summary(dev)}
        _append_jsonl(metrics_log, [{"step": step, **record}])
        summaries.scalars(step, record)
        with timer.excluding("checkpoint"), timer.section("checkpoint"):
          if ckpt.save_best(step, state.params, _summary(dev)):
            best_dev = dev
        bar.write(f"step {step}: dev F1 {dev['f1']:.4f} (best {ckpt.best['value']:.4f} at step "
                  f"{ckpt.best['step']})")
        if patience_spent(step):
          last_step = step
          bar.write(f"stopping early: no better dev F1 in the last {config.early_stop_patience} "
                    "evaluations")
      # After the evaluation: a latest checkpoint of an evaluated step implies its best params.
      if ckpt.should_save(step) or step == last_step:
        with timer.excluding("checkpoint"), timer.section("checkpoint"):
          ckpt.save_latest(step, state, data_state=batches.get_state(), rng=train_rng)
        last_saved = step
      if step == last_step:
        break
    jax.block_until_ready(state)
    timer.loop_seconds = time.perf_counter() - loop_began
    batches.close()
    timer.sections.update({f"prefetch_{k}": t for k, t in batches.seconds.items()})
    bar.close()
    ckpt.wait_until_finished()
    best = ckpt.best

  best_params = checkpoint.restore_best(workdir, state.params)
  best_state = state.replace(params=best_params)
  if best_dev is None:  # the best checkpoint was evaluated before a resume
    best_dev = evaluate(eval_fn, best_state, data.valid, scorer)
  test_predictions = predict_split(eval_fn, best_state, data.test)
  results = {
      "task": config.task,
      "dataset": config.dataset,
      "seed": config.seed,
      "best_step": best["step"],
      "dev": best_dev,
      "test": scorer(list(data.test.examples), test_predictions),
      "steps": total_steps,
      "last_step": last_step,
      "steps_per_second": timer.rate() if timer.steps else None,
      # Tracing and compiling the train step for each bucket of the run, and the eval step for
      # each bucket of dev and test, before the first step.
      "compile_seconds": round(compile_seconds, 2),
      # Loop time outside the steps: evaluation of dev, and the calls that start checkpoint
      # writes (device-to-host copies; the file writes then run in the background).
      "seconds_outside_steps": {name: round(t, 2) for name, t in timer.excluded.items()},
      "wall_seconds": time.time() - start_time,
      "data": data.reports(),
      "config": config.to_dict(),
  }
  if config.align.kind != "none" and jax.process_index() == 0:  # the process writing the log
    results["alignment"] = alignment_summary(metrics_log, steps_per_epoch, last_step, evaluated)
  if isinstance(scorer, JmereScorer):
    results["gold_grid_ceiling"] = {split: scorer.ceiling(list(getattr(data, pipe).examples))
                                    for split, pipe in (("dev", "valid"), ("test", "test"))}
  if jax.process_index() == 0:
    write_test_predictions(workdir / TEST_PREDICTIONS_FILE, config.task, scorer,
                           list(data.test.examples), test_predictions)
    (workdir / RESULTS_FILE).write_text(json.dumps(results, indent=2))
  if probe is not None:
    probe.step_fn, probe.rng, probe.state, probe.timer = step_fn, train_rng, state, timer
    probe.put = functools.partial(sharding.global_batch, mesh=mesh)
  return results


def eval_steps(steps_per_epoch: int, evals_per_epoch: int, total_steps: int) -> list[int]:
  """The steps after which dev is scored: ``evals_per_epoch`` evenly spaced points per epoch
  (the last at the epoch's end) and the final step, in order."""
  per_epoch = {round(steps_per_epoch * i / evals_per_epoch) for i in range(1, evals_per_epoch + 1)}
  points = {epoch * steps_per_epoch + s for epoch in range(-(-total_steps // steps_per_epoch))
            for s in per_epoch if s > 0}
  return sorted({s for s in points if s <= total_steps} | {total_steps})


def evaluations_since_best(evaluated: Sequence[int], step: int, best_step: Optional[int]) -> int:
  """How many of the evaluation steps ``evaluated`` up to ``step`` came after the best one."""
  return sum(1 for s in evaluated if (best_step is None or s > best_step) and s <= step)


def _decoded_prediction(task: str, scorer: Scorer, prediction: Prediction) -> Any:
  if task == "mner":
    return [labels.MNER_LABELS[t] for t in prediction.value[:prediction.num_words]]
  if task == "mre":
    return labels.MNRE_RELATIONS[int(prediction.value)]
  grid = prediction.value[:prediction.num_words, :prediction.num_words]
  return [list(q) for q in wordpair.decode_grid(grid, scorer.vocab).quintuples]


def write_test_predictions(path: pathlib.Path, task: str, scorer: Scorer,
                           examples: Sequence[Example], predictions: Sequence[Prediction]) -> None:
  """One line per example: its decoded prediction and its counts of the selection metric
  (``num_correct``, ``num_pred``, ``num_gold``), written to a temporary file and renamed."""
  temporary = path.with_name(path.name + ".tmp")
  with gzip.open(temporary, "wt") as f:
    for index, (example, prediction) in enumerate(zip(examples, predictions)):
      counts = scorer([example], [prediction])
      record = {"index": index, "pred": _decoded_prediction(task, scorer, prediction),
                **{k: counts[k] for k in ("num_correct", "num_pred", "num_gold")}}
      f.write(json.dumps(record) + "\n")
  temporary.replace(path)


def alignment_summary(metrics_log: pathlib.Path, steps_per_epoch: int, last_step: int,
                      evaluated: Sequence[int]) -> dict[str, Any]:
  """The alignment diagnostics of the metrics log (a resumed run's replayed steps overwrite
  the killed ones): at the last step, their mean over the log steps of the last epoch, and at
  every evaluation step."""
  logged = {}
  for line in metrics_log.read_text().splitlines():
    record = json.loads(line)
    if "align_grad_share" in record:
      logged[record["step"]] = {k: v for k, v in record.items() if k == "align_grad_share" or (
          k.partition("_")[0] in losses.DIRECTIONS and k.partition("_")[2] in losses.DIAGNOSTICS)}
  last_epoch = [d for step, d in logged.items() if last_step - steps_per_epoch < step <= last_step]
  return {
      "last_step": logged.get(last_step),
      "last_epoch_mean": {k: float(np.mean([d[k] for d in last_epoch])) for k in last_epoch[0]}
                         if last_epoch else None,
      "last_epoch_log_steps": len(last_epoch),
      "at_evaluations": {str(step): d for step, d in sorted(logged.items())
                         if step in evaluated},
  }


def _summary(scores: Scores) -> dict[str, float]:
  """The scalars logged and stored with the best checkpoint (mjere adds its entity F1)."""
  summary = {k: scores[k] for k in ("precision", "recall", "f1")}
  if "entity" in scores:
    summary["entity_f1"] = scores["entity"]["f1"]
  return summary
