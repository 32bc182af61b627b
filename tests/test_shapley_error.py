"""experiments/shapley_error.py: exact values, error metrics and convergence on a tiny model.

The oracles are written here: cosine similarities and the softmax-expectation Shapley values
by enumerating all k! orders in numpy (float64), and the contrastive loss as numpy
cross-entropy.
"""

import itertools
import json
import math
import pathlib
import sys

import jax
import numpy as np
import pytest

from shapca_jax import checkpoint, train
import train_fixtures

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "experiments"))
import shapley_error  # noqa: E402  (experiments/ is not a package)


@pytest.fixture(scope="module")
def config(tmp_path_factory, minilm_dir, embedded_data_dir):
  root = tmp_path_factory.mktemp("tiny")
  data_dir = train_fixtures.write_tiny_twitter(embedded_data_dir, root / "data", per_split=12)
  return train_fixtures.tiny_config(data_dir, train_fixtures.write_tiny_bert(root / "bert",
                                                                             minilm_dir))


@pytest.fixture(scope="module")
def games(config, tmp_path_factory):
  vectors = shapley_error.alignment_vectors(config, tmp_path_factory.mktemp("data"), 2)
  return vectors, shapley_error.make_games(vectors, shapley_error.game_settings(config))


def _cosine(players, anchors):
  players, anchors = (np.asarray(x, np.float64) for x in (players, anchors))
  norm = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
  return norm(players) @ norm(anchors).T


def _brute_force_shapley(sim, tau):
  """Mean marginal gain over all orders of v_j(S) = sum_S softmax_S(s_.j / tau) s_.j."""
  k, anchors = sim.shape

  def value(members, j):
    if not members:
      return 0.0
    s = sim[list(members), j]
    w = np.exp(s / tau)
    return float(np.sum(w * s) / np.sum(w))

  phi = np.zeros(sim.shape)
  for order in itertools.permutations(range(k)):
    for j in range(anchors):
      for t, i in enumerate(order):
        phi[i, j] += value(order[:t + 1], j) - value(order[:t], j)
  return phi / math.factorial(k)


def _loss(scores, tau, groups):
  """Cross-entropy of the pair over players, players of the anchor's image group left out."""
  logits = np.asarray(scores, np.float64) / tau
  k = len(logits)
  out = []
  for j in range(k):
    keep = [i for i in range(k) if i == j or groups[i] != groups[j]]
    out.append(np.log(np.sum(np.exp(logits[keep, j]))) - logits[j, j])
  return float(np.mean(out))


def test_games_are_the_brute_force_values_of_the_model_vectors(config, games):
  vectors, games = games
  align = shapley_error.game_settings(config)
  assert len(games) == 2 * len(vectors) == 4
  for game in games:
    batch = vectors[game.batch]
    players, anchors = shapley_error.DIRECTIONS[game.direction]
    assert batch[players].shape == (config.batch_size, config.proj_dim)
    np.testing.assert_allclose(game.sim, _cosine(batch[players], batch[anchors]), atol=1e-5)
    exact = _brute_force_shapley(np.asarray(game.sim, np.float64), align.tau_u)
    np.testing.assert_allclose(game.exact, exact, atol=1e-5)
    assert game.exact_loss == pytest.approx(_loss(exact, align.tau_c, batch["image_group"]),
                                            rel=1e-4)


def test_error_metrics_of_a_known_estimate(config, games):
  game = games[1][0]
  tau_c = shapley_error.game_settings(config).tau_c
  exact = np.asarray(game.exact, np.float64)
  estimate = exact.copy()
  estimate[0, 1] += 0.3  # player 0 wins anchor 1 by a margin; nothing else changes
  estimate[2, 3] -= 0.1
  wins = np.argmax(exact, axis=0)
  expected_agree = np.mean([wins[j] == np.argmax(estimate[:, j]) for j in range(len(exact))])
  metrics = shapley_error.estimate_errors(estimate, game, tau_c)
  assert metrics["rel_rmse"] == pytest.approx(math.hypot(0.3, 0.1) / np.linalg.norm(exact),
                                              rel=1e-6)
  assert metrics["max_abs"] == pytest.approx(0.3, rel=1e-6)
  assert metrics["argmax_agree"] == pytest.approx(expected_agree)
  assert expected_agree < 1  # the perturbation moved player 0 to the top of anchor 1
  true_change = _loss(estimate, tau_c, game.same_group) - _loss(exact, tau_c, game.same_group)
  assert metrics["loss_diff"] == pytest.approx(true_change, rel=1e-3, abs=1e-6)
  assert metrics["loss_abs"] == abs(metrics["loss_diff"])
  assert metrics["loss_rel"] == pytest.approx(metrics["loss_abs"] / game.exact_loss)


def test_error_vanishes_as_the_permutations_grow(config, games):
  align = shapley_error.game_settings(config)
  records = shapley_error.measure(games[1], align, permutations=[1, 1024], antithetic=[True],
                                  num_keys=2)
  rows = {(r["direction"], r["M"]): r for r in shapley_error.summarise(records)}
  assert len(records) == 4 * 2 * 2 and all(r["n"] == 4 for r in rows.values())
  for direction in shapley_error.DIRECTIONS:
    few, many = rows[direction, 1], rows[direction, 1024]
    # The error falls as 1 / sqrt(M): 32 times from M = 1 to 1024.
    assert many["rel_rmse"] < 0.1 and many["rel_rmse"] < few["rel_rmse"] / 8
    assert many["argmax_agree"] >= few["argmax_agree"]
    assert many["loss_rel"] < 0.01


def test_run_config_reads_a_finished_run(tmp_path, config):
  saved = config.to_dict()
  saved["align"]["num_permutations"] = 7
  (tmp_path / train.RESULTS_FILE).write_text(json.dumps({"config": saved}))
  loaded, model = shapley_error.run_config(tmp_path)
  assert loaded.align.num_permutations == 7 and loaded.batch_size == config.batch_size
  assert "finished run" in model
  with pytest.raises(FileNotFoundError, match="no best checkpoint"):
    shapley_error.run_config(tmp_path / "not_a_run")


def test_a_runs_best_checkpoint_gives_the_vectors(config, games, tmp_path):
  """A run still training: its config and best params are read from beside the checkpoint.
  Its params are training's first ones with the text projection's output layer negated, so
  its text vectors are the negated initial ones and its context vectors the initial ones."""
  initial = games[0]
  data = train.build_data(config, tmp_path / "data")
  _, params = shapley_error.model_and_params(config, data)
  params["text_proj"]["out"] = jax.tree.map(lambda x: -x, params["text_proj"]["out"])
  run = tmp_path / "run"
  with checkpoint.TrainCheckpointer(run, config.to_dict(), save_every_steps=1) as ckpt:
    ckpt.save_best(5, params, {"f1": 0.25})
  loaded, model = shapley_error.run_config(run)
  assert loaded.to_dict() == config.to_dict()
  assert "step 5" in model and "0.2500" in model
  vectors = shapley_error.alignment_vectors(loaded, tmp_path / "data", 2, run_workdir=run)
  for got, want in zip(vectors, initial):
    np.testing.assert_allclose(got["text_vec"], -want["text_vec"], atol=1e-5)
    np.testing.assert_allclose(got["context_vec"], want["context_vec"], atol=1e-5)
