"""Trains and evaluates Shap-CA on MNRE; the config file's docstring has the details.

  python experiments/train_mnre.py --workdir workdirs/mnre [--config.KEY=VALUE ...]
"""

import entry

if __name__ == "__main__":
  entry.main("mnre.py", "workdirs/mnre")
