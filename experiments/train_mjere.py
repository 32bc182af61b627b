"""Trains and evaluates Shap-CA on JMERE (MJERE); the config file's docstring has the details.

  python experiments/train_mjere.py --workdir workdirs/mjere [--config.KEY=VALUE ...]
"""

import entry

if __name__ == "__main__":
  entry.main("mjere.py", "workdirs/mjere")
