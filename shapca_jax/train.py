"""Training and evaluation of Shap-CA for multimodal NER (METHOD §3-§6).

``train_and_evaluate(config, workdir)`` is the whole job: data -> model -> jitted steps ->
checkpoints -> dev-selected test scores in ``workdir/results.json``. Starting it again in the
same workdir resumes from the latest checkpoint (params, optimizer state, step, data order and
RNG) and ends with the same numbers as an uninterrupted run.
"""

import dataclasses
import functools
import json
import logging
import pathlib
import threading
import time
from typing import Any, Callable, Iterator, Optional

import flax
from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

from shapca_jax import checkpoint
from shapca_jax import losses
from shapca_jax import metrics as metrics_lib
from shapca_jax import optim
from shapca_jax.config import validate_config
from shapca_jax.data import builders, images, labels, tokenization
from shapca_jax.data.pipeline import BatchPipeline
from shapca_jax.models import weights
from shapca_jax.models.shapca import ShapCA

Batch = dict[str, np.ndarray]
TrainState = train_state.TrainState
RESULTS_FILE = "results.json"
METRICS_LOG = "metrics.jsonl"
# Keys that may change when a run is resumed: they steer bookkeeping, not the numbers.
RESUME_IGNORE_KEYS = ("log_every_steps", "progress_bar", "eval_batch_size")


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


