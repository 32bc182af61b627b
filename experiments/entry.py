"""The `main` every `experiments/train_<dataset>.py` shares: flags, config file, `launch.run`.

Imported by the entry scripts as a sibling module (they run as `python experiments/...`).
"""

import pathlib

from absl import app
from absl import flags
from ml_collections import config_flags

from shapca_jax import launch

CONFIGS = pathlib.Path(__file__).parent / "configs"


def main(config_name: str, default_workdir: str) -> None:
  """Parses `--config` (default `configs/<config_name>`) and `--workdir`, then trains."""
  config = config_flags.DEFINE_config_file(
      "config", str(CONFIGS / config_name), "Experiment config file.", lock_config=True)
  workdir = flags.DEFINE_string("workdir", default_workdir, "Checkpoints and results go here.")

  def run(argv):
    del argv
    launch.run(config.value, workdir.value)  # app.run would exit with a returned value

  app.run(run)
