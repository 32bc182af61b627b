"""BERT text encoder in Flax Linen, numerically equal to transformers' PyTorch `BertModel`.

The parameter tree mirrors the Hugging Face module names closely enough that
`shapca_jax.models.weights` maps a `model.safetensors` onto it one tensor at a time.
The attention, feed-forward and layer blocks defined here are shared with the vision tower.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def _quick_gelu(x: jax.Array) -> jax.Array:
  return x * jax.nn.sigmoid(1.702 * x)


# Names as they appear in Hugging Face configs (`hidden_act`, `pooler_act`).
ACTIVATIONS: Mapping[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": _quick_gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def check_activation(name: str, key: str) -> None:
  """Raises a ValueError naming the config `key` when `name` is not a supported activation."""
  if name not in ACTIVATIONS:
    raise ValueError(f"config key {key}={name!r} is not supported; expected one of "
                     f"{sorted(ACTIVATIONS)}")


def pick_fields(cls: type, values: Mapping[str, Any], source: str) -> dict[str, Any]:
  """The entries of a Hugging Face config dict that are fields of dataclass `cls`.

  Other keys (`architectures`, `use_cache`, ...) describe the PyTorch wrapper and are dropped.
  Fields absent from `values` keep the dataclass default, which equals the transformers default.
  """
  if not isinstance(values, Mapping):
    raise ValueError(f"{source}: expected a JSON object, got {type(values).__name__}")
  names = {f.name for f in dataclasses.fields(cls)}
  return {k: v for k, v in values.items() if k in names}


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The fields of a Hugging Face `BertConfig` that define the encoder's computation.

  Defaults are transformers' defaults, i.e. bert-base-uncased.
  """
  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  initializer_range: float = 0.02
  layer_norm_eps: float = 1e-12
  pad_token_id: int | None = 0

  def __post_init__(self):
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"config key hidden_size={self.hidden_size} is not a multiple of "
                       f"num_attention_heads={self.num_attention_heads}")
    check_activation(self.hidden_act, "hidden_act")

  @classmethod
  def from_hf_dict(cls, values: Mapping[str, Any], source: str = "config") -> "BertConfig":
    """Builds the config from a parsed `config.json` of a BERT checkpoint."""
    fields = pick_fields(cls, values, source)
    position_type = values.get("position_embedding_type", "absolute")
    if position_type != "absolute":
      raise ValueError(f"{source}: position_embedding_type={position_type!r} is not supported "
                       "(only 'absolute')")
    for flag in ("is_decoder", "add_cross_attention"):
      if values.get(flag):
        raise ValueError(f"{source}: {flag}=true is not supported (encoder-only BERT)")
    try:
      return cls(**fields)
    except (TypeError, ValueError) as e:
      raise ValueError(f"{source}: {e}") from e


class RowDense(nn.Dense):
  """``nn.Dense`` applied to the rows of ``x`` flattened to 2-D (same params, same output).

  The weight gradient of a 2-D matmul is one plain dot; for a [batch, length, in] input
  XLA:CPU first transposes the activations and cotangents, which makes the layer's backward
  pass about 1.5x slower at BERT-base size. GPUs and TPUs run both forms alike.
  """

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    rows = super().__call__(x.reshape(-1, x.shape[-1]))
    return rows.reshape(*x.shape[:-1], self.features)


def dense(features: int, init_std: float, dtype: Dtype, param_dtype: Dtype, name: str,
          use_bias: bool = True) -> nn.Dense:
  """A Dense layer initialised like transformers: N(0, init_std) kernel, zero bias."""
  return RowDense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                  kernel_init=nn.initializers.normal(init_std), name=name)


def layer_norm(eps: float, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name)


class SelfAttention(nn.Module):
  """Multi-head self-attention with separate query/key/value/output projections.

  Inference uses `jax.nn.dot_product_attention` (one fused op; pass
  `implementation="cudnn"` for cuDNN flash attention on GPU with bf16 compute). Attention-
  probability dropout is not offered by that op, so in training with a non-zero rate the
  unfused Flax path runs instead; set the rate to 0 to keep the fused op in training.
  """
  num_heads: int
  dropout_rate: float
  init_std: float
  use_bias: bool = True
  implementation: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None, deterministic: bool) -> jax.Array:
    features = x.shape[-1]
    head_dim = features // self.num_heads

    def project(name: str) -> jax.Array:
      y = dense(features, self.init_std, self.dtype, self.param_dtype, name, self.use_bias)(x)
      return y.reshape(*x.shape[:-1], self.num_heads, head_dim)

    q, k, v = project("query"), project("key"), project("value")
    if deterministic or self.dropout_rate == 0.0:
      y = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=self.implementation)
    else:
      y = nn.dot_product_attention(
          q, k, v, mask=mask, dropout_rng=self.make_rng("dropout"), dropout_rate=self.dropout_rate,
          broadcast_dropout=False, deterministic=False, dtype=self.dtype)
    y = y.reshape(*x.shape[:-1], features)
    return dense(features, self.init_std, self.dtype, self.param_dtype, "out")(y)


