"""The jitted steps on a tiny model and real tiny batches: one compilation per batch shape,
also after the state went through a host round trip as a checkpoint restore does; dropout and
permutation keys that depend on (seed, step) alone."""

import chex
import jax
import numpy as np
import optax
import pytest

from shapca_jax import losses, steps
from shapca_jax import train
import train_fixtures


@pytest.fixture(scope="module")
def setup(tmp_path_factory, minilm_dir, embedded_data_dir):
  root = tmp_path_factory.mktemp("steps")
  data_dir = train_fixtures.write_tiny_twitter(embedded_data_dir, root / "data", per_split=20)
  config = train_fixtures.tiny_config(data_dir, train_fixtures.write_tiny_bert(root / "bert",
                                                                               minilm_dir))
  data = train.build_data(config, root / "work")
  model, pretrained = train.build_model(config, data.vocab_size)
  params = train.init_params(model, pretrained, data.train.batch(0), jax.random.key(0))
  return config, data, steps.create_train_state(model, params, optax.sgd(1e-3))


def test_train_step_compiles_once_per_shape_also_after_a_restore(setup):
  config, data, state = setup
  chex.clear_trace_counter()
  step = jax.jit(chex.assert_max_traces(
      lambda s, b, r: steps.train_step(s, b, r, align=config.align), n=1))
  batch = data.train.batch(0)
  for i in range(2):
    state, metrics = step(state, batch, jax.random.key(i))
  # What Orbax hands back: host arrays, put on the device again.
  state = jax.device_put(jax.tree.map(np.asarray, state))
  state, metrics = step(state, batch, jax.random.key(2))
  assert int(state.step) == 3
  assert np.isfinite(float(metrics["loss"]))
  assert float(metrics["align_loss"]) > 0


def test_step_randomness_depends_on_seed_and_step_only(setup):
  config, data, state = setup
  batch = data.train.batch(0)
  step = jax.jit(lambda s, r: steps.train_step(s, batch, r, align=config.align)[1]["loss"])
  rng = jax.random.key(3)
  at_step_1 = state.replace(step=state.step + 1)
  assert float(step(at_step_1, rng)) == float(step(at_step_1, jax.random.key(3)))
  assert float(step(at_step_1, rng)) != float(step(state, rng))
  dropout_0, shapley_0 = steps.step_rngs(rng, 0)
  dropout_1, _ = steps.step_rngs(rng, 1)
  assert not np.array_equal(jax.random.key_data(dropout_0), jax.random.key_data(dropout_1))
  assert not np.array_equal(jax.random.key_data(dropout_0), jax.random.key_data(shapley_0))


def test_diagnostics_step_grad_share_from_two_independent_gradients(setup):
  """align_grad_share against the text encoder gradients of each loss taken on its own, with
  the dropout and permutation keys of the train step at that state."""
  config, data, state = setup
  batch = data.train.batch(0)
  rng = jax.random.key(5)
  got = jax.jit(lambda s, b, r: steps.diagnostics_step(s, b, r, align=config.align))(
      state, batch, rng)
  dropout_rng, shapley_rng = steps.step_rngs(rng, state.step)
  valid = np.asarray(batch["valid"], np.float32)

  def outputs(params):
    return state.apply_fn({"params": params}, batch, deterministic=False,
                          rngs={"dropout": dropout_rng})

  def task_loss(params):
    out = outputs(params)
    return (out["task_loss"] * valid).sum() / (out["task_units"] * valid).sum()

  def align_loss(params):
    out = outputs(params)
    return losses.alignment_loss(out["text_vec"], out["context_vec"], None, shapley_rng,
                                 steps.alignment_config(config.align), batch["image_group"],
                                 batch["valid"])[0]

  def encoder_norm(loss):
    grads = jax.grad(loss)(state.params)["text_encoder"]
    return np.sqrt(sum(np.sum(np.square(np.asarray(g, np.float64)))
                       for g in jax.tree.leaves(grads)))

  task_norm, align_norm = encoder_norm(task_loss), encoder_norm(align_loss)
  assert 0 < align_norm < task_norm
  np.testing.assert_allclose(got["align_grad_share"], align_norm / (task_norm + align_norm),
                             rtol=1e-4)
  assert set(got) == {"align_grad_share"} | {f"{d}_{m}" for d in ("c2t", "t2c")
                                             for m in losses.DIAGNOSTICS}
  off = config.align.copy_and_resolve_references()
  off.kind = "none"
  assert steps.diagnostics_step(state, batch, rng, align=off) == {}
