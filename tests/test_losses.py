"""Tests for shapca_jax.losses against PyTorch cross-entropy and brute-force Shapley values."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from shapca_jax import losses, shapley

TAU_U = TAU_C = 0.1


def _unit_rows(rng, k, d):
  x = rng.normal(size=(k, d))
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _torch_loss(scores, tau, same_group=None, valid=None):
  """Cross-entropy over players (rows) for each anchor (column), paired target on the diagonal."""
  k = scores.shape[0]
  logits = torch.tensor(scores, dtype=torch.float64).T / tau  # [anchors, players]
  if same_group is not None:
    left_out = torch.tensor(np.asarray(same_group)[:, None] == np.asarray(same_group)[None, :])
    logits = logits.masked_fill(left_out & ~torch.eye(k, dtype=torch.bool), -torch.inf)
  anchors = np.arange(k) if valid is None else np.flatnonzero(valid)
  if valid is not None:
    logits = logits.masked_fill(~torch.tensor(valid)[None, :] & ~torch.eye(k, dtype=torch.bool),
                                -torch.inf)
  target = torch.arange(k)
  return float(torch.nn.functional.cross_entropy(logits[anchors], target[anchors]))


def _exact_softmax_shapley(sim):
  """Brute-force Shapley values of the softmax_expectation games over all k! orders."""
  k = sim.shape[0]

  def value(members, j):
    if not members:
      return 0.0
    s = sim[list(members), j]
    w = np.exp(s / TAU_U)
    return np.sum(w * s) / np.sum(w)

  phi = np.zeros_like(sim)
  for order in itertools.permutations(range(k)):
    for j in range(k):
      for t, i in enumerate(order):
        phi[i, j] += value(order[:t + 1], j) - value(order[:t], j)
  return phi / math.factorial(k)


@pytest.mark.parametrize("masks", ["none", "groups", "valid", "both"])
def test_contrastive_loss_matches_torch_cross_entropy(masks):
  rng = np.random.default_rng(0)
  scores = rng.normal(size=(6, 6))
  groups = np.array([0, 0, 1, 2, 2, 2]) if masks in ("groups", "both") else None
  valid = np.array([True, True, True, False, True, True]) if masks in ("valid", "both") else None
  loss = losses.contrastive_loss(jnp.asarray(scores, jnp.float32), 0.5,
                                 None if groups is None else jnp.asarray(groups),
                                 None if valid is None else jnp.asarray(valid))
  np.testing.assert_allclose(loss, _torch_loss(scores, 0.5, groups, valid), rtol=1e-5)


def test_group_ids_and_group_matrix_agree_and_ignore_left_out_scores():
  rng = np.random.default_rng(1)
  scores = jnp.asarray(rng.normal(size=(5, 5)), jnp.float32)
  groups = jnp.asarray([3, 1, 3, 1, 7])
  by_ids = losses.contrastive_loss(scores, 0.1, groups)
  by_matrix = losses.contrastive_loss(scores, 0.1, groups[:, None] == groups[None, :])
  np.testing.assert_allclose(by_ids, by_matrix, rtol=1e-6)
  # Scores of same-group non-pairs are not negatives: changing them changes nothing.
  changed = scores.at[0, 2].set(50.0).at[3, 1].set(-50.0)
  np.testing.assert_allclose(losses.contrastive_loss(changed, 0.1, groups), by_ids, rtol=1e-6)


def test_infonce_alignment_is_the_weighted_sum_of_four_cross_entropies():
  rng = np.random.default_rng(2)
  t, c, u = (_unit_rows(rng, 5, 8) for _ in range(3))
  config = losses.AlignmentConfig(kind="infonce", lambda_ct=0.3, lambda_ci=0.7)
  total, terms = losses.alignment_loss(*(jnp.asarray(x, jnp.float32) for x in (t, c, u)),
                                       jax.random.key(0), config)
  expected = {"c2t": _torch_loss(c @ t.T, TAU_C), "t2c": _torch_loss(t @ c.T, TAU_C),
              "c2i": _torch_loss(c @ u.T, TAU_C), "i2c": _torch_loss(u @ c.T, TAU_C)}
  assert set(terms) == set(expected)
  for name, value in expected.items():
    np.testing.assert_allclose(terms[name], value, rtol=1e-5)
  weighted = 0.3 * (expected["c2t"] + expected["t2c"]) + 0.7 * (expected["c2i"] + expected["i2c"])
  np.testing.assert_allclose(total, weighted, rtol=1e-5)


def test_shapley_alignment_approaches_the_loss_on_exact_shapley_values():
  """With many permutations each direction's loss nears cross-entropy on brute-force phi.

  dL/dphi is up to 1 / tau_c = 10 and phi's Monte Carlo error at M = 2048 is ~1e-3, hence
  the tolerance; swapping players and anchors moves c2t and t2c by ~0.6.
  """
  rng = np.random.default_rng(3)
  t, c, u = (_unit_rows(rng, 5, 8) for _ in range(3))
  config = losses.AlignmentConfig(num_permutations=2048)
  total, terms = losses.alignment_loss(*(jnp.asarray(x, jnp.float32) for x in (t, c, u)),
                                       jax.random.key(1), config)
  pairs = {"c2t": (c, t), "t2c": (t, c), "c2i": (c, u), "i2c": (u, c)}
  for name, (players, anchors) in pairs.items():
    expected = _torch_loss(_exact_softmax_shapley(players @ anchors.T), TAU_C)
    np.testing.assert_allclose(terms[name], expected, atol=0.03, err_msg=name)
  np.testing.assert_allclose(total, 0.1 * sum(terms.values()), rtol=1e-6)


@pytest.mark.parametrize("config, with_image, expected", [
    (losses.AlignmentConfig(lambda_ci=0.0), True, {"c2t", "t2c"}),
    (losses.AlignmentConfig(lambda_ct=0.0), True, {"c2i", "i2c"}),
    (losses.AlignmentConfig(), False, {"c2t", "t2c"}),
    (losses.AlignmentConfig(lambda_ct=0.0), False, set()),
])
def test_directions_switch_off(config, with_image, expected):
  rng = np.random.default_rng(4)
  t, c, u = (jnp.asarray(_unit_rows(rng, 4, 8), jnp.float32) for _ in range(3))
  total, terms = losses.alignment_loss(t, c, u if with_image else None, jax.random.key(0), config)
  assert set(terms) == expected
  np.testing.assert_allclose(total, sum(0.1 * v for v in terms.values()) if terms else 0.0,
                             rtol=1e-6)


@pytest.mark.parametrize("kind, utility", [("shapley", "softmax_expectation"),
                                           ("shapley", "mean_embedding"),
                                           ("infonce", "softmax_expectation")])
def test_gradient_matches_finite_differences(kind, utility):
  rng = np.random.default_rng(5)
  config = losses.AlignmentConfig(kind=kind, utility=utility, num_permutations=8)
  groups = jnp.asarray([0, 1, 1, 2, 3])
  valid = jnp.asarray([True, True, True, True, False])
  key = jax.random.key(2)
  with jax.enable_x64(True):
    def objective(t, c, u):
      return losses.alignment_loss(t, c, u, key, config, groups, valid)[0]

    args = tuple(jnp.asarray(rng.normal(size=(5, 6))) for _ in range(3))
    grads = jax.grad(objective, argnums=(0, 1, 2))(*args)
    for _ in range(3):
      direction = tuple(jnp.asarray(rng.normal(size=a.shape)) for a in args)
      eps = 1e-6
      plus = objective(*(a + eps * v for a, v in zip(args, direction)))
      minus = objective(*(a - eps * v for a, v in zip(args, direction)))
      analytic = sum(jnp.sum(g * v) for g, v in zip(grads, direction))
      np.testing.assert_allclose(analytic, (plus - minus) / (2 * eps), rtol=1e-6, atol=1e-9)


def test_padding_is_invisible_to_infonce():
  rng = np.random.default_rng(6)
  t, c = (jnp.asarray(_unit_rows(rng, 6, 8), jnp.float32) for _ in range(2))
  config = losses.AlignmentConfig(kind="infonce")
  valid = jnp.arange(6) < 4
  padded = losses.alignment_loss(t, c, None, jax.random.key(0), config, valid=valid)[0]
  trimmed = losses.alignment_loss(t[:4], c[:4], None, jax.random.key(0), config)[0]
  np.testing.assert_allclose(padded, trimmed, rtol=1e-6)


def test_config_errors_name_the_key():
  with pytest.raises(ValueError, match="'kind'"):
    losses.AlignmentConfig(kind="cosine")
  with pytest.raises(ValueError, match="'tau_c'"):
    losses.AlignmentConfig(tau_c=0.0)
  with pytest.raises(ValueError, match="'num_permutations'"):
    losses.AlignmentConfig(num_permutations=0)
  with pytest.raises(ValueError, match="unknown alignment config key 'lambda_xy'"):
    losses.AlignmentConfig.from_mapping({"lambda_xy": 1.0})
  assert losses.AlignmentConfig.from_mapping({"tau_u": 0.2}).tau_u == 0.2
  with pytest.raises(ValueError, match="square"):
    losses.contrastive_loss(jnp.zeros((3, 4)), 0.1)


def _np_infonce(scores, tau, groups, valid):
  """Mean over valid anchors j of -log softmax over j's own player and its negatives."""
  k = len(scores)
  total = 0.0
  for j in np.flatnonzero(valid):
    candidates = [i for i in range(k) if i == j or (valid[i] and groups[i] != groups[j])]
    logits = scores[candidates, j] / tau
    total += np.log(np.sum(np.exp(logits - logits.max()))) + logits.max() - scores[j, j] / tau
  return total / np.sum(valid)


