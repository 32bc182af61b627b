"""The assembled Shap-CA model: encoders -> projections -> fusion -> task head (METHOD §3-§5).

One forward pass of a batch (the field names of ``shapca_jax.data`` batches):

  H = BERT([CLS] text [SEP] context [SEP])                 joint text+context states [B, L, H]
  t = mean of H over text pieces, c = mean over context pieces     ([R] text_context="joint")
      (with text_context="separate", c comes from BERT([CLS] context [SEP]) instead)
  u, P = image CLS and patch states of the vision tower           (only with an image encoder)
  t_a, c_a, u_a = L2-normalised 2-layer MLP projections of t, c, u   -> alignment losses
  H' = AdaptiveFusion(H, P, c)  with an image encoder, else H     (fusion is the identity)
  emissions = Dense(H' at each word's first piece)  -> CRF (MNER)

The alignment losses themselves live in ``shapca_jax.losses`` and are applied by the training
step, which owns the PRNG keys of the Monte Carlo permutations.
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from shapca_jax import crf as crf_lib
from shapca_jax.models.bert import BertConfig, BertEncoder
from shapca_jax.models.fusion import AdaptiveFusion
from shapca_jax.models.heads import AlignmentProjection, TaggingHead, masked_mean
from shapca_jax.models.vision import VisionConfig, VisionEncoder

Batch = dict[str, jax.Array]


class ShapCA(nn.Module):
  """Shap-CA for multimodal NER.

  Attributes:
    text_config: the BERT architecture (from the checkpoint's config.json).
    labels: the BIO tag names; the CRF has one state per label.
    vision_config: the image tower's architecture, or None when the image branch is off.
    use_context: False encodes the text alone (the "no context" ablation).
    text_context: "joint" or "separate" (see the module docstring).
    proj_dim: size of the alignment space d_a.
    dropout_rate: dropout before the task head.
    fusion_mode / fusion_heads: ``AdaptiveFusion`` settings.
    constrained_training: apply the BIO constraints in the CRF log-likelihood too.
    dtype / param_dtype: compute and parameter dtypes.
  """
  text_config: BertConfig
  labels: Sequence[str]
  vision_config: Optional[VisionConfig] = None
  use_context: bool = True
  text_context: str = "joint"
  proj_dim: int = 256
  dropout_rate: float = 0.1
  fusion_mode: str = "adaptive"
  fusion_heads: int = 8
  constrained_training: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.text_encoder = BertEncoder(self.text_config, **kw)
    self.text_proj = AlignmentProjection(self.proj_dim, **kw)
    if self.use_context:
      self.context_proj = AlignmentProjection(self.proj_dim, **kw)
    if self.vision_config is not None:
      self.image_encoder = VisionEncoder(self.vision_config, **kw)
      self.image_proj = AlignmentProjection(self.proj_dim, **kw)
      self.fusion = AdaptiveFusion(self.fusion_heads, self.dropout_rate, mode=self.fusion_mode,
                                   **kw)
    self.dropout = nn.Dropout(self.dropout_rate)
    self.tagger = TaggingHead(len(self.labels), **kw)
    self.crf = crf_lib.CRF(tuple(self.labels), constrained_training=self.constrained_training)

  def encode(self, batch: Batch, deterministic: bool) -> dict[str, jax.Array]:
    """Alignment vectors and CRF emissions of a batch."""
    states = self.text_encoder(batch["input_ids"], batch["token_type_ids"],
                               batch["attention_mask"], deterministic=deterministic)
    context = None
    out = {"text_vec": self.text_proj(masked_mean(states, batch["text_mask"]))}
    if self.use_context:
      if self.text_context == "separate":
        context_states = self.text_encoder(
            batch["context_input_ids"], jnp.zeros_like(batch["context_input_ids"]),
            batch["context_attention_mask"], deterministic=deterministic)
        context = masked_mean(context_states, batch["context_attention_mask"])
      else:
        context = masked_mean(states, batch["context_mask"])
      out["context_vec"] = self.context_proj(context)
    if self.vision_config is not None:
      patches, pooled = self.image_encoder(batch["pixel_values"], deterministic=deterministic)
      out["image_vec"] = self.image_proj(pooled)
      states = self.fusion(states, patches, context, batch["attention_mask"],
                           deterministic=deterministic)
    states = self.dropout(states, deterministic=deterministic)
    out["emissions"] = self.tagger(states, batch["word_starts"])
    return out

  def __call__(self, batch: Batch, deterministic: bool = True) -> dict[str, jax.Array]:
    """``encode`` plus the CRF log-likelihood of ``batch["tags"]`` per example."""
    out = self.encode(batch, deterministic)
    out["log_likelihood"] = self.crf(out["emissions"], batch["tags"], batch["num_words"])
    return out

  def decode(self, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Constrained Viterbi tags ``[B, W]`` (-1 beyond each sentence) and their scores."""
    out = self.encode(batch, deterministic=True)
    return self.crf.decode(out["emissions"], batch["num_words"])
