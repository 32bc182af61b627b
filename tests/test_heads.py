"""Pooling, projections and task heads against float64 NumPy loops over examples and pairs."""

import math

import jax
import numpy as np

from shapca_jax.models import heads

B, L, H = 3, 7, 8
_erf = np.vectorize(math.erf)


def _gelu(x):
  return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def _states(seed=0):
  return np.random.default_rng(seed).normal(size=(B, L, H)).astype(np.float32)


def _init(module, *inputs):
  """Params with non-zero biases (so the oracles check that biases are applied), as float32
  and as float64 NumPy copies."""
  params = jax.jit(module.init)(jax.random.key(0), *inputs)["params"]
  rng = np.random.default_rng(0)
  noisy = jax.tree.map(lambda x: np.asarray(x) + 0.1 * rng.normal(size=x.shape), params)
  return (jax.tree.map(lambda x: x.astype(np.float32), noisy),
          jax.tree.map(lambda x: x.astype(np.float64), noisy))


def _apply(module, params, *inputs):
  return np.asarray(jax.jit(module.apply)({"params": params}, *inputs))


def test_masked_mean_skips_masked_positions_and_empty_rows_give_zero():
  states = _states()
  mask = np.array([[1, 1, 0, 0, 0, 0, 0], [0, 0, 0, 1, 0, 1, 1], [0] * L], bool)
  got = np.asarray(heads.masked_mean(states, mask))
  for b in range(B):
    expected = states[b][mask[b]].mean(0) if mask[b].any() else np.zeros(H)
    np.testing.assert_allclose(got[b], expected, rtol=1e-6, atol=1e-6)


def test_gather_positions_reads_each_rows_positions():
  states = _states()
  positions = np.array([[0, 3, 6], [2, 2, 1], [5, 0, 0]])
  got = np.asarray(heads.gather_positions(states, positions))
  for b in range(B):
    for w in range(3):
      np.testing.assert_array_equal(got[b, w], states[b, positions[b, w]])


def test_alignment_projection_is_a_two_layer_gelu_mlp_then_unit_norm():
  x = _states()[:, 0]
  module = heads.AlignmentProjection(5)
  params, p = _init(module, x)
  got = _apply(module, params, x)
  hidden = _gelu(x @ p["hidden"]["kernel"] + p["hidden"]["bias"])
  out = hidden @ p["out"]["kernel"] + p["out"]["bias"]
  np.testing.assert_allclose(got, out / np.linalg.norm(out, axis=1, keepdims=True), atol=1e-5)


def test_alignment_projection_of_a_zero_row_has_finite_gradients():
  x = _states()[:, 0]
  module = heads.AlignmentProjection(5)
  params, _ = _init(module, x)
  zero_out = jax.tree.map(np.zeros_like, params)  # every row's h is 0, as a padding row's is
  grads = jax.grad(lambda p: module.apply({"params": p}, x).sum())(zero_out)
  for g in jax.tree.leaves(grads):
    assert np.all(np.isfinite(g))


def test_tagging_head_scores_each_words_first_piece():
  states, starts = _states(), np.array([[1, 2, 4], [1, 3, 0], [1, 0, 0]])
  module = heads.TaggingHead(4)
  params, p = _init(module, states, starts)
  got = _apply(module, params, states, starts)
  for b in range(B):
    for w in range(3):
      expected = states[b, starts[b, w]] @ p["emissions"]["kernel"] + p["emissions"]["bias"]
      np.testing.assert_allclose(got[b, w], expected, rtol=1e-5, atol=1e-5)


def test_relation_head_reads_the_two_marker_states():
  states = _states()
  head_pos, tail_pos = np.array([1, 4, 2]), np.array([3, 1, 6])
  module = heads.RelationHead(23)
  params, p = _init(module, states, head_pos, tail_pos)
  got = _apply(module, params, states, head_pos, tail_pos)
  assert got.shape == (B, 23) and got.dtype == np.float32
  for b in range(B):
    pair = np.concatenate([states[b, head_pos[b]], states[b, tail_pos[b]]])
    np.testing.assert_allclose(got[b], pair @ p["logits"]["kernel"] + p["logits"]["bias"],
                               rtol=1e-5, atol=1e-5)


def test_word_pair_head_is_biaffine_over_first_pieces():
  states, starts = _states(), np.array([[1, 2, 4, 5], [1, 3, 6, 0], [1, 2, 0, 0]])
  num_classes, features = 5, 6
  module = heads.WordPairHead(num_classes, features)
  params, p = _init(module, states, starts)
  got = _apply(module, params, states, starts)
  assert got.shape == (B, 4, 4, num_classes) and got.dtype == np.float32
  u = p["biaffine"]
  for b in range(B):
    for i in range(4):
      for j in range(4):
        row = np.append(_gelu(states[b, starts[b, i]] @ p["row"]["kernel"] + p["row"]["bias"]), 1)
        col = np.append(_gelu(states[b, starts[b, j]] @ p["col"]["kernel"] + p["col"]["bias"]), 1)
        expected = [row @ u[:, k, :] @ col for k in range(num_classes)]
        np.testing.assert_allclose(got[b, i, j], expected, rtol=1e-4, atol=1e-4)
  # The row and column maps differ, so (i, j) and (j, i) are scored differently.
  assert not np.allclose(got[0, 0, 1], got[0, 1, 0])


def test_word_pair_logits_start_at_unit_scale():
  states = np.random.default_rng(1).normal(size=(4, 16, 64)).astype(np.float32)
  starts = np.tile(np.arange(16), (4, 1))
  module = heads.WordPairHead(26, 32)
  params = jax.jit(module.init)(jax.random.key(0), states, starts)["params"]
  logits = jax.jit(module.apply)({"params": params}, states, starts)
  assert 0.1 < float(np.std(logits)) < 3.0
