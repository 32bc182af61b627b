"""Tests for shapca_jax.shapley against brute-force permutation enumeration in NumPy."""

import itertools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shapca_jax import shapley

TAU = 0.1


def _unit_rows(rng, k, d):
  x = rng.normal(size=(k, d))
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _setup(rng, k, num_anchors=3, d=6):
  """Players, anchors and their cosine similarities, float64 NumPy."""
  players, anchors = _unit_rows(rng, k, d), _unit_rows(rng, num_anchors, d)
  return players, anchors, players @ anchors.T


def _coalition_value(utility, members, j, sim, players, anchors):
  """v_j(S) straight from the METHOD §4 definitions; v(empty) = 0."""
  if not members:
    return 0.0
  s = sim[list(members), j]
  if utility == "softmax_expectation":
    w = np.exp(s / TAU)
    return float(np.sum(w * s) / np.sum(w))
  if utility == "logsumexp":
    return float(TAU * np.log(np.sum(np.exp(s / TAU))))
  if utility == "uniform_mean":
    return float(np.mean(s))
  mean = players[list(members)].mean(axis=0)
  return float(mean @ anchors[j] / (np.linalg.norm(mean) * np.linalg.norm(anchors[j])))


def _brute_force_shapley(utility, sim, players, anchors):
  """Average marginal gain over all k! orders."""
  k, num_anchors = sim.shape
  phi = np.zeros((k, num_anchors))
  for order in itertools.permutations(range(k)):
    for j in range(num_anchors):
      for t, i in enumerate(order):
        phi[i, j] += (_coalition_value(utility, order[:t + 1], j, sim, players, anchors)
                      - _coalition_value(utility, order[:t], j, sim, players, anchors))
  return phi / math.factorial(k)


def _f32(*arrays):
  return tuple(jnp.asarray(a, jnp.float32) for a in arrays)


@pytest.mark.parametrize("utility", shapley.UTILITIES)
def test_exact_matches_brute_force_over_all_orders(utility):
  players, anchors, sim = _setup(np.random.default_rng(0), k=5)
  expected = _brute_force_shapley(utility, sim, players, anchors)
  sim32, players32 = _f32(sim, players)
  phi = shapley.exact_shapley(sim32, utility=utility, tau=TAU, players=players32)
  np.testing.assert_allclose(phi, expected, atol=2e-6)


def test_uniform_mean_closed_form_matches_enumeration():
  _, _, sim = _setup(np.random.default_rng(1), k=7, num_anchors=4)
  expected = _brute_force_shapley("uniform_mean", sim, None, None)
  np.testing.assert_allclose(shapley.uniform_mean_shapley(jnp.asarray(sim)), expected, atol=1e-6)


@pytest.mark.parametrize("utility", shapley.UTILITIES)
def test_mc_converges_to_exact(utility):
  players, _, sim = _setup(np.random.default_rng(2), k=8, num_anchors=8, d=16)
  sim32, players32 = _f32(sim, players)
  exact = np.asarray(shapley.exact_shapley(sim32, utility=utility, tau=TAU, players=players32))
  errors = {}
  for m in (64, 4096):
    phi, stderr = shapley.mc_shapley(sim32, jax.random.key(7), num_permutations=m, utility=utility,
                                     tau=TAU, antithetic=False, return_stderr=True, players=players32)
    errors[m] = np.sqrt(np.mean((np.asarray(phi) - exact)**2))
    # Every entry within 5 standard errors of the exact value.
    assert np.all(np.abs(np.asarray(phi) - exact) <= 5 * np.asarray(stderr) + 1e-6)
  # The error shrinks like 1 / sqrt(M) (a factor 8 here), and the stated bound at M = 4096.
  assert errors[4096] < errors[64] / 3
  assert np.max(np.abs(np.asarray(phi) - exact)) < 0.01


