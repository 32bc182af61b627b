"""The contenders of experiments/bench_shapley.py compute Shapley values.

A fast but wrong baseline would make the benchmark's ratios meaningless, so each contender
is checked against the exact values: the mean marginal gain over all k! orders, written
here from the softmax-expectation definition (an independent oracle), both on given
permutations and on the permutations it draws itself, as it does when timed.
"""

import itertools
import math
import pathlib
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "experiments"))
import bench_shapley  # noqa: E402  (experiments/ is not a package)

K = 5


def _value(sim, members, j):
  s = sim[list(members), j]
  w = np.exp(s / bench_shapley.TAU)
  return float(np.sum(w * s) / np.sum(w)) if members else 0.0


def _exact(sim):
  phi = np.zeros(sim.shape)
  for order in itertools.permutations(range(K)):
    for j in range(sim.shape[1]):
      for t, i in enumerate(order):
        phi[i, j] += _value(sim, order[:t + 1], j) - _value(sim, order[:t], j)
  return phi / math.factorial(K)


def _contenders():
  """name -> fn(sim, perms), perms being permutations [M, k] or their number M."""
  rng = np.random.default_rng(0)

  def torch_fn(fn):
    def run(sim, perms):
      perms = perms if isinstance(perms, int) else torch.from_numpy(perms)
      return fn(torch.from_numpy(sim), perms).numpy()
    return run

  return {"numpy": lambda sim, perms: bench_shapley.numpy_vectorised(sim, perms, rng),
          "torch_loop": torch_fn(bench_shapley.torch_loop),
          "torch_vec": torch_fn(bench_shapley.torch_vectorised)}


@pytest.fixture(scope="module")
def game():
  sim = bench_shapley._similarities(K, seed=1).astype(np.float64)
  return sim, _exact(sim)


@pytest.mark.parametrize("name", ["numpy", "torch_loop", "torch_vec"])
def test_all_orders_give_the_exact_values(game, name):
  sim, exact = game
  all_orders = np.array(list(itertools.permutations(range(K))))
  np.testing.assert_allclose(_contenders()[name](sim, all_orders), exact, atol=1e-9)


@pytest.mark.parametrize("name", ["numpy", "torch_loop", "torch_vec"])
def test_own_draws_converge_to_the_exact_values(game, name):
  """M = 4000 uniform orders of 5 players: each estimate within 5 standard errors."""
  sim, exact = game
  all_orders = list(itertools.permutations(range(K)))
  gains = np.stack([_contenders()[name](sim, np.array([o])) for o in all_orders])
  stderr = gains.std(axis=0) / np.sqrt(4000)
  torch.manual_seed(0)
  estimate = _contenders()[name](sim, 4000)
  assert np.all(np.abs(estimate - exact) <= 5 * stderr + 1e-9)
