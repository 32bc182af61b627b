"""A finished training run -> a self-contained model folder, and that folder -> a ready model.

  python -m shapca_jax.export --workdir workdirs/twitter17 --out models/twitter17 [--overwrite]

The folder holds everything inference needs; neither the training workdir nor the encoder
checkpoint folders the run started from are read again:

  model.json          format version, task, labels, the architecture (every field of the Flax
                      module ``train.build_model`` built, encoder configs included), the best
                      step and its dev/test scores, the workdir it came from and, for mjere,
                      the relations whose head is the later span (fit on the training split,
                      see ``wordpair.later_head_relations``) that grid decoding needs
  train_config.json   the run's full config (paths in it are provenance only)
  params.safetensors  all parameters of the best dev checkpoint, fine-tuned encoders included,
                      one tensor per leaf named by its path (``text_encoder/layer_0/...``)
  text_encoder/       the tokenizer files of the text encoder
  image_encoder/      preprocessor_config.json of the image encoder (only with use_image)

The architecture is stored as data rather than re-derived from the config, so a model folder
stays loadable when ``build_model`` learns new options; ``load_model`` checks every parameter
shape against the rebuilt module before anything runs.
"""

import argparse
import dataclasses
import importlib
import json
import logging
import os
import pathlib
import shutil
import sys
import tempfile
from typing import Any

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from safetensors.numpy import load_file, save_file

from shapca_jax import checkpoint, train, wordpair
from shapca_jax import config as config_lib
from shapca_jax.data import errors, images, readers, tokenization

FORMAT_VERSION = 1
MODEL_FILE = "model.json"
CONFIG_FILE = "train_config.json"
PARAMS_FILE = "params.safetensors"
TEXT_ENCODER_DIR = "text_encoder"
IMAGE_ENCODER_DIR = "image_encoder"
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json")
IMAGE_PROCESSOR_FILE = "preprocessor_config.json"
_PACKAGE = "shapca_jax."
_SEP = "/"

Params = dict[str, Any]


class ExportError(ValueError):
  """A workdir cannot be exported, or a model folder is incomplete or inconsistent."""


# ----------------------------------------------------------------------------- architecture


def encode_architecture(value: Any) -> Any:
  """A Flax module (or any field of one) as JSON data: dataclasses by qualified name and
  fields, dtypes by name, tuples as lists."""
  if isinstance(value, (bool, int, float, str)) or value is None:
    return value
  if isinstance(value, (type, np.dtype)):
    return {"__dtype__": jnp.dtype(value).name}
  if isinstance(value, (tuple, list)):
    return [encode_architecture(v) for v in value]
  if dataclasses.is_dataclass(value):
    cls = type(value)
    skip = ("parent", "name") if isinstance(value, nn.Module) else ()
    return {"__class__": f"{cls.__module__}.{cls.__qualname__}",
            "fields": {f.name: encode_architecture(getattr(value, f.name))
                       for f in dataclasses.fields(value) if f.name not in skip}}
  raise ExportError(f"cannot store a module field of type {type(value).__name__} ({value!r})")


def decode_architecture(data: Any, where: str = MODEL_FILE) -> Any:
  """Inverse of ``encode_architecture``; classes are only looked up inside shapca_jax."""
  if isinstance(data, list):
    return tuple(decode_architecture(v, where) for v in data)
  if not isinstance(data, dict):
    return data
  if "__dtype__" in data:
    return getattr(jnp, data["__dtype__"])
  name = data.get("__class__", "")
  if not name.startswith(_PACKAGE) or not isinstance(data.get("fields"), dict):
    raise ExportError(f"{where}: expected a shapca_jax class and its fields, got {data!r:.200}")
  module_name, _, qualname = name.rpartition(".")
  try:
    cls = getattr(importlib.import_module(module_name), qualname)
  except (ImportError, AttributeError) as err:
    raise ExportError(f"{where}: class {name} does not exist in this version of shapca_jax; "
                      "the folder was exported by another version") from err
  fields = {k: decode_architecture(v, where) for k, v in data["fields"].items()}
  try:
    return cls(**fields)
  except (TypeError, ValueError) as err:
    raise ExportError(f"{where}: cannot rebuild {name}: {err}") from err