def test_mc_is_unbiased_for_the_uniform_mean_closed_form_at_512_players():
  """Far beyond enumeration: the mean over 32 keys sits on the closed form.

  One run's per-entry standard error is unreliable here (a player joining first, with
  probability 1/k, gains far more than usual), so the spread over keys is the yardstick.
  """
  sim = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, size=(512, 4)), jnp.float32)
  keys = jax.random.split(jax.random.key(0), 32)
  runs = jax.vmap(lambda key: shapley.mc_shapley(sim, key, num_permutations=64,
                                                 utility="uniform_mean"))(keys)
  exact = np.asarray(shapley.uniform_mean_shapley(sim))
  z = (np.asarray(runs.mean(axis=0)) - exact) / (np.asarray(runs.std(axis=0)) / np.sqrt(32))
  assert 0.8 < np.sqrt(np.mean(z**2)) < 1.25
  assert np.abs(z).max() < 6
  assert np.sqrt(np.mean((np.asarray(runs[0]) - exact)**2)) < 0.005


@pytest.mark.parametrize("utility", shapley.UTILITIES)
@pytest.mark.parametrize("antithetic", [False, True])
def test_each_permutation_is_efficient(utility, antithetic):
  """One order's marginal gains add up to v_j(N) - v_j(empty) for every anchor."""
  rng = np.random.default_rng(4)
  players, anchors, sim = _setup(rng, k=9, num_anchors=4)
  sim32, players32 = _f32(sim, players)
  game = shapley.make_game(sim32, utility, TAU, players32)
  grand = [_coalition_value(utility, range(9), j, sim, players, anchors) for j in range(4)]
  for _ in range(3):
    perm = jnp.asarray(rng.permutation(9)[None, :])
    phi = shapley.shapley_from_permutations(game, perm, antithetic=antithetic)
    np.testing.assert_allclose(np.sum(phi, axis=0), grand, atol=2e-6)


def test_additive_game_is_exact_with_one_permutation():
  weights = jnp.asarray(np.random.default_rng(5).normal(size=(10, 3)), jnp.float32)
  game = shapley.Game((weights,), lambda sums, _: sums[0])
  perm = jnp.asarray(np.random.default_rng(6).permutation(10)[None, :])
  np.testing.assert_allclose(shapley.shapley_from_permutations(game, perm), weights, atol=1e-6)
  np.testing.assert_allclose(shapley.exact_game_shapley(game), weights, atol=1e-6)


@pytest.mark.parametrize("utility", shapley.UTILITIES)
def test_symmetric_players_share_their_value(utility):
  rng = np.random.default_rng(7)
  players, _, sim = _setup(rng, k=6)
  players[4], sim[4] = players[1], sim[1]
  phi = np.asarray(shapley.exact_shapley(*_f32(sim), utility=utility, tau=TAU,
                                         players=_f32(players)[0]))
  np.testing.assert_allclose(phi[4], phi[1], atol=1e-6)


@pytest.mark.parametrize("utility", shapley.UTILITIES)
def test_masked_player_is_a_null_player(utility):
  """A masked player gets 0 and leaves the others' values as in the game without it."""
  players, _, sim = _setup(np.random.default_rng(8), k=6)
  sim32, players32 = _f32(sim, players)
  mask = jnp.arange(6) != 2
  keep = np.flatnonzero(mask)
  without = shapley.exact_shapley(sim32[keep], utility=utility, tau=TAU, players=players32[keep])
  exact = shapley.exact_shapley(sim32, utility=utility, tau=TAU, players=players32,
                                player_mask=mask)
  np.testing.assert_allclose(exact[keep], without, atol=1e-6)
  np.testing.assert_allclose(exact[2], 0, atol=1e-6)  # enumeration sums +- terms
  mc = shapley.mc_shapley(sim32, jax.random.key(0), num_permutations=16, utility=utility,
                          tau=TAU, players=players32, player_mask=mask)
  # Joining changes no coalition sum: 0 up to the rounding of v(S + i) - v(S), whose two
  # values XLA may compute in different fused loops.
  np.testing.assert_allclose(mc[2], 0, atol=1e-7)
  np.testing.assert_allclose(mc.sum(axis=0), without.sum(axis=0), atol=1e-5)