def _np_mc_shapley(sim, orders, valid):
  """Mean marginal gain along `orders` of the softmax_expectation games; invalid players add
  nothing to a coalition."""
  k = len(sim)
  phi = np.zeros_like(sim)
  w = np.exp(sim / TAU_U) * valid[:, None]
  for order in orders:
    num, den, before = np.zeros(k), np.zeros(k), np.zeros(k)
    for i in order:
      num, den = num + w[i] * sim[i], den + w[i]
      after = np.divide(num, den, out=np.zeros(k), where=den > 0)
      phi[i] += after - before
      before = after
  return phi / len(orders)


def _np_negatives(groups, valid):
  k = len(groups)
  return ((groups[:, None] != groups[None, :]) & valid[:, None] & valid[None, :]
          & ~np.eye(k, dtype=bool))


def _np_gradient(f, x, eps=1e-6):
  grad = np.zeros_like(x)
  for index in np.ndindex(*x.shape):
    step = np.zeros_like(x)
    step[index] = eps
    grad[index] = (f(x + step) - f(x - step)) / (2 * eps)
  return grad


@pytest.mark.parametrize("kind", ["shapley", "infonce"])
def test_alignment_diagnostics_match_numpy(kind):
  """Every diagnostic of each direction against a NumPy recomputation: the Shapley values from
  the permutations the loss draws, the gradients by central differences in float64."""
  rng = np.random.default_rng(7)
  k, num = 6, 3
  t, c, u = (_unit_rows(rng, k, 8) for _ in range(3))
  t[1] = (0.9 * c[1] + 0.1 * t[1]) / np.linalg.norm(0.9 * c[1] + 0.1 * t[1])  # a sure c-t hit
  groups = np.array([0, 1, 1, 2, 3, 4])
  valid = np.array([True, True, True, True, True, False])
  config = losses.AlignmentConfig(kind=kind, num_permutations=num, lambda_ci=0.5)
  key = jax.random.key(3)
  got = losses.alignment_diagnostics(*(jnp.asarray(x, jnp.float32) for x in (t, c, u)), key,
                                     config, jnp.asarray(groups), jnp.asarray(valid))
  pairs = {"c2t": (c, t), "t2c": (t, c), "c2i": (c, u), "i2c": (u, c)}
  assert set(got) == {f"{d}_{m}" for d in pairs for m in losses.DIAGNOSTICS}
  negatives = _np_negatives(groups, valid)
  for (name, (players, anchors)), direction_key in zip(
      pairs.items(), jax.random.split(key, len(pairs))):
    sim = players @ anchors.T
    perms = np.asarray(shapley.sample_permutations(direction_key, num, k))
    orders = np.concatenate([perms, perms[:, ::-1]])
    shapley_values = lambda s, orders=orders: _np_mc_shapley(s, orders, valid)
    scores = shapley_values(sim) if kind == "shapley" else sim
    hits = [sim[j, j] > sim[negatives[:, j], j].max() for j in np.flatnonzero(valid)]
    margin = np.mean(np.diagonal(scores)[valid]) - np.mean(scores[negatives])
    shapley_grad = _np_gradient(lambda s: _np_infonce(shapley_values(s), TAU_C, groups, valid),
                                sim)
    infonce_grad = _np_gradient(lambda s: _np_infonce(s, TAU_C, groups, valid), sim)
    cosine = np.sum(shapley_grad * infonce_grad) / (
        np.linalg.norm(shapley_grad) * np.linalg.norm(infonce_grad))
    np.testing.assert_allclose(got[f"{name}_top1"], np.mean(hits), err_msg=name)
    np.testing.assert_allclose(got[f"{name}_phi_margin"], margin, rtol=1e-4, atol=1e-6,
                               err_msg=name)
    np.testing.assert_allclose(got[f"{name}_shapley_infonce_grad_cos"], cosine, rtol=1e-4,
                               err_msg=name)
  assert 0 < got["c2t_top1"] < 1
