"""Shap-CA on Twitter-2015 (multimodal NER).

Command:
  python experiments/train_twitter15.py --workdir workdirs/twitter15 \\
    --config.data_dir=../shared/data

Twitter-2015's MISC type is spelled OTHER in the files and read as MISC. Only train and valid
exist in the shared copy; a test split must be supplied as twitter2015/test.txt (results.json
then scores it). Same hardware notes as twitter17.py; not yet measured.
"""

from shapca_jax.config import default_config


def get_config():
  config = default_config()
  config.dataset = "twitter2015"
  config.data_dir = "../shared/data"
  config.contexts = "blip2"
  config.missing_context = "empty"  # one tweet of train and one of valid have an empty caption
  return config
