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

Measured on a 2-core CPU shared with other jobs, all-MiniLM-L6-v2, no images: see the
README's relation section.

On a GPU/TPU with your own checkpoints and the MNRE images:
  python experiments/train_mjere.py --workdir workdirs/mjere_bert_clip \\
    --config.text_encoder=/ckpt/bert-base-uncased \\
    --config.use_image=True --config.image_encoder=/ckpt/clip-vit-base-patch32 \\
    --config.image_dir=/data/mnre_images --config.compute_dtype=bfloat16 --config.num_epochs=20
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
  return config
