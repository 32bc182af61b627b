"""Hugging Face checkpoint folders -> Flax encoders (BERT, CLIP vision tower, ViT).

`load_hf_encoder` reads `config.json` and `model.safetensors` (or a sharded
`model.safetensors.index.json`) from a local folder and maps every tensor onto the Flax
parameter tree of `BertEncoder` or `VisionEncoder`. Nothing is initialised at random: a
missing, unexpected or mis-shaped tensor is an error, and all of them are listed at once.

Which tensors belong to the encoder (the rule):
  1. The encoder lives under one prefix: `bert.` (BertFor* heads) or none for BERT,
     `vision_model.` (CLIPModel, CLIPVisionModelWithProjection, older CLIPVisionModel) or
     none for CLIP, `vit.` (ViTFor* heads) or none for ViT. The prefix is the one under
     which the family's patch/word embedding tensor exists.
  2. Tensors outside that prefix belong to another tower or a task head (`text_model.*`,
     `visual_projection`, `logit_scale`, `cls.*`, `classifier.*`) and are ignored.
  3. Inside the prefix, only the following are ignored: position-id buffers, BERT's pooler
     (BertEncoder returns token states; nothing downstream reads the pooler) and ViT's
     masked-image-modelling `mask_token`. A ViT pooler, when present, is loaded and used.
  4. Every other tensor inside the prefix must map onto a parameter, with the right shape.
Legacy names `LayerNorm.gamma/beta` (e.g. bert-base-uncased) are read as `weight/bias`.

Parameter trees are the inner `params` collection: apply with `{"params": params}`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from shapca_jax.models.bert import BertConfig, BertEncoder
from shapca_jax.models.vision import VisionConfig, VisionEncoder

EncoderConfig = BertConfig | VisionConfig
Params = dict[str, Any]
Path = tuple[str, ...]

# model_type in config.json -> our family.
_FAMILIES = {"bert": "bert", "clip": "clip", "clip_vision_model": "clip", "vit": "vit"}


class CheckpointMismatchError(ValueError):
  """The tensors of a checkpoint do not match the encoder its config describes."""


@dataclasses.dataclass(frozen=True)
class _Layout:
  prefixes: tuple[str, ...]  # candidates for the encoder's prefix, most specific first
  anchor: str  # a tensor every checkpoint of the family holds, used to find the prefix
  ignored: tuple[str, ...]  # names, or name prefixes ending in ".", deliberately not loaded


_LAYOUTS = {
    "bert": _Layout(("bert.", ""), "embeddings.word_embeddings.weight",
                    ("embeddings.position_ids", "embeddings.token_type_ids", "pooler.")),
    "clip": _Layout(("vision_model.", ""), "embeddings.patch_embedding.weight",
                    ("embeddings.position_ids",)),
    "vit": _Layout(("vit.", ""), "embeddings.patch_embeddings.projection.weight",
                   ("embeddings.mask_token",)),
}


@dataclasses.dataclass(frozen=True)
class Transform:
  """How a PyTorch tensor becomes a Flax parameter, and the PyTorch shape a Flax shape implies."""
  to_flax: Callable[[np.ndarray], np.ndarray]
  torch_shape: Callable[[tuple[int, ...]], tuple[int, ...]]


_COPY = Transform(lambda w: w, lambda s: s)
_LINEAR = Transform(lambda w: w.T, lambda s: s[::-1])  # [out, in] -> [in, out]
_CONV = Transform(lambda w: w.transpose(2, 3, 1, 0),  # OIHW -> HWIO
                   lambda s: (s[3], s[2], s[0], s[1]))


def _drop_leading_ones(n: int) -> Transform:
  return Transform(lambda w: w.reshape(w.shape[n:]), lambda s: (1,) * n + s)


@dataclasses.dataclass(frozen=True)
class Rule:
  name: str  # tensor name inside the encoder prefix
  path: Path  # Flax parameter path
  transform: Transform


def _dense(name: str, path: Path, bias: bool = True) -> list[Rule]:
  rules = [Rule(f"{name}.weight", path + ("kernel",), _LINEAR)]
  return rules + [Rule(f"{name}.bias", path + ("bias",), _COPY)] if bias else rules


def _norm(name: str, path: Path) -> list[Rule]:
  return [Rule(f"{name}.weight", path + ("scale",), _COPY),
          Rule(f"{name}.bias", path + ("bias",), _COPY)]


def _attention(names: Sequence[str], path: Path, qkv_bias: bool = True) -> list[Rule]:
  """Rules for query, key, value and output projections named `names` in that order."""
  rules = []
  for name, ours in zip(names[:3], ("query", "key", "value")):
    rules += _dense(name, path + ("attention", ours), qkv_bias)
  return rules + _dense(names[3], path + ("attention", "out"))


def _bert_rules(config: BertConfig) -> list[Rule]:
  rules = [Rule(f"embeddings.{table}.weight", ("embeddings", table, "embedding"), _COPY)
           for table in ("word_embeddings", "position_embeddings", "token_type_embeddings")]
  rules += _norm("embeddings.LayerNorm", ("embeddings", "layer_norm"))
  for i in range(config.num_hidden_layers):
    hf, ours = f"encoder.layer.{i}.", (f"layer_{i}",)
    rules += _attention([hf + f"attention.self.{p}" for p in ("query", "key", "value")]
                        + [hf + "attention.output.dense"], ours)
    rules += _norm(hf + "attention.output.LayerNorm", ours + ("attention_norm",))
    rules += _dense(hf + "intermediate.dense", ours + ("mlp", "fc1"))
    rules += _dense(hf + "output.dense", ours + ("mlp", "fc2"))
    rules += _norm(hf + "output.LayerNorm", ours + ("mlp_norm",))
  return rules


def _clip_rules(config: VisionConfig) -> list[Rule]:
  rules = [
      Rule("embeddings.patch_embedding.weight", ("embeddings", "patch_embedding", "kernel"),
            _CONV),
      Rule("embeddings.class_embedding", ("embeddings", "class_embedding"), _COPY),
      Rule("embeddings.position_embedding.weight", ("embeddings", "position_embedding"), _COPY),
  ]
  rules += _norm("pre_layrnorm", ("pre_layernorm",))
  for i in range(config.num_hidden_layers):
    hf, ours = f"encoder.layers.{i}.", (f"layer_{i}",)
    rules += _norm(hf + "layer_norm1", ours + ("attention_norm",))
    rules += _attention([hf + f"self_attn.{p}_proj" for p in ("q", "k", "v", "out")], ours)
    rules += _norm(hf + "layer_norm2", ours + ("mlp_norm",))
    rules += _dense(hf + "mlp.fc1", ours + ("mlp", "fc1"))
    rules += _dense(hf + "mlp.fc2", ours + ("mlp", "fc2"))
  return rules + _norm("post_layernorm", ("final_norm",))


def _vit_rules(config: VisionConfig) -> list[Rule]:
  patch = ("embeddings", "patch_embedding")
  rules = [
      Rule("embeddings.patch_embeddings.projection.weight", patch + ("kernel",), _CONV),
      Rule("embeddings.patch_embeddings.projection.bias", patch + ("bias",), _COPY),
      Rule("embeddings.cls_token", ("embeddings", "class_embedding"), _drop_leading_ones(2)),
      Rule("embeddings.position_embeddings", ("embeddings", "position_embedding"),
            _drop_leading_ones(1)),
  ]
  for i in range(config.num_hidden_layers):
    hf, ours = f"encoder.layer.{i}.", (f"layer_{i}",)
    rules += _norm(hf + "layernorm_before", ours + ("attention_norm",))
    rules += _attention([hf + f"attention.attention.{p}" for p in ("query", "key", "value")]
                        + [hf + "attention.output.dense"], ours, config.qkv_bias)
    rules += _norm(hf + "layernorm_after", ours + ("mlp_norm",))
    rules += _dense(hf + "intermediate.dense", ours + ("mlp", "fc1"))
    rules += _dense(hf + "output.dense", ours + ("mlp", "fc2"))
  rules += _norm("layernorm", ("final_norm",))
  return rules + (_dense("pooler.dense", ("pooler",)) if config.use_pooler else [])


def hf_rules(config: EncoderConfig) -> list[Rule]:
  """Every tensor of a Hugging Face checkpoint of ``config``: its name below the encoder prefix,
  its Flax parameter path and how its array is transformed (the one mapping that loading here
  and the PyTorch baseline's parameter copy share)."""
  if isinstance(config, BertConfig):
    return _bert_rules(config)
  return _clip_rules(config) if config.family == "clip" else _vit_rules(config)


def build_encoder(config: EncoderConfig, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                  attention_implementation: str | None = None) -> nn.Module:
  """The Flax module for `config` (BertEncoder or VisionEncoder)."""
  cls = BertEncoder if isinstance(config, BertConfig) else VisionEncoder
  return cls(config, dtype=dtype, param_dtype=param_dtype,
             attention_implementation=attention_implementation)


def _dummy_inputs(config: EncoderConfig) -> tuple[jax.Array, ...]:
  if isinstance(config, BertConfig):
    return (jnp.zeros((1, 1), jnp.int32),)
  return (jnp.zeros((1, *config.image_hw, config.num_channels), jnp.float32),)


def init_encoder(config: EncoderConfig, rng: jax.Array, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32,
                 attention_implementation: str | None = None) -> tuple[nn.Module, Params]:
  """A randomly initialised encoder, initialised like transformers (N(0, initializer_range)
  weights, zero biases, unit LayerNorm scales).

  Use `BertConfig()` for a BERT-base-sized model, `VisionConfig.clip()` for CLIP ViT-B/32,
  or tiny configs for tests.
  """
  module = build_encoder(config, dtype, param_dtype, attention_implementation)
  params = jax.jit(module.init)(rng, *_dummy_inputs(config))["params"]
  return module, params


def _flatten(tree: Mapping[str, Any], path: Path = ()) -> dict[Path, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, path + (key,)))
    else:
      flat[path + (key,)] = value
  return flat


