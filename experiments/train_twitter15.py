"""Trains and evaluates Shap-CA on Twitter-2015; the config file's docstring has the details.

  python experiments/train_twitter15.py --workdir workdirs/twitter15 [--config.KEY=VALUE ...]
"""

import entry

if __name__ == "__main__":
  entry.main("twitter15.py", "workdirs/twitter15")
