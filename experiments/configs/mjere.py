"""Shap-CA on JMERE (the paper's MJERE: joint multimodal entity-relation extraction).

Command (the real data beside the checkout, ../shared/data, is the default):
  python experiments/train_mjere.py --workdir workdirs/mjere

A biaffine word-pair head scores the 26 grid classes of METHOD §1 (none, 4 entity types, 21
relations) over first-word-piece states, trained with cross-entropy on the valid cells of the
gold grid. Prediction: the jitted argmax grid (`wordpair.predict_grid`), decoded on the host
(`wordpair.decode_grid`) into entities and quintuples. Score: exact-match quintuple P/R/F1
(the dev selection metric) and entity P/R/F1. `results.json` also holds the gold-grid
ceiling: what the decoder recovers from the gold grids themselves (quintuple F1 ~0.93 on dev,
since a grid cell does not store a relation's direction). Contexts as for MNRE (`minicpm`
default, MNRE's caption files joined on the image id).

Measured on a shared 2-core CPU, all-MiniLM-L6-v2, no images, seed 0, --config.num_epochs=1
--config.max_length=128 --config.max_buckets=0 (225 steps, 5.3 min wall; contexts cut at 128
tokens): dev-selected test quintuple F1 23.82 with Shapley alignment, 26.95 without (entity F1
63.7 / 66.0); 2 epochs (450 steps, 10-15 min): 32.59 / 36.06 (entity F1 68.4 / 68.9); see
docs/relations.md. On a GPU/TPU with your own BERT, CLIP and the MNRE images, pass the flags
shown in configs/mnre.py to this script (e.g. with --config.num_epochs=20).
"""

import pathlib

from shapca_jax.config import default_config

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def get_config():
  config = default_config()
  config.task = "mjere"
  config.dataset = "jmere"
  config.data_dir = str(REPO_ROOT.parent / "shared" / "data")
  config.contexts = "minicpm"
  # The contexts' length as in configs/mnre.py: 288 tokens hold 99 % of joint inputs (p99 269).
  config.max_length = 288
  config.max_buckets = 4
  return config