def _unflatten(flat: Mapping[Path, Any]) -> Params:
  tree: Params = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


class _TensorFolder:
  """Lazy access to the tensors of `model.safetensors` or of a sharded index."""

  def __init__(self, folder: pathlib.Path):
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
      files = {single}
      self.description = str(single)
    elif index.is_file():
      weight_map = _read_json(index).get("weight_map")
      if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: has no 'weight_map' object")
      files = {folder / f for f in weight_map.values()}
      self.description = str(index)
    else:
      hint = ""
      if (folder / "pytorch_model.bin").is_file():
        hint = (" (only pytorch_model.bin found: re-save it from PyTorch with "
                "save_pretrained(folder, safe_serialization=True))")
      raise FileNotFoundError(
          f"{folder}: no model.safetensors or model.safetensors.index.json{hint}")
    self._file_of: dict[str, Any] = {}
    for file in sorted(files):
      try:
        handle = safe_open(str(file), framework="numpy")
      except Exception as e:  # safetensors raises its own error types for bad headers
        raise ValueError(f"{file}: cannot read safetensors file: {e}") from e
      for name in handle.keys():
        self._file_of[name] = handle

  def names(self) -> list[str]:
    return list(self._file_of)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._file_of[name].get_slice(name).get_shape())

  def get(self, name: str) -> np.ndarray:
    return self._file_of[name].get_tensor(name)


