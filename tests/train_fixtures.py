"""Tiny data sets and checkpoints for end-to-end runs (shared by the training tests)."""

import pathlib
import shutil

from shapca_jax.config import default_config

TINY_BERT = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64, max_position_embeddings=512, type_vocab_size=2)
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json")


def write_tiny_bert(folder: pathlib.Path, tokenizer_dir: pathlib.Path) -> pathlib.Path:
  """A randomly initialised 2-layer BERT saved by transformers, with MiniLM's tokenizer."""
  import torch
  import transformers
  torch.manual_seed(0)
  model = transformers.BertModel(transformers.BertConfig(**TINY_BERT), add_pooling_layer=False)
  model.save_pretrained(folder, safe_serialization=True)
  for name in TOKENIZER_FILES:
    if (tokenizer_dir / name).exists():
      shutil.copy(tokenizer_dir / name, folder / name)
  return folder


def _conll_blocks(path: pathlib.Path) -> list[str]:
  return [b for b in path.read_text().split("\n\n") if b.strip()]


def write_tiny_twitter(source: pathlib.Path, target: pathlib.Path, per_split: int) -> pathlib.Path:
  """The first ``per_split`` tweets of each Twitter-2017 split, with their BLIP-2 captions only."""
  out = target / "twitter2017"
  (out / "contexts").mkdir(parents=True)
  image_ids = set()
  for name in ("train.txt", "valid.txt", "test.txt"):
    blocks = _conll_blocks(source / "twitter2017" / name)[:per_split]
    image_ids |= {b.splitlines()[0].split(":", 1)[1].strip() for b in blocks}
    (out / name).write_text("\n\n".join(blocks) + "\n\n")
  captions = [line for line in (source / "twitter2017/contexts/blip2.txt").read_text().splitlines()
              if line.split(".jpg", 1)[0] in image_ids]
  (out / "contexts" / "blip2.txt").write_text("\n".join(captions) + "\n")
  return target


def tiny_config(data_dir: pathlib.Path, encoder_dir: pathlib.Path):
  config = default_config()
  config.data_dir = str(data_dir)
  config.text_encoder = str(encoder_dir)
  config.batch_size = 4
  config.eval_batch_size = 8
  config.num_epochs = 2
  config.max_length = 64  # one bucket: one compilation
  config.proj_dim = 16
  config.fusion.num_heads = 2
  config.align.num_permutations = 4
  config.log_every_steps = 2
  config.checkpoint_every_steps = 3
  config.progress_bar = False
  return config
