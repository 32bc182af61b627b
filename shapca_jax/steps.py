"""The jitted training and evaluation steps, with nothing of the input stack (TFDS, grain).

``train.train_and_evaluate`` drives these; benchmarks and the PyTorch parity test call them
directly on hand-made batches, also on machines that have JAX but no data stack.
"""

from typing import Any

from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from shapca_jax import losses
from shapca_jax.models.shapca import ShapCA

Batch = dict[str, np.ndarray]
TrainState = train_state.TrainState


def create_train_state(model: ShapCA, params: Any, tx: optax.GradientTransformation) -> TrainState:
  """A fresh state whose step is a concrete int32 array: ``TrainState.create`` stores a Python
  0, which traces differently from a restored step and would compile the step twice."""
  return TrainState.create(apply_fn=model.apply, params=params, tx=tx).replace(
      step=jnp.zeros((), jnp.int32))


def step_rngs(rng: jax.Array, step: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(dropout key, Shapley permutation key) of training step ``step`` of a run seeded ``rng``.

  Folding the step in makes every step's randomness a function of (seed, step) alone, so a
  resumed run draws what an uninterrupted one draws.
  """
  dropout_rng, shapley_rng = jax.random.split(jax.random.fold_in(rng, step))
  return dropout_rng, shapley_rng


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


def _objective(state: TrainState, params: Any, batch: Batch, dropout_rng: jax.Array,
               shapley_rng: jax.Array, align: ml_collections.ConfigDict):
  """(task loss, alignment loss, alignment terms, model outputs) of a training forward pass."""
  valid = batch["valid"].astype(jnp.float32)
  out = state.apply_fn({"params": params}, batch, deterministic=False,
                       rngs={"dropout": dropout_rng})
  units = jnp.sum(out["task_units"] * valid)
  task = jnp.sum(out["task_loss"] * valid) / jnp.maximum(units, 1.0)
  align_loss, terms = alignment(out, batch, shapley_rng, align)
  return task, align_loss, terms, out


def _norm(tree: Any) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(tree)))


def train_step(state: TrainState, batch: Batch, rng: jax.Array, *,
               align: ml_collections.ConfigDict) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step; its randomness is ``step_rngs(rng, state.step)``."""
  dropout_rng, shapley_rng = step_rngs(rng, state.step)

  def loss_fn(params):
    task, align_loss, terms, _ = _objective(state, params, batch, dropout_rng, shapley_rng, align)
    return task + align_loss, {"task_loss": task, "align_loss": align_loss, **terms}

  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  new_state = state.apply_gradients(grads=grads)
  return new_state, {"loss": loss, "grad_norm": _norm(grads), **aux}


def diagnostics_step(state: TrainState, batch: Batch, rng: jax.Array, *,
                     align: ml_collections.ConfigDict) -> dict[str, jax.Array]:
  """Alignment diagnostics (docs/alignment.md) of the step ``train_step(state, batch, rng)``
  takes: the same dropout and permutations, at the params before its update. Empty when
  alignment is off.

  Besides ``losses.alignment_diagnostics`` per direction: ``align_grad_share`` =
  |grad_enc L_align| / (|grad_enc L_task| + |grad_enc L_align|), the norms taken over the text
  encoder's params and L_align weighted by its lambdas.
  """
  if align.kind == "none":
    return {}
  dropout_rng, shapley_rng = step_rngs(rng, state.step)

  def both_losses(params):
    task, align_loss, _, out = _objective(state, params, batch, dropout_rng, shapley_rng, align)
    return jnp.stack([task, align_loss]), out

  _, pullback, out = jax.vjp(both_losses, state.params, has_aux=True)
  task_norm, align_norm = (_norm(pullback(jnp.eye(2)[i])[0]["text_encoder"]) for i in (0, 1))
  diagnostics = losses.alignment_diagnostics(
      out["text_vec"], out["context_vec"], out.get("image_vec"), shapley_rng,
      alignment_config(align), same_group=batch["image_group"], valid=batch["valid"])
  share = align_norm / jnp.maximum(task_norm + align_norm, jnp.finfo(jnp.float32).tiny)
  return {**diagnostics, "align_grad_share": share}


def eval_step(state: TrainState, batch: Batch) -> jax.Array:
  """The model's predictions for a batch (see ``ShapCA.predict``)."""
  return state.apply_fn({"params": state.params}, batch, method=ShapCA.predict)
