"""Context-bridged adaptive fusion of text tokens with image patches (METHOD §5).

The paper describes a "selective cross-modal fusion" that weighs each modal feature by its
relevance to the bridging context; it gives no code and its equations could not be read, so
the formulas below are this project's **reconstruction** (config switch ``fusion``):

  b    = W_b c                                  bridge from the pooled context vector c
  Q, K, V = W_q H_text, W_k H_image, W_v H_image
  g_Q  = σ(W_gq [Q; b]),  Q' = g_Q ⊙ Q + (1 − g_Q) ⊙ b      (b broadcast to every query)
  g_K  = σ(W_gk [K; b]),  K' = g_K ⊙ K + (1 − g_K) ⊙ b      (b broadcast to every key)
  A    = MultiHeadAttention(Q', K', V)
  H_fused = LayerNorm(H_text + Dropout(W_o A))

``mode="plain"`` is the "no adaptive fusion" ablation: ordinary multi-head cross-attention
(no bridge, no gates) with the same residual and LayerNorm.

Masking: padded image patches (``image_mask`` False) take no part in attention; a text position
with ``text_mask`` False, and every position of an example without any valid patch, receives no
image update, so its output is ``LayerNorm(H_text)`` there. When the image branch is off for the
whole run (``use_image=false``), the assembled model does not call this module at all and passes
the jointly encoded text states through unchanged (fusion is the identity) - that switch lives
in the model, not here.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

FUSION_MODES = ("adaptive", "plain")


class _BridgeGate(nn.Module):
  """g ⊙ x + (1 − g) ⊙ b with g = σ(W [x; b] + c), b a [B, H] bridge broadcast over x's rows.

  W [x; b] is computed as x W_x + b W_b, so the bridge half is one product per example rather
  than per row; the parameters are those of a Dense layer on the concatenation.
  """
  dtype: Any
  param_dtype: Any
  kernel_init: nn.initializers.Initializer

  @nn.compact
  def __call__(self, x: jax.Array, bridge: jax.Array) -> jax.Array:
    features = x.shape[-1]
    kernel = self.param("kernel", self.kernel_init, (2 * features, features), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros_init(), (features,), self.param_dtype)
    x, bridge, kernel, bias = nn.dtypes.promote_dtype(x, bridge, kernel, bias, dtype=self.dtype)
    per_example = bridge @ kernel[features:] + bias
    gate = nn.sigmoid(x @ kernel[:features] + per_example[:, None, :])
    return gate * x + (1.0 - gate) * bridge[:, None, :]


class AdaptiveFusion(nn.Module):
  """Text-query / image-key cross-attention, optionally gated by a context bridge.

  Attributes:
    num_heads: attention heads; must divide the text hidden size H.
    dropout_rate: dropout on the attention output before the residual sum.
    mode: ``"adaptive"`` (context-bridged gates) or ``"plain"`` (ordinary cross-attention).
    dtype: computation dtype (e.g. ``jnp.bfloat16``); LayerNorm statistics stay float32.
    param_dtype: parameter dtype.
    layer_norm_epsilon: epsilon of the output LayerNorm (BERT's 1e-12 by default).
    kernel_init: initialiser of every projection matrix.
  """
  num_heads: int
  dropout_rate: float = 0.1
  mode: str = "adaptive"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  layer_norm_epsilon: float = 1e-12
  kernel_init: nn.initializers.Initializer = nn.initializers.xavier_uniform()

  def _dense(self, features: int, name: str) -> nn.Dense:
    return nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=self.kernel_init, name=name)

  @nn.compact
  def __call__(self, text_states: jax.Array, image_states: jax.Array,
               context_vec: Optional[jax.Array], text_mask: jax.Array, *,
               image_mask: Optional[jax.Array] = None,
               deterministic: bool = True) -> jax.Array:
    """Fuses image patches into the text states.

    Args:
      text_states: [B, L, H] text (or joint text+context) token states; queries and residual.
      image_states: [B, N, Hv] image patch states; keys and values after projection to H.
      context_vec: [B, Hc] pooled context vector (the bridge source); ignored, and may be
        None, in ``plain`` mode.
      text_mask: [B, L] attention mask of the text side (1/True at real tokens).
      image_mask: optional [B, N] mask of real patches; all patches are real when None.
      deterministic: disables dropout; otherwise needs a ``dropout`` RNG.

    Returns:
      [B, L, H] fused states in ``dtype``.
    """
    if self.mode not in FUSION_MODES:
      raise ValueError(f"fusion mode must be one of {FUSION_MODES} (config key `fusion`), "
                       f"got {self.mode!r}")
    batch, length, hidden = text_states.shape
    if hidden % self.num_heads:
      raise ValueError(f"text hidden size {hidden} is not divisible by num_heads={self.num_heads}")
    if image_states.ndim != 3 or image_states.shape[0] != batch:
      raise ValueError(f"image_states must be [B={batch}, N, Hv], got {image_states.shape}")
    if text_mask.shape != (batch, length):
      raise ValueError(f"text_mask must be [B, L]={(batch, length)}, got {text_mask.shape}")
    num_patches = image_states.shape[1]
    if image_mask is None:
      image_mask = jnp.ones((batch, num_patches), dtype=bool)
    elif image_mask.shape != (batch, num_patches):
      raise ValueError(f"image_mask must be [B, N]={(batch, num_patches)}, "
                       f"got {image_mask.shape}")
    image_mask = image_mask.astype(bool)

    query = self._dense(hidden, "query")(text_states)
    key = self._dense(hidden, "key")(image_states)
    value = self._dense(hidden, "value")(image_states)
    if self.mode == "adaptive":
      if context_vec is None or context_vec.shape[0] != batch:
        shape = None if context_vec is None else context_vec.shape
        raise ValueError(f"adaptive fusion needs context_vec [B={batch}, Hc], got {shape}")
      bridge = self._dense(hidden, "bridge")(context_vec)
      gate = lambda name: _BridgeGate(self.dtype, self.param_dtype, self.kernel_init, name=name)
      query = gate("gate_q")(query, bridge)
      key = gate("gate_k")(key, bridge)

    head_dim = hidden // self.num_heads
    split = lambda x: x.reshape(*x.shape[:2], self.num_heads, head_dim)
    attended = jax.nn.dot_product_attention(
        split(query), split(key), split(value), mask=image_mask[:, None, None, :])
    update = self._dense(hidden, "out")(attended.reshape(batch, length, hidden))
    update = nn.Dropout(self.dropout_rate)(update, deterministic=deterministic)
    # A fully masked attention row would average padded patches; such rows get no update.
    receives = text_mask.astype(bool) & jnp.any(image_mask, axis=-1, keepdims=True)
    update = jnp.where(receives[..., None], update, jnp.zeros((), update.dtype))
    residual = text_states.astype(self.dtype) + update
    return nn.LayerNorm(epsilon=self.layer_norm_epsilon, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="layer_norm")(residual)
