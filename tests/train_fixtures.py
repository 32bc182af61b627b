"""Tiny data sets and checkpoints for end-to-end runs (shared by the training tests)."""

import ast
import json
import pathlib
import shutil
import sys

from shapca_jax.config import default_config

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "experiments"))
import bench_loop  # noqa: E402  (experiments/ is not a package)

TINY_BERT = {**bench_loop.BERT_VOCAB, **bench_loop.RANDOM_BERTS["tiny"]}


def write_tiny_bert(folder: pathlib.Path, tokenizer_dir: pathlib.Path) -> pathlib.Path:
  """A randomly initialised 2-layer BERT saved by transformers, with MiniLM's tokenizer."""
  return bench_loop.write_random_bert(folder, tokenizer_dir, **bench_loop.RANDOM_BERTS["tiny"])


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


# Real file names of each split: JMERE, MNRE and the MNRE captioner files.
RELATION_SPLITS = {"train": ("train.json", "ours_train.txt", "train"),
                   "valid": ("val.json", "ours_val.txt", "val"),
                   "test": ("test.json", "ours_test.txt", "test")}
TINY_CONTEXTS = "minicpm"


def _copy_lines_of_images(source: pathlib.Path, target: pathlib.Path, name: str,
                          image_ids: set[str]) -> None:
  """The lines of the MNRE-style file ``source/name`` (one dict literal per line) whose
  ``img_id`` is in ``image_ids``, written to ``target/name``."""
  lines = [line for line in (source / name).read_text().splitlines()
           if ast.literal_eval(line)["img_id"] in image_ids]
  (target / name).write_text("\n".join(lines) + "\n")


def write_tiny_relations(source: pathlib.Path, target: pathlib.Path, per_split: int,
                         max_words: int = 30) -> pathlib.Path:
  """The first ``per_split`` JMERE samples of at most ``max_words`` words of each split, every
  MNRE instance of those samples' images (its ``None`` pairs included) and their MiniCPM
  contexts. Context files may only name images of their MNRE split, so one subset serves both
  data sets; short sentences keep the MRE markers inside a 64-token bucket."""
  (target / "jmere").mkdir(parents=True)
  (target / "mnre" / "contexts").mkdir(parents=True)
  shutil.copy(source / "mnre" / "ours_rel2id.json", target / "mnre" / "ours_rel2id.json")
  for jmere_name, mnre_name, context_split in RELATION_SPLITS.values():
    samples = [s for s in json.loads((source / "jmere" / jmere_name).read_text())
               if len(s["token"]) <= max_words][:per_split]
    (target / "jmere" / jmere_name).write_text(json.dumps(samples))
    image_ids = {s["img_id"] for s in samples}
    _copy_lines_of_images(source, target, f"mnre/{mnre_name}", image_ids)
    _copy_lines_of_images(source, target, f"mnre/contexts/{TINY_CONTEXTS}_{context_split}.txt",
                          image_ids)
  return target


def tiny_config(data_dir: pathlib.Path, encoder_dir: pathlib.Path, task: str = "mner"):
  """A run small enough for a test; ``task`` "mre" / "mjere" reads ``write_tiny_relations``."""
  config = default_config()
  if task != "mner":
    config.task = task
    config.dataset = {"mre": "mnre", "mjere": "jmere"}[task]
    config.contexts = TINY_CONTEXTS
    config.pair_dim = 16
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


def write_mnre_with_images(source: pathlib.Path, target: pathlib.Path) -> pathlib.Path:
  """Every MNRE instance whose image is one of the real ones under ``source/mnre/images``, split
  by split, with those images copied beside them and no context file: every example can get its
  context from a generator that looks at its image."""
  images = source / "mnre" / "images"
  (target / "mnre").mkdir(parents=True)
  shutil.copy(source / "mnre" / "ours_rel2id.json", target / "mnre" / "ours_rel2id.json")
  for _, mnre_name, image_split in RELATION_SPLITS.values():
    present = {p.name for p in (images / image_split).glob("*.jpg")}
    _copy_lines_of_images(source, target, f"mnre/{mnre_name}", present)
    shutil.copytree(images / image_split, target / "mnre" / "images" / image_split)
  return target