def build_data(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> Data:
  """TFDS records (prepared once under ``workdir/tfds``) -> grain batch pipelines."""
  context_source = config.contexts if config.use_context else None
  text_context = config.text_context if config.use_context else "none"
  build_dir = workdir / "tfds"
  builders.prepare(config.dataset, config.data_dir, build_dir, context_source,
                   missing_context=config.missing_context)
  encoder = tokenization.Encoder(text_encoder_dir(config), config.task, text_context)
  loader = None
  if config.use_image:
    loader = _ImageLoader(images.ImageProcessor.from_checkpoint(config.image_encoder),
                          config.missing_image)
  shard = dict(shard_index=jax.process_index(), shard_count=jax.process_count())
  buckets = tuple(b for b in tokenization.DEFAULT_BUCKETS if b.tokens <= config.max_length)
  if not buckets:
    raise ValueError(f"config.max_length={config.max_length} is below the smallest bucket "
                     f"({tokenization.DEFAULT_BUCKETS[0].tokens} tokens)")

  def pipeline(split: str, train: bool) -> BatchPipeline:
    examples = builders.load_split(config.dataset, split, build_dir, context_source,
                                   missing_context=config.missing_context)
    return BatchPipeline(
        examples, encoder, buckets=buckets, seed=config.seed,
        batch_size=config.batch_size if train else config.eval_batch_size,
        shuffle=train, drop_remainder=train, num_epochs=config.num_epochs if train else 1,
        image_loader=loader, image_dir=config.image_dir or None, **shard)

  return Data(pipeline("train", True), pipeline("valid", False), pipeline("test", False),
              vocab_size=encoder.tokenizer.vocab_size, blank_images=loader)


# ----------------------------------------------------------------------------- model


def build_model(config: ml_collections.ConfigDict, vocab_size: int):
  """The model and its pretrained encoder params (``{"text_encoder": ..., "image_encoder": ...}``)."""
  dtype = jnp.bfloat16 if config.compute_dtype == "bfloat16" else jnp.float32
  _, text_params, text_config = weights.load_hf_encoder(text_encoder_dir(config))
  if vocab_size != text_config.vocab_size:
    raise ValueError(f"the tokenizer of {text_encoder_dir(config)} has {vocab_size} tokens but "
                     f"its model {text_config.vocab_size} embeddings")
  pretrained = {"text_encoder": text_params}
  vision_config = None
  if config.use_image:
    _, image_params, vision_config = weights.load_hf_encoder(config.image_encoder)
    pretrained["image_encoder"] = image_params
  model = ShapCA(text_config, labels.MNER_LABELS, vision_config=vision_config,
                 use_context=config.use_context, text_context=config.text_context,
                 proj_dim=config.proj_dim, dropout_rate=config.dropout_rate,
                 fusion_mode=config.fusion.mode, fusion_heads=config.fusion.num_heads,
                 constrained_training=config.crf.constrained_training, dtype=dtype)
  return model, pretrained


def init_params(model: ShapCA, pretrained: dict[str, Any], batch: Batch, rng: jax.Array):
  """Random init of the new layers, pretrained weights for the encoders (shapes checked first)."""
  shapes = jax.eval_shape(lambda r: model.init(r, batch)["params"], rng)
  for name, tree in pretrained.items():
    expected = jax.tree.map(lambda s: (s.shape, s.dtype), shapes[name])
    got = jax.tree.map(lambda a: (a.shape, a.dtype), tree)
    if expected != got:
      raise ValueError(f"pretrained {name} params do not fit the model: {got} vs {expected}")
  params = jax.jit(lambda r: model.init(r, batch)["params"])(rng)
  return {**params, **pretrained}


# ----------------------------------------------------------------------------- steps


def alignment_config(align: ml_collections.ConfigDict) -> losses.AlignmentConfig:
  """The loss settings of ``config.align``; a direction pair is off when its lambda is 0."""
  return losses.AlignmentConfig(
      kind=align.kind, utility=align.utility, tau_u=align.tau_u, tau_c=align.tau_c,
      num_permutations=align.num_permutations, antithetic=align.antithetic,
      lambda_ct=0.0 if align.directions == "context_image" else align.lambda_ct,
      lambda_ci=0.0 if align.directions == "context_text" else align.lambda_ci)


def alignment(out: dict[str, jax.Array], batch: Batch, key: jax.Array,
              align: ml_collections.ConfigDict) -> tuple[jax.Array, dict[str, jax.Array]]:
  """L_align of METHOD §4 over the batch (zero when alignment is off)."""
  if align.kind == "none":
    return jnp.zeros((), jnp.float32), {}
  return losses.alignment_loss(
      out["text_vec"], out["context_vec"], out.get("image_vec"), key, alignment_config(align),
      same_group=batch["image_group"], valid=batch["valid"])


def train_step(state: TrainState, batch: Batch, rng: jax.Array, *,
               align: ml_collections.ConfigDict) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step; the step's randomness is ``rng`` folded with the step number."""
  step_rng = jax.random.fold_in(rng, state.step)
  dropout_rng, shapley_rng = jax.random.split(step_rng)
  valid = batch["valid"].astype(jnp.float32)

  def loss_fn(params):
    out = state.apply_fn({"params": params}, batch, deterministic=False,
                         rngs={"dropout": dropout_rng})
    task = -jnp.sum(out["log_likelihood"] * valid) / jnp.maximum(jnp.sum(valid), 1.0)
    align_loss, terms = alignment(out, batch, shapley_rng, align)
    return task + align_loss, {"task_loss": task, "align_loss": align_loss, **terms}

  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  new_state = state.apply_gradients(grads=grads)
  grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
  return new_state, {"loss": loss, "grad_norm": grad_norm, **aux}


def eval_step(state: TrainState, batch: Batch) -> jax.Array:
  """Constrained Viterbi tags [B, W] (-1 beyond each sentence)."""
  tags, _ = state.apply_fn({"params": state.params}, batch, method=ShapCA.decode)
  return tags


def evaluate(eval_fn: Callable, state: TrainState, pipeline: BatchPipeline) -> dict[str, Any]:
  """Entity P/R/F1 (seqeval default convention) of one split, every example scored once."""
  gold, pred = {}, {}
  for batch in pipeline:
    tags = np.asarray(jax.device_get(eval_fn(state, batch)))
    for row in np.flatnonzero(batch["valid"]):
      index = int(batch["example_index"][row])
      example = pipeline.examples[index]
      n = int(batch["num_words"][row])
      # Words cut off by truncation count as predicted O: the scores cover every gold word.
      pred[index] = [labels.MNER_LABELS[t] for t in tags[row, :n]] + ["O"] * (
          len(example.tags) - n)
      gold[index] = list(example.tags)
  if len(gold) != len(pipeline.examples):
    raise RuntimeError(f"evaluation scored {len(gold)} of {len(pipeline.examples)} examples")
  order = sorted(gold)
  return metrics_lib.entity_f1([gold[i] for i in order], [pred[i] for i in order])


# ----------------------------------------------------------------------------- loop


def _traced_at_most(n: int, fn: Callable) -> Callable:
  """``fn`` that raises when traced more than ``n`` times: one compilation per length bucket,
  so a further trace means a shape or dtype leak that would recompile every few steps."""
  traces = 0

  def traced(*args, **kwargs):
    nonlocal traces
    traces += 1
    if traces > n:
      raise RuntimeError(f"the train step was traced {traces} times but there are only {n} "
                         "batch shapes; some input changes shape or dtype between steps")
    return fn(*args, **kwargs)

  return traced


class _StepTimer:
  """Training steps per second, with compilation and evaluation left out."""

  def __init__(self):
    self.steps, self._elapsed, self._since = 0, 0.0, None

  def start(self):
    self._since = time.perf_counter()

  def pause(self):
    if self._since is not None:
      self._elapsed += time.perf_counter() - self._since
      self._since = None

  def resume(self):
    if self.steps or self._elapsed:
      self.start()

  def rate(self) -> float:
    elapsed = self._elapsed + (time.perf_counter() - self._since if self._since else 0.0)
    return self.steps / elapsed if elapsed > 0 else 0.0


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


def _append_jsonl(path: pathlib.Path, record: dict) -> None:
  with path.open("a") as f:
    f.write(json.dumps(record) + "\n")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
  """Trains, selects the best dev checkpoint, scores it on test; returns the results dict."""
  validate_config(config)
  start_time = time.time()
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  data = build_data(config, workdir)
  model, pretrained = build_model(config, data.vocab_size)
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
  # A concrete int32 step (TrainState.create uses a Python 0) traces like a restored one.
  state = TrainState.create(apply_fn=model.apply, params=params, tx=tx).replace(
      step=jnp.zeros((), jnp.int32))
  del params, pretrained

  num_buckets = len(data.train.buckets)

  step_fn = jax.jit(_traced_at_most(num_buckets, functools.partial(train_step, align=config.align)),
                    donate_argnums=0)
  eval_fn = jax.jit(eval_step)
  iterator = iter(data.train)
  metrics_log = workdir / METRICS_LOG

  with checkpoint.TrainCheckpointer(
      workdir, config.to_dict(), save_every_steps=config.checkpoint_every_steps,
      keep_latest=config.keep_checkpoints, best_metric="f1",
      resume_ignore_keys=RESUME_IGNORE_KEYS) as ckpt:
    restored = ckpt.restore_latest(state)
    first_step = 0
    if restored is not None:
      state, first_step = restored.state, restored.step
      iterator.set_state(restored.data_state)
      logging.info("resumed from step %d in %s", first_step, workdir)
    last_saved = first_step if restored is not None else None

    pending: list[tuple[int, dict]] = []
    bar = tqdm.tqdm(total=total_steps, initial=first_step, disable=not config.progress_bar,
                    desc="train", unit="step", dynamic_ncols=True)
    timer = _StepTimer()
    for step in range(first_step + 1, total_steps + 1):
      state, step_metrics = step_fn(state, next(iterator), train_rng)
      pending.append((step, step_metrics))
      if step == first_step + 1:  # the first step compiles: leave it out of the rate
        jax.block_until_ready(step_metrics)
        timer.start()
      else:
        timer.steps += 1
      bar.update(1)
      is_eval = step % steps_per_epoch == 0 or step == total_steps
      if step % config.log_every_steps == 0 or is_eval or ckpt.should_save(step):
        logged = _host_metrics(pending)
        pending = []
        _check_finite(logged, last_saved)
        for s, values in logged:
          _append_jsonl(metrics_log, {"step": s, **values})
        bar.set_postfix(loss=f"{logged[-1][1]['loss']:.4f}", steps_per_s=f"{timer.rate():.2f}")
      if ckpt.should_save(step) or step == total_steps:
        ckpt.save_latest(step, state, data_state=iterator.get_state(), rng=train_rng)
        last_saved = step
      if is_eval:
        timer.pause()
        dev = evaluate(eval_fn, state, data.valid)
        _append_jsonl(metrics_log, {"step": step, "epoch": step / steps_per_epoch,
                                    "dev": _summary(dev)})
        ckpt.save_best(step, state.params, _summary(dev))
        timer.resume()
        bar.write(f"step {step}: dev F1 {dev['f1']:.4f} (best {ckpt.best['value']:.4f} at step "
                  f"{ckpt.best['step']})")
    bar.close()
    ckpt.wait_until_finished()
    best = ckpt.best

  best_params = checkpoint.restore_best(workdir, state.params)
  best_state = state.replace(params=best_params)
  results = {
      "dataset": config.dataset,
      "seed": config.seed,
      "best_step": best["step"],
      "dev": evaluate(eval_fn, best_state, data.valid),
      "test": evaluate(eval_fn, best_state, data.test),
      "steps": total_steps,
      "steps_per_second": timer.rate() if timer.steps else None,
      "wall_seconds": time.time() - start_time,
      "data": data.reports(),
      "config": config.to_dict(),
  }
  (workdir / RESULTS_FILE).write_text(json.dumps(results, indent=2))
  return results


def _summary(scores: dict[str, Any]) -> dict[str, float]:
  return {k: scores[k] for k in ("precision", "recall", "f1")}
