"""Small building blocks on top of the encoders: pooling, alignment projections, task heads."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def masked_mean(states: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of ``states [B, L, H]`` over the positions where ``mask [B, L]`` is on.

  An all-off row (e.g. an empty context) gives the zero vector, not NaN.
  """
  weights = mask.astype(jnp.float32)[..., None]
  total = jnp.sum(states.astype(jnp.float32) * weights, axis=1)
  return total / jnp.maximum(jnp.sum(weights, axis=1), 1.0)


def gather_positions(states: jax.Array, positions: jax.Array) -> jax.Array:
  """``states [B, L, H]`` at ``positions [B, W]`` -> ``[B, W, H]``."""
  return jnp.take_along_axis(states, positions[..., None].astype(jnp.int32), axis=1)


class AlignmentProjection(nn.Module):
  """Two-layer MLP to the alignment space, then L2 normalisation (METHOD §3, [R])."""
  features: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = lambda name: nn.Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype,
                                  name=name)
    h = dense("hidden")(x)
    h = dense("out")(nn.gelu(h, approximate=False)).astype(jnp.float32)
    return h / jnp.maximum(jnp.linalg.norm(h, axis=-1, keepdims=True), 1e-12)


class TaggingHead(nn.Module):
  """Emission scores ``[B, W, K]`` at the first word-piece of each word (MNER)."""
  num_tags: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, states: jax.Array, word_starts: jax.Array) -> jax.Array:
    words = gather_positions(states, word_starts)
    return nn.Dense(self.num_tags, dtype=self.dtype, param_dtype=self.param_dtype,
                    name="emissions")(words).astype(jnp.float32)
