"""Shap-CA on Twitter-2017 (multimodal NER): the project's main job.

Command (fresh machine: `make run` does the same after installing):
  python experiments/train_twitter17.py --workdir workdirs/twitter17

Hardware and time: a 2-core CPU with the bundled all-MiniLM-L6-v2 text encoder, no images,
BLIP-2 captions as contexts, Shapley context-text alignment, 3 epochs: measured 13.5 minutes
(812 s, `make run` with setup, the CPU shared with other jobs), 0.85 steps/s, dev-selected
test F1 81.04 (P 80.95, R 81.13), dev F1 81.19. The short ablation rows are in
docs/training.md; converged, seeded suites in docs/results/.

On a GPU/TPU with your own checkpoints and images:
  python experiments/train_twitter17.py --workdir workdirs/t17_bert_clip \\
    --config.text_encoder=/ckpt/bert-base-uncased \\
    --config.use_image=True --config.image_encoder=/ckpt/clip-vit-base-patch32 \\
    --config.image_dir=/data/twitter2017_images --config.compute_dtype=bfloat16 \\
    --config.num_epochs=30

Every METHOD §7 ablation is one flag (see shapca_jax/config.py), e.g.
  --config.align.kind=none (context without alignment), --config.align.kind=infonce,
  --config.use_context=False --config.align.kind=none (text only), --config.contexts=pgim.
"""

import pathlib

from shapca_jax.config import default_config

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def get_config():
  config = default_config()
  config.dataset = "twitter2017"
  config.data_dir = str(REPO_ROOT / "data")
  config.contexts = "blip2"
  return config
