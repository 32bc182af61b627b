"""CLIP vision tower and plain ViT in Flax Linen, equal to transformers' PyTorch models.

Both are pre-LayerNorm transformers over a class token plus image patches; they differ in
small places that `VisionConfig.family` switches:

  * CLIP (`CLIPVisionModel`): bias-free patch projection, `pre_layrnorm` before the layers,
    quick-GELU, no final LayerNorm on the sequence; pooled = `post_layernorm(class state)`.
  * ViT (`ViTModel`): patch projection with bias, a final LayerNorm on the whole sequence;
    pooled = `tanh(dense(class state))` when the checkpoint has a pooler, otherwise the
    (normalised) class state itself.

Images are NHWC float32, already preprocessed (see `shapca_jax.data.images`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from shapca_jax.models import bert

Dtype = Any
Family = Literal["clip", "vit"]

# transformers' CLIPVisionConfig / ViTConfig defaults, keyed by our field names.
_FAMILY_DEFAULTS: Mapping[str, Mapping[str, Any]] = {
    "clip": dict(patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5),
    "vit": dict(patch_size=16, hidden_act="gelu", layer_norm_eps=1e-12),
}
# Hugging Face config names that differ from ours.
_HF_RENAMES: Mapping[str, Mapping[str, str]] = {
    "clip": {},
    "vit": {"attention_probs_dropout_prob": "attention_dropout",
            "hidden_dropout_prob": "hidden_dropout"},
}


def _pair(value: Any, key: str) -> tuple[int, int]:
  if isinstance(value, int):
    return (value, value)
  if isinstance(value, (list, tuple)) and len(value) == 2:
    if all(isinstance(v, int) for v in value):
      return (value[0], value[1])
  raise ValueError(f"config key {key}={value!r} must be an int or a pair of ints")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """Architecture of a CLIP vision tower or a ViT; field names follow Hugging Face.

  Build it with `VisionConfig.clip(...)`, `VisionConfig.vit(...)` (transformers' defaults:
  CLIP ViT-B/32, ViT-B/16) or `VisionConfig.from_hf_dict(...)`.
  """
  family: Family
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int | tuple[int, int] = 224
  patch_size: int | tuple[int, int] = 32
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  attention_dropout: float = 0.0
  hidden_dropout: float = 0.0
  initializer_range: float = 0.02
  qkv_bias: bool = True
  use_pooler: bool = False
  pooler_output_size: int | None = None
  pooler_act: str = "tanh"

  def __post_init__(self):
    if self.family not in _FAMILY_DEFAULTS:
      raise ValueError(f"config key family={self.family!r} must be one of "
                       f"{sorted(_FAMILY_DEFAULTS)}")
    if self.family == "clip" and (self.use_pooler or self.hidden_dropout or not self.qkv_bias):
      raise ValueError("CLIP vision towers have no pooler dense layer, no hidden dropout and "
                       "always use query/key/value biases")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"config key hidden_size={self.hidden_size} is not a multiple of "
                       f"num_attention_heads={self.num_attention_heads}")
    image, patch = _pair(self.image_size, "image_size"), _pair(self.patch_size, "patch_size")
    if image[0] % patch[0] or image[1] % patch[1]:
      raise ValueError(f"config key image_size={self.image_size} is not a multiple of "
                       f"patch_size={self.patch_size}")
    bert.check_activation(self.hidden_act, "hidden_act")
    bert.check_activation(self.pooler_act, "pooler_act")
    if self.pooler_output_size is None:  # transformers' convention: None means hidden_size
      object.__setattr__(self, "pooler_output_size", self.hidden_size)

  @classmethod
  def clip(cls, **overrides: Any) -> "VisionConfig":
    return cls(**{"family": "clip", **_FAMILY_DEFAULTS["clip"], **overrides})

  @classmethod
  def vit(cls, **overrides: Any) -> "VisionConfig":
    return cls(**{"family": "vit", **_FAMILY_DEFAULTS["vit"], **overrides})

  @classmethod
  def from_hf_dict(cls, family: Family, values: Mapping[str, Any],
                   source: str = "config") -> "VisionConfig":
    """Builds the config of `family` from a parsed (vision) config dict of a checkpoint."""
    renames = _HF_RENAMES[family]
    # JSON has no tuples; frozen configs must stay hashable.
    renamed = {renames.get(k, k): tuple(v) if isinstance(v, list) else v
               for k, v in values.items()}
    fields = bert.pick_fields(cls, renamed, source)
    fields.pop("family", None)
    fields.pop("use_pooler", None)  # decided by the checkpoint's tensors, not its config
    try:
      return cls(**{"family": family, **_FAMILY_DEFAULTS[family], **fields})
    except (TypeError, ValueError) as e:
      raise ValueError(f"{source}: {e}") from e

  @property
  def image_hw(self) -> tuple[int, int]:
    return _pair(self.image_size, "image_size")

  @property
  def grid(self) -> tuple[int, int]:
    """Patches per image column and row."""
    patch = _pair(self.patch_size, "patch_size")
    return (self.image_hw[0] // patch[0], self.image_hw[1] // patch[1])

  @property
  def num_positions(self) -> int:
    """Class token plus patches."""
    return self.grid[0] * self.grid[1] + 1


class VisionEmbeddings(nn.Module):
  """Patch projection, class token and learned absolute positions."""
  config: VisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    cfg = self.config
    patch = _pair(cfg.patch_size, "patch_size")
    init = nn.initializers.normal(cfg.initializer_range)
    x = nn.Conv(cfg.hidden_size, kernel_size=patch, strides=patch, padding="VALID",
                use_bias=cfg.family == "vit", dtype=self.dtype, param_dtype=self.param_dtype,
                kernel_init=init, name="patch_embedding")(pixel_values)
    x = x.reshape(x.shape[0], -1, cfg.hidden_size)
    cls = self.param("class_embedding", init, (cfg.hidden_size,), self.param_dtype)
    cls = jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, cfg.hidden_size))
    positions = self.param("position_embedding", init, (cfg.num_positions, cfg.hidden_size),
                           self.param_dtype)
    return jnp.concatenate([cls, x], axis=1) + positions.astype(x.dtype)


class VisionEncoder(nn.Module):
  """CLIP vision tower or ViT: images -> (patch states [B, N+1, H], pooled [B, H']).

  `patch_states` is transformers' `last_hidden_state` (class token first) and `pooled` its
  `pooler_output`. H' is `pooler_output_size` for a ViT pooler, else H.
  """
  config: VisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_implementation: str | None = None

  @nn.compact
  def __call__(self, pixel_values: jax.Array,
               deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
    cfg = self.config
    expected = (*cfg.image_hw, cfg.num_channels)
    if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
      raise ValueError(f"pixel_values must be [B, {expected[0]}, {expected[1]}, {expected[2]}] "
                       f"(NHWC, config image_size/num_channels), got {tuple(pixel_values.shape)}")
    norm = lambda name: bert.layer_norm(cfg.layer_norm_eps, self.dtype, self.param_dtype, name)
    x = VisionEmbeddings(cfg, self.dtype, self.param_dtype, name="embeddings")(pixel_values)
    if cfg.family == "clip":
      x = norm("pre_layernorm")(x)
    else:
      x = nn.Dropout(cfg.hidden_dropout)(x, deterministic=deterministic)
    for i in range(cfg.num_hidden_layers):
      x = bert.TransformerLayer(
          cfg.num_attention_heads, cfg.intermediate_size, cfg.hidden_act, cfg.layer_norm_eps,
          cfg.hidden_dropout, cfg.attention_dropout, cfg.initializer_range, pre_norm=True,
          qkv_bias=cfg.qkv_bias, attention_implementation=self.attention_implementation,
          dtype=self.dtype, param_dtype=self.param_dtype, name=f"layer_{i}")(x, None, deterministic)
    if cfg.family == "clip":
      return x, norm("final_norm")(x[:, 0])
    x = norm("final_norm")(x)
    pooled = x[:, 0]
    if cfg.use_pooler:
      pooled = bert.dense(cfg.pooler_output_size, cfg.initializer_range,
                          self.dtype, self.param_dtype, "pooler")(pooled)
      pooled = bert.ACTIVATIONS[cfg.pooler_act](pooled)
    return x, pooled
