"""Shap-CA on MNRE (multimodal relation extraction, 23 relations with None).

Command (the real data beside the checkout, ../shared/data, is the default):
  python experiments/train_mnre.py --workdir workdirs/mnre

The data layer inserts `<s> </s> <o> </o>` around head and tail; their embedding rows are added
to the text encoder's table (old rows untouched) and the classifier reads the fused states at
`<s>` and `<o>`. Score: micro P/R/F1 over the 22 relations other than None, the model
selected on dev F1. Contexts: MiniCPM-V descriptions (`minicpm`, the detailed ones closest to
the paper's LLaVA-1.5 prompt); `--config.contexts=BLIP|instruct|llavanext|caption` or a JSONL
path picks another captioner. Images sharing an example's image are never its negatives in
the alignment (several MNRE instances share one sentence and image).

Measured on a shared 2-core CPU, all-MiniLM-L6-v2, no images, seed 0, --config.num_epochs=1
--config.max_length=128 --config.max_buckets=0 (764 steps, ~15-18 min running; the contexts cut
at 128 tokens): dev-selected test F1 57.99 with Shapley alignment, 57.57 without (dev 51.65 /
50.59); see docs/relations.md.

On a GPU/TPU with your own checkpoints and the MNRE images:
  python experiments/train_mnre.py --workdir workdirs/mnre_bert_clip \\
    --config.text_encoder=/ckpt/bert-base-uncased \\
    --config.use_image=True --config.image_encoder=/ckpt/clip-vit-base-patch32 \\
    --config.image_dir=/data/mnre_images --config.compute_dtype=bfloat16 --config.num_epochs=10
"""

import pathlib

from shapca_jax.config import default_config

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def get_config():
  config = default_config()
  config.task = "mre"
  config.dataset = "mnre"
  config.data_dir = str(REPO_ROOT.parent / "shared" / "data")
  config.contexts = "minicpm"
  # MiniCPM-V descriptions are long: the joint `text + context` input of 99 % of training
  # instances fits 288 tokens (p99 275, median 96, 30 % over 128; `python -m shapca_jax.data
  # inspect mnre`). The bucket ladder keeps the short majority from padding to that length.
  config.max_length = 288
  config.max_buckets = 4
  return config
