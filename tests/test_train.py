"""End-to-end training on tiny data: train, evaluate, checkpoint, kill, resume, same numbers."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shapca_jax import train
from shapca_jax.config import ConfigError
import train_fixtures

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, minilm_dir, embedded_data_dir):
  root = tmp_path_factory.mktemp("tiny")
  data_dir = train_fixtures.write_tiny_twitter(embedded_data_dir, root / "data", per_split=20)
  encoder = train_fixtures.write_tiny_bert(root / "bert", minilm_dir)
  return data_dir, encoder


@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory):
  config = train_fixtures.tiny_config(*tiny)
  workdir = tmp_path_factory.mktemp("uninterrupted")
  return config, workdir, train.train_and_evaluate(config, workdir)


def _losses(workdir: pathlib.Path) -> dict[int, float]:
  """Loss per step from the metrics log; a resumed run's replayed steps overwrite the killed ones."""
  losses = {}
  for line in (workdir / train.METRICS_LOG).read_text().splitlines():
    record = json.loads(line)
    if "loss" in record:
      losses[record["step"]] = record["loss"]
  return losses


def test_run_trains_evaluates_and_writes_results(uninterrupted):
  config, workdir, results = uninterrupted
  written = json.loads((workdir / train.RESULTS_FILE).read_text())
  assert written["test"]["f1"] == results["test"]["f1"]
  assert 0.0 <= results["test"]["f1"] <= 1.0
  assert results["test"]["num_gold"] > 0  # every gold entity of the 20 test tweets is counted
  assert results["steps"] == 10  # 20 tweets / batch 4 = 5 steps per epoch, 2 epochs
  losses = _losses(workdir)
  assert sorted(losses) == list(range(1, 11))
  assert all(np.isfinite(v) for v in losses.values())
  assert (workdir / "checkpoints" / "best").is_dir()


def test_killed_run_resumes_to_the_same_numbers(tiny, uninterrupted, tmp_path):
  config, reference_dir, reference = uninterrupted
  workdir = tmp_path / "killed"
  script = (
      "import json, sys\n"
      "import ml_collections\n"
      "from shapca_jax import train\n"
      "config = ml_collections.ConfigDict(json.loads(sys.argv[1]))\n"
      "train.train_and_evaluate(config, sys.argv[2])\n")
  env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
  proc = subprocess.Popen([sys.executable, "-c", script, config.to_json(), str(workdir)], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  checkpoint_6 = workdir / "checkpoints" / "latest" / "6"
  deadline = time.time() + 300
  while not checkpoint_6.is_dir() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  _, stderr = proc.communicate()
  assert checkpoint_6.is_dir(), f"the run never reached step 6: {stderr.decode()[-2000:]}"
  assert not (workdir / train.RESULTS_FILE).exists(), "the run finished before it was killed"

  resumed = train.train_and_evaluate(config, workdir)
  assert resumed["best_step"] == reference["best_step"]
  for split in ("dev", "test"):
    for key in ("precision", "recall", "f1"):
      assert resumed[split][key] == pytest.approx(reference[split][key], abs=1e-9)
  ref_losses, losses = _losses(reference_dir), _losses(workdir)
  assert sorted(losses) == sorted(ref_losses)
  np.testing.assert_allclose([losses[s] for s in sorted(losses)],
                             [ref_losses[s] for s in sorted(ref_losses)], rtol=1e-5)


def test_train_step_compiles_once_per_shape(tiny):
  config = train_fixtures.tiny_config(*tiny)
  data = train.build_data(config, pathlib.Path(config.data_dir).parent / "trace_check")
  model, pretrained = train.build_model(config, data.vocab_size)
  batch = data.train.batch(0)
  params = train.init_params(model, pretrained, batch, jax.random.key(0))
  import optax
  state = train.TrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(1e-3))
  chex.clear_trace_counter()
  step = jax.jit(chex.assert_max_traces(
      lambda s, b, r: train.train_step(s, b, r, align=config.align), n=1))
  for i in range(3):
    state, metrics = step(state, data.train.batch(i), jax.random.key(i))
  assert np.isfinite(float(metrics["loss"]))
  assert float(metrics["align_loss"]) > 0


def test_bad_config_fails_before_any_work(tiny, tmp_path):
  config = train_fixtures.tiny_config(*tiny)
  config.learning_rate.encoder = -1.0
  with pytest.raises(ConfigError, match="learning_rate.encoder"):
    train.train_and_evaluate(config, tmp_path / "bad")
  assert not (tmp_path / "bad").exists()