def test_antithetic_pairs_beat_independent_orders_at_equal_cost():
  """8 orders as 4 permutation/reverse pairs vs 8 independent permutations, over 300 keys."""
  _, _, sim = _setup(np.random.default_rng(9), k=8, num_anchors=8, d=16)
  sim32, = _f32(sim)
  exact = shapley.exact_shapley(sim32, tau=TAU)
  keys = jax.random.split(jax.random.key(1), 300)

  def mse(num_permutations, antithetic):
    phi = jax.vmap(lambda key: shapley.mc_shapley(
        sim32, key, num_permutations=num_permutations, tau=TAU, antithetic=antithetic))(keys)
    return float(jnp.mean((phi - exact)**2))

  assert mse(4, antithetic=True) < 0.85 * mse(8, antithetic=False)


@pytest.mark.parametrize("antithetic", [False, True])
def test_stderr_matches_spread_over_keys(antithetic):
  _, _, sim = _setup(np.random.default_rng(10), k=6, num_anchors=6)
  sim32, = _f32(sim)
  keys = jax.random.split(jax.random.key(2), 200)
  phi, stderr = jax.vmap(lambda key: shapley.mc_shapley(
      sim32, key, num_permutations=32, tau=TAU, antithetic=antithetic, return_stderr=True))(keys)
  ratio = float(jnp.mean(stderr) / jnp.mean(jnp.std(phi, axis=0)))
  assert 0.85 < ratio < 1.15


def test_chunked_scan_and_vmap_agree_with_plain_calls():
  rng = np.random.default_rng(11)
  sims = jnp.asarray(rng.uniform(-1, 1, size=(3, 7, 5)), jnp.float32)
  keys = jax.random.split(jax.random.key(3), 3)
  batched = jax.vmap(lambda s, key: shapley.mc_shapley(s, key, num_permutations=12))(sims, keys)
  for s, key, phi in zip(sims, keys, batched):
    np.testing.assert_allclose(shapley.mc_shapley(s, key, num_permutations=12), phi, atol=1e-6)
    chunked = shapley.mc_shapley(s, key, num_permutations=12, chunk_size=4)
    np.testing.assert_allclose(chunked, phi, atol=1e-6)


def test_sample_permutations_order_players_by_random_bits():
  """Counting (small k) orders by the top 32 - ceil(log2 k) bits, sorting (large k) by all 32
  bits; both break ties by index, as a stable argsort does."""
  key = jax.random.key(4)
  for k, dropped_bits in ((40, 6), (100, 0)):
    bits = np.asarray(jax.random.bits(key, (50, k), jnp.uint32))
    expected = np.argsort(bits >> dropped_bits, axis=1, kind="stable")
    np.testing.assert_array_equal(shapley.sample_permutations(key, 50, k), expected)


def test_sample_permutations_are_uniform():
  perms = np.asarray(shapley.sample_permutations(jax.random.key(5), 24000, 4))
  counts = np.unique(perms @ 4**np.arange(4), return_counts=True)[1]
  assert len(counts) == 24
  chi2 = np.sum((counts - 1000)**2 / 1000)
  assert chi2 < 50  # 23 degrees of freedom: P(chi2 > 50) < 0.001


def test_one_trace_across_new_keys():
  traced = jax.jit(chex.assert_max_traces(shapley.mc_shapley.__wrapped__, n=1),
                   static_argnames=("num_permutations",))
  sim = jnp.zeros((6, 6))
  for seed in range(3):
    traced(sim, jax.random.key(seed), num_permutations=8)
  for key in jax.random.split(jax.random.key(9), 3):
    traced(sim, key, num_permutations=8)


