"""The jitted steps on a tiny model and real tiny batches: one compilation per batch shape,
also after the state went through a host round trip as a checkpoint restore does; dropout and
permutation keys that depend on (seed, step) alone."""

import chex
import jax
import numpy as np
import optax
import pytest

from shapca_jax import steps
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
