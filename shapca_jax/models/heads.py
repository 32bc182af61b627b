"""Small building blocks on top of the encoders: pooling, alignment projections, task heads.

One head per task of METHOD §1, each reading the fused token states ``[B, L, H]``:
  ``TaggingHead``   MNER emissions at each word's first piece (scored by the CRF),
  ``RelationHead``  MRE relation logits from the states at the ``<s>`` and ``<o>`` markers,
  ``WordPairHead``  MJERE word-pair grid logits over first-piece states (biaffine).
"""

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
    # The floor under the squared norm, not the norm: a padding row's h is 0, where the norm's
    # own gradient is 0/0 and would make every gradient of the batch NaN.
    return h / jnp.sqrt(jnp.maximum(jnp.sum(h * h, axis=-1, keepdims=True), 1e-24))


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


class RelationHead(nn.Module):
  """Relation logits ``[B, C]`` from ``[h_<s>; h_<o>]``, the states at the head and tail markers
  (MRE, METHOD §1): one linear layer on the concatenation."""
  num_classes: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, states: jax.Array, head_pos: jax.Array, tail_pos: jax.Array) -> jax.Array:
    markers = gather_positions(states, jnp.stack([head_pos, tail_pos], axis=-1))  # [B, 2, H]
    pair = markers.reshape(markers.shape[0], -1)
    return nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                    name="logits")(pair).astype(jnp.float32)


class WordPairHead(nn.Module):
  """Word-pair class logits ``[B, W, W, C]`` over first-word-piece states (MJERE, METHOD §1).

  Biaffine (Dozat & Manning, 2017): each word gets a row and a column representation,
  ``r_i = GELU(W_r h_i)`` and ``c_j = GELU(W_c h_j)`` of size ``features``, and

    logits[i, j, k] = [r_i; 1]^T U_k [c_j; 1]

  which holds a bilinear term, a linear term in each word and a bias per class. Chosen over an
  MLP on ``[h_i; h_j; h_i * h_j]`` because it never builds per-pair features: the MLP's product
  term alone is a ``[B, W, W, H]`` activation kept for the backward pass, 15x the memory of the
  ``[B, W, W, C]`` logits at H = 384, C = 26 (30x at BERT-base size), while the biaffine form
  is two einsums over ``[B, W, features]``. Its
  separate row and column maps also keep the score asymmetric, which the grid needs: a cell
  (i, j) with i < j is read differently from (j, i).
  """
  num_classes: int
  features: int = 256
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, states: jax.Array, word_starts: jax.Array) -> jax.Array:
    words = gather_positions(states, word_starts)
    dense = lambda name: nn.Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype,
                                  name=name)
    ones = jnp.ones((*words.shape[:2], 1), self.dtype)
    rows = jnp.concatenate([nn.gelu(dense("row")(words), approximate=False), ones], axis=-1)
    cols = jnp.concatenate([nn.gelu(dense("col")(words), approximate=False), ones], axis=-1)
    size = self.features + 1
    # fan-in over both bilinear axes: logits start with unit-order scale.
    init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=(0, 2),
                                            out_axis=1)
    kernel = self.param("biaffine", init, (size, self.num_classes, size), self.param_dtype)
    rows, cols, kernel = nn.dtypes.promote_dtype(rows, cols, kernel, dtype=self.dtype)
    row_kernel = jnp.einsum("bia,akc->bikc", rows, kernel)
    return jnp.einsum("bikc,bjc->bijk", row_kernel, cols).astype(jnp.float32)