# mean_embedding differentiates through the Gram path too; the other utilities share the
# softmax_expectation code path.
@pytest.mark.parametrize("utility", ["softmax_expectation", "mean_embedding"])
def test_gradient_matches_finite_differences(utility):
  rng = np.random.default_rng(12)
  players, anchors, _ = _setup(rng, k=5, num_anchors=5)
  weights = rng.normal(size=(5, 5))
  key = jax.random.key(6)
  with jax.enable_x64(True):
    def objective(players, anchors):
      sim = shapley.cosine_similarity(players, anchors)
      phi = shapley.mc_shapley(sim, key, num_permutations=6, utility=utility, tau=TAU,
                               players=players)
      return jnp.sum(jnp.asarray(weights) * phi)

    args = (jnp.asarray(players), jnp.asarray(anchors))
    grads = jax.grad(objective, argnums=(0, 1))(*args)
    for _ in range(3):
      direction = tuple(jnp.asarray(rng.normal(size=a.shape)) for a in args)
      eps = 1e-6
      plus = objective(*(a + eps * v for a, v in zip(args, direction)))
      minus = objective(*(a - eps * v for a, v in zip(args, direction)))
      numeric = (plus - minus) / (2 * eps)
      analytic = sum(jnp.sum(g * v) for g, v in zip(grads, direction))
      np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


def test_cosine_similarity_matches_numpy():
  rng = np.random.default_rng(13)
  x, y = rng.normal(size=(4, 5)), rng.normal(size=(3, 5))
  expected = (x @ y.T) / np.outer(np.linalg.norm(x, axis=1), np.linalg.norm(y, axis=1))
  np.testing.assert_allclose(shapley.cosine_similarity(*_f32(x, y)), expected, atol=1e-6)


def test_bad_input_is_rejected_with_a_clear_error():
  sim = jnp.zeros((4, 4))
  with pytest.raises(ValueError, match="utility must be one of"):
    shapley.make_game(sim, utility="max")
  with pytest.raises(ValueError, match="needs the player vectors"):
    shapley.make_game(sim, utility="mean_embedding")
  with pytest.raises(ValueError, match="sim must be"):
    shapley.make_game(jnp.zeros(4))
  with pytest.raises(ValueError, match="tau must be positive"):
    shapley.make_game(sim, tau=0.0)
  with pytest.raises(ValueError, match="exceeds"):
    shapley.exact_shapley(jnp.zeros((shapley.EXACT_MAX_PLAYERS + 1, 2)))
  with pytest.raises(ValueError, match="must divide"):
    shapley.mc_shapley(sim, jax.random.key(0), num_permutations=6, chunk_size=4)


def _marginal_gains(utility, order, sim, players, anchors):
  """gains[i, j]: v_j(players before i, and i) - v_j(players before i) in `order`."""
  gains = np.zeros(sim.shape)
  for t, i in enumerate(order):
    for j in range(sim.shape[1]):
      gains[i, j] = (_coalition_value(utility, list(order[:t + 1]), j, sim, players, anchors)
                     - _coalition_value(utility, list(order[:t]), j, sim, players, anchors))
  return gains


@pytest.mark.parametrize("utility", shapley.UTILITIES)
@pytest.mark.parametrize("antithetic", [False, True])
def test_cpu_walk_and_parallel_draws_are_marginal_gains(utility, antithetic):
  """CPU walks the orders in one scan, GPU/TPU use parallel cumsums: both give each draw's
  marginal gains (an order's averaged with its reverse's when antithetic)."""
  rng = np.random.default_rng(14)
  players, anchors, sim = _setup(rng, k=7, num_anchors=4)
  game = shapley.make_game(*_f32(sim), utility, TAU, _f32(players)[0])
  perms = np.stack([rng.permutation(7) for _ in range(5)])
  expected = np.stack([
      0.5 * (_marginal_gains(utility, p, sim, players, anchors)
             + _marginal_gains(utility, p[::-1], sim, players, anchors)) if antithetic
      else _marginal_gains(utility, p, sim, players, anchors) for p in perms], axis=1)
  args = (game, jnp.asarray(perms), jnp.asarray(np.argsort(perms, axis=1)), antithetic)
  for draws in (shapley._walk_draws, shapley._parallel_draws):
    np.testing.assert_allclose(draws(*args, per_draw=True), expected, atol=2e-6)
    np.testing.assert_allclose(draws(*args, per_draw=False)[:, 0], expected.sum(axis=1), atol=1e-5)
