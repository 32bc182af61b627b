"""The `main` every `experiments/train_<dataset>.py` shares: flags, config file, `launch.run`.

An expected user error (an unknown `--config.KEY`, a bad data file, a workdir of another run,
...) ends with one line on stderr and exit code 2; `--debug` (or SHAPCA_DEBUG=1) shows its
traceback.

Imported by the entry scripts as a sibling module (they run as `python experiments/...`).
"""

import pathlib
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from shapca_jax import launch

CONFIGS = pathlib.Path(__file__).parent / "configs"


def main(config_name: str, default_workdir: str) -> None:
  """Parses `--config` (default `configs/<config_name>`) and `--workdir`, then trains."""
  # Before the config flag is defined: defining it applies the overrides of sys.argv.
  message = launch.unknown_override(sys.argv)
  if message and not launch.debug_requested("--debug" in sys.argv):
    launch.exit_with_error(message)
  config = config_flags.DEFINE_config_file(
      "config", str(CONFIGS / config_name), "Experiment config file.", lock_config=True)
  workdir = flags.DEFINE_string("workdir", default_workdir, "Checkpoints and results go here.")
  debug = flags.DEFINE_bool("debug", False, "Show the traceback of user errors too (bad files, "
                            "a bad config, ...); the environment variable SHAPCA_DEBUG=1 does too.")

  def run(argv):
    del argv
    launch.run(config.value, workdir.value, debug=debug.value)  # app.run exits with a return

  app.run(run)