class FeedForward(nn.Module):
  """Position-wise `fc2(act(fc1(x)))`."""
  intermediate_size: int
  activation: str
  init_std: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = dense(self.intermediate_size, self.init_std, self.dtype, self.param_dtype, "fc1")(x)
    y = ACTIVATIONS[self.activation](y)
    return dense(x.shape[-1], self.init_std, self.dtype, self.param_dtype, "fc2")(y)


class BertEmbeddings(nn.Module):
  """LayerNorm(word + absolute position + token type embeddings), then dropout."""
  config: BertConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array,
               deterministic: bool) -> jax.Array:
    cfg = self.config
    length = input_ids.shape[-1]
    if length > cfg.max_position_embeddings:
      raise ValueError(f"sequence length {length} exceeds config key "
                       f"max_position_embeddings={cfg.max_position_embeddings}")

    def embed(num: int, name: str) -> nn.Embed:
      return nn.Embed(num, cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                      embedding_init=nn.initializers.normal(cfg.initializer_range), name=name)

    x = embed(cfg.vocab_size, "word_embeddings")(input_ids)
    x = x + embed(cfg.max_position_embeddings, "position_embeddings")(jnp.arange(length))
    x = x + embed(cfg.type_vocab_size, "token_type_embeddings")(token_type_ids)
    x = layer_norm(cfg.layer_norm_eps, self.dtype, self.param_dtype, "layer_norm")(x)
    return nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)


class TransformerLayer(nn.Module):
  """One encoder layer; `pre_norm` picks where the LayerNorms sit.

  Post-norm (BERT): h = LN(x + attn(x)), out = LN(h + mlp(h)).
  Pre-norm (CLIP, ViT): h = x + attn(LN(x)), out = h + mlp(LN(h)).
  Hidden dropout acts on each branch before the residual sum.
  """
  num_heads: int
  intermediate_size: int
  activation: str
  layer_norm_eps: float
  hidden_dropout: float
  attention_dropout: float
  init_std: float
  pre_norm: bool
  qkv_bias: bool = True
  attention_implementation: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None, deterministic: bool) -> jax.Array:
    dropout = lambda y: nn.Dropout(self.hidden_dropout)(y, deterministic=deterministic)
    attention_norm = layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype,
                                "attention_norm")
    mlp_norm = layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, "mlp_norm")
    attention = SelfAttention(self.num_heads, self.attention_dropout, self.init_std,
                              use_bias=self.qkv_bias, implementation=self.attention_implementation,
                              dtype=self.dtype, param_dtype=self.param_dtype, name="attention")
    mlp = FeedForward(self.intermediate_size, self.activation, self.init_std, dtype=self.dtype,
                      param_dtype=self.param_dtype, name="mlp")
    if self.pre_norm:
      x = x + dropout(attention(attention_norm(x), mask, deterministic))
      return x + dropout(mlp(mlp_norm(x)))
    x = attention_norm(x + dropout(attention(x, mask, deterministic)))
    return mlp_norm(x + dropout(mlp(x)))


class BertEncoder(nn.Module):
  """BERT without the pooler: token ids -> last hidden state [B, L, hidden_size].

  Attributes:
    config: the checkpoint's architecture.
    dtype: compute dtype (e.g. jnp.bfloat16); LayerNorm statistics and softmax stay fp32.
    param_dtype: dtype of the parameters (keep fp32 for training).
    attention_implementation: passed to `jax.nn.dot_product_attention` (None = XLA).
  """
  config: BertConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_implementation: str | None = None

  @nn.compact
  def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array | None = None,
               attention_mask: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
    """Encodes a batch.

    Args:
      input_ids: int [B, L].
      token_type_ids: int [B, L]; zeros when None.
      attention_mask: [B, L], 1 (or True) for real tokens; all ones when None. Padded
        positions still get (meaningless) states, exactly as in PyTorch.
      deterministic: False enables dropout, drawn from the `dropout` rng stream.

    Returns:
      [B, L, hidden_size] in `dtype`.
    """
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    mask = None
    if attention_mask is not None:
      mask = attention_mask.astype(bool)[:, None, None, :]
    x = BertEmbeddings(self.config, self.dtype, self.param_dtype, name="embeddings")(
        input_ids, token_type_ids, deterministic)
    cfg = self.config
    for i in range(cfg.num_hidden_layers):
      x = TransformerLayer(
          cfg.num_attention_heads, cfg.intermediate_size, cfg.hidden_act, cfg.layer_norm_eps,
          cfg.hidden_dropout_prob, cfg.attention_probs_dropout_prob, cfg.initializer_range,
          pre_norm=False, attention_implementation=self.attention_implementation,
          dtype=self.dtype, param_dtype=self.param_dtype, name=f"layer_{i}")(x, mask, deterministic)
    return x
