"""Trains and evaluates Shap-CA on Twitter-2017; the config file's docstring has the details.

  python experiments/train_twitter17.py --workdir workdirs/twitter17 [--config.KEY=VALUE ...]
"""

import entry

if __name__ == "__main__":
  entry.main("twitter17.py", "workdirs/twitter17")