# ----------------------------------------------------------------------------- shared helpers


def data_task(config: ml_collections.ConfigDict) -> str:
  """The data layer's task name of the run's data set (``mner``, ``mre`` or ``jmere``)."""
  return readers.TASKS[config.dataset]


def buckets(config: ml_collections.ConfigDict) -> tuple[tokenization.Bucket, ...]:
  """The length buckets of the run: every default bucket up to ``config.max_length``."""
  return tuple(b for b in tokenization.DEFAULT_BUCKETS if b.tokens <= config.max_length)


def example_batch(model: nn.Module, encoder: tokenization.Encoder,
                  bucket: tokenization.Bucket) -> dict[str, np.ndarray]:
  """A one-row padding batch with every field the model reads (for shapes and init)."""
  batch = {k: v[None] for k, v in encoder.empty_row(bucket).items()}
  batch |= {"valid": np.zeros(1, bool), "image_group": np.zeros(1, np.int32),
            "example_index": np.full(1, -1, np.int32)}
  vision = getattr(model, "vision_config", None)
  if vision is not None:
    batch["pixel_values"] = np.zeros((1, *vision.image_hw, vision.num_channels), np.float32)
  return batch


def param_shapes(model: nn.Module, encoder: tokenization.Encoder,
                 bucket: tokenization.Bucket) -> Params:
  """The model's parameter tree as ShapeDtypeStructs, without computing anything."""
  batch = example_batch(model, encoder, bucket)
  return jax.eval_shape(lambda r: model.init(r, batch)["params"], jax.random.key(0))


def _merged(defaults: dict[str, Any], stored: dict[str, Any],
            prefix: str = "") -> tuple[dict[str, Any], list[str]]:
  merged, filled = dict(stored), []
  for key, default in defaults.items():
    if key not in stored:
      merged[key] = default
      filled.append(prefix + key)
    elif isinstance(default, dict) and isinstance(stored[key], dict):
      merged[key], more = _merged(default, stored[key], f"{prefix}{key}.")
      filled += more
  return merged, filled


def run_config(stored: dict[str, Any]) -> ml_collections.ConfigDict:
  """A run's stored config, with the keys added to the schema since the run took their
  defaults (which reproduce the behaviour before those keys existed); they are logged."""
  merged, filled = _merged(config_lib.default_config().to_dict(), stored)
  if filled:
    logging.warning("the run's config predates the keys %s; using their defaults", filled)
  return ml_collections.ConfigDict(merged)


def _read_json(path: pathlib.Path) -> Any:
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except FileNotFoundError:
    raise ExportError(f"{path}: not found") from None
  except json.JSONDecodeError as err:
    raise ExportError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from err


# ----------------------------------------------------------------------------- export


def _copy_files(source: pathlib.Path, target: pathlib.Path, names: tuple[str, ...]) -> list[str]:
  target.mkdir(parents=True, exist_ok=True)
  copied = [n for n in names if (source / n).is_file()]
  for name in copied:
    shutil.copyfile(source / name, target / name)
  return copied


