"""The experiment entry points: every expected user error ends with one line on stderr and exit
code 2; `--debug` or SHAPCA_DEBUG=1 shows its traceback instead."""

import gzip
import json
import os
import pathlib
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

from shapca_jax import checkpoint
from shapca_jax import launch
from shapca_jax.config import ConfigError
import train_fixtures

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_an_unknown_config_key_is_named_with_the_closest_known_one():
  assert launch.unknown_override(["train.py", "--workdir=w", "--config.fusion.mod=plain"]) == (
      "unknown config key 'fusion.mod' (in '--config.fusion.mod=plain'); the closest known key "
      "is 'fusion.mode'")
  assert launch.unknown_override(["train.py", "--config.lerning_rate.new", "1"]).endswith(
      "the closest known key is 'learning_rate.new'")
  assert launch.unknown_override(["train.py", "--config.fusion.mode=plain", "--config.seed=3",
                                  "--config.fusion", "--", "--config.foo=1"]) is None


def test_the_training_script_ends_an_unknown_key_with_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, str(REPO_ROOT / "experiments" / "train_twitter17.py"), "--config.foo=1",
       f"--workdir={tmp_path / 'run'}"],
      env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "JAX_PLATFORMS": "cpu"},
      capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  assert result.stderr.startswith("error: unknown config key 'foo' (in '--config.foo=1'); the "
                                  "closest known key is ")
  assert result.stderr.count("\n") == 1 and result.stdout == ""
  assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, minilm_dir, embedded_data_dir):
  root = tmp_path_factory.mktemp("launch")
  return (train_fixtures.write_tiny_twitter(embedded_data_dir, root / "data", per_split=4),
          train_fixtures.write_tiny_bert(root / "bert", minilm_dir))


def _empty_valid_split(config, workdir):
  path = pathlib.Path(config.data_dir) / "twitter2017" / "valid.txt"
  path.write_text("\n")
  return f"error: {path}: no examples in the valid split"


def _bad_learning_rate(config, workdir):
  config.learning_rate.encoder = -1.0
  return "error: config.learning_rate.encoder=-1.0 must be > 0"


def _missing_encoder(config, workdir):
  config.text_encoder = str(workdir.parent / "no_such_encoder")
  return f"error: {config.text_encoder}: expected a tokenizer checkpoint folder"


def _workdir_of_another_run(config, workdir):
  other = train_fixtures.tiny_config(config.data_dir, config.text_encoder)
  other.seed = 7
  with checkpoint.TrainCheckpointer(workdir, other.to_dict(), save_every_steps=1) as ckpt:
    ckpt.save_latest(1, {"w": 1.0})
  return (f"error: {workdir.resolve() / 'checkpoints' / 'latest'} holds step 1 written with a "
          "different config; differing keys: seed (checkpoint 7, now 0)")


USER_ERRORS = {"bad data file": _empty_valid_split, "bad config value": _bad_learning_rate,
               "missing encoder folder": _missing_encoder,
               "workdir of another run": _workdir_of_another_run}


def _config(tiny, tmp_path):
  data_dir = train_fixtures.write_tiny_twitter(tiny[0], tmp_path / "data", per_split=4)
  return train_fixtures.tiny_config(data_dir, tiny[1])


@pytest.mark.parametrize("case", sorted(USER_ERRORS))
def test_a_user_error_ends_with_one_line_and_exit_code_2(tiny, tmp_path, case, capsys,
                                                         monkeypatch):
  monkeypatch.delenv(launch.DEBUG_ENV, raising=False)
  config, workdir = _config(tiny, tmp_path), tmp_path / "run"
  expected = USER_ERRORS[case](config, workdir)
  with pytest.raises(SystemExit) as exited:
    launch.run(config, str(workdir))
  assert exited.value.code == 2
  assert capsys.readouterr().err.strip().splitlines()[-1].startswith(expected)


def test_debug_shows_the_traceback_of_a_user_error(tiny, tmp_path, monkeypatch):
  monkeypatch.delenv(launch.DEBUG_ENV, raising=False)
  config = _config(tiny, tmp_path)
  _bad_learning_rate(config, tmp_path)
  with pytest.raises(ConfigError, match="learning_rate.encoder"):
    launch.run(config, str(tmp_path / "run"), debug=True)  # --debug
  monkeypatch.setenv(launch.DEBUG_ENV, "1")
  with pytest.raises(ConfigError, match="learning_rate.encoder"):
    launch.run(config, str(tmp_path / "run"))