def _read_json(path: pathlib.Path) -> Any:
  try:
    return json.loads(path.read_text())
  except FileNotFoundError:
    raise FileNotFoundError(f"{path}: not found") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e


def _modern_name(name: str) -> str:
  """Reads the TF-era LayerNorm names `gamma`/`beta` as `weight`/`bias`, as transformers does."""
  for old, new in ((".gamma", ".weight"), (".beta", ".bias")):
    if name.endswith(old):
      return name[: -len(old)] + new
  return name


def _read_config(folder: pathlib.Path) -> tuple[str, Mapping[str, Any], str]:
  """(family, the encoder's config dict, a description of where it came from)."""
  path = folder / "config.json"
  values = _read_json(path)
  model_type = values.get("model_type") if isinstance(values, dict) else None
  if model_type not in _FAMILIES:
    raise ValueError(f"{path}: model_type={model_type!r} is not supported; expected one of "
                     f"{sorted(_FAMILIES)}")
  if model_type == "clip":
    return "clip", values.get("vision_config") or {}, f"{path} (vision_config)"
  return _FAMILIES[model_type], values, str(path)


def _is_ignored(name: str, layout: _Layout) -> bool:
  return any(name == rule or (rule.endswith(".") and name.startswith(rule))
             for rule in layout.ignored)


def _listing(title: str, lines: Sequence[str]) -> list[str]:
  return [f"  {title} ({len(lines)}):"] + [f"    {line}" for line in lines] if lines else []