def export_run(workdir: str | os.PathLike, out_dir: str | os.PathLike, *,
               overwrite: bool = False) -> dict[str, Any]:
  """Writes the best dev checkpoint of a finished run in ``workdir`` as a model folder.

  Args:
    workdir: the run's working directory (``results.json`` and ``checkpoints/best``).
    out_dir: the model folder to create.
    overwrite: replace ``out_dir`` if it exists (otherwise that is an error).

  Returns:
    A summary: the folder, the parameter count and bytes, the best step and its scores.
  """
  workdir, out_dir = pathlib.Path(workdir), pathlib.Path(out_dir)
  results_path = workdir / train.RESULTS_FILE
  if not results_path.is_file():
    raise ExportError(f"{results_path} not found: export needs a finished run (its best "
                      "checkpoint and results are written when training ends)")
  if out_dir.exists() and not overwrite:
    raise ExportError(f"{out_dir} already exists; pass overwrite=True (--overwrite) to replace it")
  results = _read_json(results_path)
  config = run_config(results["config"])
  encoder_dir = train.text_encoder_dir(config)
  encoder = tokenization.Encoder(encoder_dir, data_task(config), train.input_layout(config))
  model, pretrained = train.build_model(config, encoder.tokenizer.vocab_size)
  # Inference reads the joint pass only; the separate alignment views are a training input.
  model = model.clone(align_views="joint")
  del pretrained  # only the module is needed: the checkpoint holds the fine-tuned weights
  params = checkpoint.restore_best(workdir, param_shapes(model, encoder, buckets(config)[0]))
  flat = {k: np.asarray(v) for k, v in
          traverse_util.flatten_dict(jax.device_get(params), sep=_SEP).items()}

  out_dir.parent.mkdir(parents=True, exist_ok=True)
  staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
  try:
    save_file(flat, str(staging / PARAMS_FILE), metadata={"format": "shapca-jax",
                                                           "version": str(FORMAT_VERSION)})
    tokenizer_files = _copy_files(encoder_dir, staging / TEXT_ENCODER_DIR, TOKENIZER_FILES)
    if not {"tokenizer.json", "vocab.txt"} & set(tokenizer_files):
      raise ExportError(f"{encoder_dir}: no tokenizer.json or vocab.txt to copy")
    if config.use_image:
      _copy_files(pathlib.Path(config.image_encoder), staging / IMAGE_ENCODER_DIR,
                  (IMAGE_PROCESSOR_FILE,))
    info = {
        "format_version": FORMAT_VERSION,
        "task": config.task,
        "labels": list(getattr(model, "labels", ())),
        "architecture": encode_architecture(model),
        "tokenizer_files": tokenizer_files,
        "source": {"workdir": str(workdir.resolve()), "best_step": results["best_step"],
                   "text_encoder": str(encoder_dir), "image_encoder": config.image_encoder},
        "scores": {split: {k: results[split][k] for k in ("precision", "recall", "f1")}
                   for split in ("dev", "test") if split in results},
    }
    if config.task == "mjere":
      info["head_follows_tail"] = sorted(_grid_vocab(config).head_follows_tail)
    (staging / MODEL_FILE).write_text(json.dumps(info, indent=1) + "\n")
    (staging / CONFIG_FILE).write_text(config.to_json(indent=1) + "\n")
    # mkdtemp and safetensors create private files; a model folder is meant to be shared.
    for path in staging.rglob("*"):
      path.chmod(0o755 if path.is_dir() else 0o644)
    staging.chmod(0o755)
    if out_dir.exists():
      shutil.rmtree(out_dir)
    staging.rename(out_dir)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return {"model_dir": str(out_dir), "num_params": int(sum(v.size for v in flat.values())),
          "bytes": (out_dir / PARAMS_FILE).stat().st_size, "best_step": results["best_step"],
          **{f"{split}_f1": s["f1"] for split, s in info["scores"].items()}}


def _grid_vocab(config: ml_collections.ConfigDict,
                head_follows_tail: list[str] | None = None) -> wordpair.GridVocab:
  """The JMERE grid vocabulary of training: fit on the training split, or rebuilt from the
  stored ``head_follows_tail``."""
  if head_follows_tail is None:
    return train.JmereScorer.fit(readers.read_split(config.dataset, "train",
                                                    config.data_dir)).vocab
  return dataclasses.replace(train.JmereScorer.fit(()).vocab,
                             head_follows_tail=frozenset(head_follows_tail))


# ----------------------------------------------------------------------------- loading


