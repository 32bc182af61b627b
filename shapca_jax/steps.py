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


def train_step(state: TrainState, batch: Batch, rng: jax.Array, *,
               align: ml_collections.ConfigDict) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step; its randomness is ``step_rngs(rng, state.step)``."""
  dropout_rng, shapley_rng = step_rngs(rng, state.step)
  valid = batch["valid"].astype(jnp.float32)

  def loss_fn(params):
    out = state.apply_fn({"params": params}, batch, deterministic=False,
                         rngs={"dropout": dropout_rng})
    units = jnp.sum(out["task_units"] * valid)
    task = jnp.sum(out["task_loss"] * valid) / jnp.maximum(units, 1.0)
    align_loss, terms = alignment(out, batch, shapley_rng, align)
    return task + align_loss, {"task_loss": task, "align_loss": align_loss, **terms}

  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  new_state = state.apply_gradients(grads=grads)
  grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
  return new_state, {"loss": loss, "grad_norm": grad_norm, **aux}


def eval_step(state: TrainState, batch: Batch) -> jax.Array:
  """The model's predictions for a batch (see ``ShapCA.predict``)."""
  return state.apply_fn({"params": state.params}, batch, method=ShapCA.predict)
