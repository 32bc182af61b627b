"""Trains and evaluates Shap-CA on MNRE; the config file's docstring has the details.

  python experiments/train_mnre.py --workdir workdirs/mnre [--config.KEY=VALUE ...]
"""

import pathlib

from absl import app
from absl import flags
from ml_collections import config_flags

from shapca_jax import launch

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(pathlib.Path(__file__).parent / "configs" / "mnre.py"),
    "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/mnre", "Checkpoints and results go here.")


def main(argv):
  del argv
  launch.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