# ----------------------------------------------------------------------------- several processes


@pytest.mark.parametrize("environ, expected", [
    ({}, None),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
      "JAX_PROCESS_ID": "3"}, {"num_processes": 4, "process_id": 3}),
    ({"SLURM_NTASKS": "2"}, {"num_processes": None, "process_id": None}),  # JAX detects them
])
def test_distributed_args_come_from_the_launch_environment(environ, expected):
  assert launch.distributed_args(environ) == expected


@pytest.mark.parametrize("environ, message", [
    ({"JAX_NUM_PROCESSES": "2"}, "JAX_COORDINATOR_ADDRESS is set, so JAX_PROCESS_ID must be too"),
    ({"JAX_PROCESS_ID": "0"}, "JAX_COORDINATOR_ADDRESS is set, so JAX_NUM_PROCESSES must be too"),
    ({"JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES='two' must be an"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, "JAX_PROCESS_ID=2 must be >= 0 and < "
                                                        "JAX_NUM_PROCESSES=2"),
    ({"JAX_NUM_PROCESSES": "0", "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES=0 must be >= 1"),
])
def test_a_bad_launch_environment_is_named(environ, message):
  with pytest.raises(ConfigError, match=re.escape(message)):
    launch.distributed_args({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", **environ})


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _train_twitter17(workdir: pathlib.Path, flags: list[str], processes: int, devices: int
                     ) -> list[str]:
  """The training script as ``processes`` processes of ``devices`` CPU devices each (one
  coordinator on this host); returns their stderr, after checking that each exited with 0.
  Runs share a compilation cache beside ``workdir``, so that a resumed run does not compile
  again."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT),
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_COMPILATION_CACHE_DIR=str(workdir.parent / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  if processes > 1:
    env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}",
               JAX_NUM_PROCESSES=str(processes))
  procs = [subprocess.Popen(
      [sys.executable, str(REPO_ROOT / "experiments" / "train_twitter17.py"),
       f"--workdir={workdir}", *flags], env={**env, "JAX_PROCESS_ID": str(i)},
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(processes)]
  stderrs = [p.communicate(timeout=900)[1] for p in procs]
  for p, stderr in zip(procs, stderrs):
    assert p.returncode == 0, stderr[-4000:]
  return stderrs


def _records(workdir: pathlib.Path) -> tuple[dict, list[dict], bytes]:
  results = json.loads((workdir / "results.json").read_text())
  metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  predictions = gzip.decompress((workdir / "test_predictions.jsonl.gz").read_bytes())
  return {split: results[split] for split in ("dev", "test")}, metrics, predictions


def test_two_processes_train_and_resume_like_one_process_with_two_devices(tiny, tmp_path,
                                                                           embedded_data_dir):
  """The multi-process path end to end (TFDS records prepared by process 0, process-local
  batches, evaluation, per-process checkpoint writes and their restore), against the same
  2-device mesh in one process: the run stops after one epoch and is resumed."""
  data_dir = train_fixtures.write_tiny_twitter(embedded_data_dir, tmp_path / "data", per_split=16)
  overrides = {"data_dir": data_dir, "text_encoder": tiny[1], "batch_size": 4,
               "eval_batch_size": 8, "num_epochs": 2, "max_length": 64, "max_buckets": 0,
               "proj_dim": 16, "fusion.num_heads": 2, "align.num_permutations": 4,
               "log_every_steps": 2, "checkpoint_every_steps": 3, "progress_bar": False}
  flags = [f"--config.{key}={value}" for key, value in overrides.items()]
  _train_twitter17(tmp_path / "one", flags, processes=1, devices=2)
  two = tmp_path / "two"
  _train_twitter17(two, [*flags, "--config.stop_after_epochs=1"], processes=2, devices=1)
  stderrs = _train_twitter17(two, flags, processes=2, devices=1)
  assert all("resumed from step" in stderr for stderr in stderrs)
  (scores, metrics, predictions), expected = _records(two), _records(tmp_path / "one")
  assert scores == expected[0]
  assert [m["step"] for m in metrics] == [m["step"] for m in expected[1]]
  for got, want in zip(metrics, expected[1]):
    for key in ("loss", "grad_norm"):
      if key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6)
  assert predictions == expected[2]
