"""The experiment entry points: every expected user error ends with one line on stderr and exit
code 2; `--debug` or SHAPCA_DEBUG=1 shows its traceback instead."""

import os
import pathlib
import subprocess
import sys

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