def load_hf_encoder(path: str | pathlib.Path, dtype: Any = jnp.float32,
                    param_dtype: Any = jnp.float32,
                    attention_implementation: str | None = None,
                    config_overrides: Mapping[str, Any] | None = None,
                    ) -> tuple[nn.Module, Params, EncoderConfig]:
  """Loads a local Hugging Face BERT, CLIP or ViT folder as a Flax encoder.

  Args:
    path: folder with config.json and model.safetensors (or model.safetensors.index.json).
    dtype: compute dtype of the module (jnp.bfloat16 for bf16 compute).
    param_dtype: dtype of the returned parameters (checkpoints in fp16/bf16 are upcast).
    attention_implementation: passed to `jax.nn.dot_product_attention`.
    config_overrides: config fields to replace, e.g. {"attention_probs_dropout_prob": 0.0}.

  Returns:
    (module, params, config); run with `module.apply({"params": params}, ...)`.

  Raises:
    CheckpointMismatchError: listing every missing, unexpected and mis-shaped tensor.
  """
  folder = pathlib.Path(path)
  if not folder.is_dir():
    raise FileNotFoundError(f"{folder}: checkpoint folder not found")
  family, values, source = _read_config(folder)
  tensors = _TensorFolder(folder)
  layout = _LAYOUTS[family]
  modern = {_modern_name(n): n for n in tensors.names()}
  prefix = next((p for p in layout.prefixes if p + layout.anchor in modern), "")
  inner = {n[len(prefix):]: original for n, original in modern.items() if n.startswith(prefix)}
  skipped = len(modern) - len(inner)
  if skipped:
    logging.info("%s: ignoring %d tensors outside the encoder prefix %r", tensors.description,
                 skipped, prefix)

  if family == "bert":
    config = BertConfig.from_hf_dict(values, source)
  else:
    config = VisionConfig.from_hf_dict(family, values, source)
    if family == "vit":
      config = dataclasses.replace(config, use_pooler=any(n.startswith("pooler.") for n in inner))
  config = _apply_overrides(config, config_overrides or {})

  module = build_encoder(config, dtype, param_dtype, attention_implementation)
  shapes = {p: s.shape for p, s in _flatten(jax.eval_shape(
      module.init, jax.random.key(0), *_dummy_inputs(config))["params"]).items()}
  rules = hf_rules(config)
  _check_rules_cover(rules, shapes)

  missing, misshaped = [], []
  for rule in rules:
    expected = rule.transform.torch_shape(shapes[rule.path])
    if rule.name not in inner:
      missing.append(prefix + rule.name)
    elif (got := tensors.shape(inner[rule.name])) != expected:
      misshaped.append(f"{inner[rule.name]}: checkpoint {got}, expected {expected}")
  known = {rule.name for rule in rules}
  unexpected = sorted(inner[n] for n in inner if n not in known and not _is_ignored(n, layout))
  if missing or unexpected or misshaped:
    raise CheckpointMismatchError("\n".join(
        [f"{tensors.description} does not match the {family} encoder described by {source}:"]
        + _listing("missing tensors", sorted(missing))
        + _listing("unexpected tensors", unexpected)
        + _listing("tensors with the wrong shape", misshaped)))

  flat = {rule.path: jnp.asarray(rule.transform.to_flax(tensors.get(inner[rule.name])),
                                 dtype=param_dtype) for rule in rules}
  return module, _unflatten(flat), config


def _apply_overrides(config: EncoderConfig, overrides: Mapping[str, Any]) -> EncoderConfig:
  names = {f.name for f in dataclasses.fields(config)}
  unknown = sorted(set(overrides) - names)
  if unknown:
    raise ValueError(f"config_overrides keys {unknown} are not fields of {type(config).__name__}")
  return dataclasses.replace(config, **overrides)


def _check_rules_cover(rules: Iterable[Rule], shapes: Mapping[Path, Any]) -> None:
  mapped = {rule.path for rule in rules}
  if mapped != set(shapes):
    raise RuntimeError(f"weight mapping out of sync with the module: unmapped parameters "
                       f"{sorted(set(shapes) - mapped)}, unknown targets "
                       f"{sorted(mapped - set(shapes))}")


# Scale of the per-dimension noise added to the mean embedding for new tokens.
NEW_TOKEN_NOISE = 1e-2


def add_token_embeddings(params: Params, num_new: int, rng: jax.Array) -> Params:
  """Appends `num_new` rows to BERT's word-embedding table (e.g. the markers <s> </s> <o> </o>).

  New rows start at the mean of the existing rows, so the new tokens behave like an average
  word instead of an outlier (Hewitt, 2021; transformers' `resize_token_embeddings` does the
  same), plus Gaussian noise with `NEW_TOKEN_NOISE` times the per-dimension standard deviation
  of the existing rows so that the new tokens differ from each other. Old rows are untouched.

  Build the module with `dataclasses.replace(config, vocab_size=config.vocab_size + num_new)`;
  the new ids are `config.vocab_size, ..., config.vocab_size + num_new - 1`.
  """
  if num_new < 0:
    raise ValueError(f"num_new must be >= 0, got {num_new}")
  table = params["embeddings"]["word_embeddings"]["embedding"]
  mean, std = table.mean(axis=0), table.std(axis=0)
  noise = jax.random.normal(rng, (num_new, table.shape[1]), table.dtype)
  rows = (mean + NEW_TOKEN_NOISE * std * noise).astype(table.dtype)
  new_table = jnp.concatenate([table, rows], axis=0)
  embeddings = {**params["embeddings"], "word_embeddings": {"embedding": new_table}}
  return {**params, "embeddings": embeddings}


def load_tokenizer(path: str | pathlib.Path) -> Any:
  """The tokenizer saved in a local checkpoint folder (`transformers.AutoTokenizer`)."""
  folder = pathlib.Path(path)
  if not folder.is_dir():
    raise FileNotFoundError(f"{folder}: tokenizer folder not found")
  from transformers import AutoTokenizer  # heavy import, only needed here
  return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