@dataclasses.dataclass(frozen=True)
class ExportedModel:
  """A loaded model folder.

  Attributes:
    directory: the folder.
    model: the Flax module, rebuilt from ``model.json``.
    params: its parameters (device arrays).
    config: the training config.
    info: the contents of ``model.json``.
  """
  directory: pathlib.Path
  model: nn.Module
  params: Params
  config: ml_collections.ConfigDict
  info: dict[str, Any]

  @property
  def labels(self) -> tuple[str, ...]:
    return tuple(self.info["labels"])

  @property
  def task(self) -> str:
    """``mner``, ``mre`` or ``mjere``."""
    return self.config.task

  @property
  def buckets(self) -> tuple[tokenization.Bucket, ...]:
    return buckets(self.config)

  def grid_vocab(self) -> wordpair.GridVocab:
    """How mjere grids decode into entities and quintuples, exactly as in training."""
    if "head_follows_tail" not in self.info:
      raise ExportError(f"{self.directory / MODEL_FILE}: no 'head_follows_tail'; only mjere "
                        "models decode grids")
    return _grid_vocab(self.config, self.info["head_follows_tail"])

  def encoder(self) -> tokenization.Encoder:
    """The tokenizer and input layout of the training run."""
    return tokenization.Encoder(self.directory / TEXT_ENCODER_DIR, data_task(self.config),
                                train.input_layout(self.config))

  def image_processor(self) -> images.ImageProcessor | None:
    """The image preprocessing of the run's image encoder, or None without the image branch."""
    if not self.config.use_image:
      return None
    return images.ImageProcessor.from_checkpoint(self.directory / IMAGE_ENCODER_DIR,
                                                 max_pixels=self.config.max_image_pixels)


def _check_shapes(path: pathlib.Path, flat: dict[str, np.ndarray], expected: Params) -> None:
  want = {k: (tuple(v.shape), jnp.dtype(v.dtype).name) for k, v in
          traverse_util.flatten_dict(expected, sep=_SEP).items()}
  got = {k: (tuple(v.shape), v.dtype.name) for k, v in flat.items()}
  problems = [f"missing {k} {want[k]}" for k in sorted(set(want) - set(got))]
  problems += [f"unexpected {k} {got[k]}" for k in sorted(set(got) - set(want))]
  problems += [f"{k}: stored {got[k]}, the model needs {want[k]}"
               for k in sorted(set(got) & set(want)) if got[k] != want[k]]
  if problems:
    listing = "\n  ".join(problems[:20]) + ("\n  ..." if len(problems) > 20 else "")
    raise ExportError(f"{path} does not fit the architecture in {MODEL_FILE} "
                      f"({len(problems)} problems):\n  {listing}")


def load_model(model_dir: str | os.PathLike) -> ExportedModel:
  """Loads a folder written by ``export_run``; every parameter is checked against the module."""
  directory = pathlib.Path(model_dir)
  if not directory.is_dir():
    raise ExportError(f"{directory}: model folder not found")
  info = _read_json(directory / MODEL_FILE)
  version = info.get("format_version") if isinstance(info, dict) else None
  if version != FORMAT_VERSION:
    raise ExportError(f"{directory / MODEL_FILE}: format_version {version!r}; this version of "
                      f"shapca_jax reads {FORMAT_VERSION}")
  config = run_config(_read_json(directory / CONFIG_FILE))
  fields = info["architecture"].get("fields", {})
  if fields.get("text_context") == "joint":  # exported before align.views: the same model
    del fields["text_context"]
  model = decode_architecture(info["architecture"], str(directory / MODEL_FILE))
  exported = ExportedModel(directory, model, {}, config, info)
  params_path = directory / PARAMS_FILE
  if not params_path.is_file():
    raise ExportError(f"{params_path}: not found")
  flat = load_file(str(params_path))
  _check_shapes(params_path, flat, param_shapes(model, exported.encoder(), exported.buckets[0]))
  params = traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()}, sep=_SEP)
  return dataclasses.replace(exported, params=params)


# ----------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m shapca_jax.export",
      description="Write the best checkpoint of a finished run as a self-contained model folder.")
  parser.add_argument("--workdir", required=True, help="the training run's working directory")
  parser.add_argument("--out", required=True, help="the model folder to create")
  parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
  return parser


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    summary = export_run(args.workdir, args.out, overwrite=args.overwrite)
  except (ExportError, FileNotFoundError, ValueError) as err:
    print(f"error: {err}", file=sys.stderr)
    return errors.USAGE_EXIT_CODE
  print(json.dumps(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main())
