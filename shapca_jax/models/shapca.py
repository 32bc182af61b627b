"""The assembled Shap-CA model: encoders -> projections -> fusion -> task head (METHOD §3-§5).

One forward pass of a batch (the field names of ``shapca_jax.data`` batches):

  H = BERT([CLS] text [SEP] context [SEP])                 joint text+context states [B, L, H]
  c = mean of H over context pieces
  u, P = image CLS and patch states of the vision tower           (only with an image encoder)
  t_a, c_a, u_a = L2-normalised 2-layer MLP projections of t, c, u   -> alignment losses, where
      ([R] align_views="joint") t = mean of H over text pieces, c as above;
      (align_views="separate") t = mean over the text pieces of BERT([CLS] text [SEP]) and
      c = mean over the context pieces of BERT([CLS] context [SEP]), both rows of every example
      in one extra encoder call [2B, L]
  H' = AdaptiveFusion(H, P, c)  with an image encoder, else H     (fusion is the identity)
  the task head on H' (METHOD §1):
    mner   emissions [B, W, K] at each word's first piece -> CRF
    mre    logits [B, C] from [H'_<s>; H'_<o>]            -> cross-entropy
    mjere  logits [B, W, W, C] over first-piece pairs     -> cross-entropy on valid grid cells

The alignment losses themselves live in ``shapca_jax.losses`` and are applied by the training
step, which owns the PRNG keys of the Monte Carlo permutations.
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from shapca_jax import crf as crf_lib
from shapca_jax import wordpair
from shapca_jax.models.bert import BertConfig, BertEncoder
from shapca_jax.models.fusion import AdaptiveFusion
from shapca_jax.models.heads import (AlignmentProjection, RelationHead, TaggingHead,
                                     WordPairHead, masked_mean)
from shapca_jax.models.vision import VisionConfig, VisionEncoder

Batch = dict[str, jax.Array]
TASKS = ("mner", "mre", "mjere")
ALIGN_VIEWS = ("joint", "separate")


class ShapCA(nn.Module):
  """Shap-CA for multimodal NER, relation extraction or joint entity-relation extraction.

  Attributes:
    text_config: the BERT architecture (from the checkpoint's config.json; for MRE with the
      vocabulary grown by the entity markers).
    labels: the class names of the task: BIO tags (mner, one CRF state each), relations (mre)
      or grid classes (mjere: "none", the entity types, then the relations).
    task: "mner", "mre" or "mjere".
    num_entity_types: mjere only: grid classes 1..num_entity_types are entity types.
    pair_dim: mjere only: width of the biaffine word-pair representations.
    vision_config: the image tower's architecture, or None when the image branch is off.
    use_context: False encodes the text alone (the "no context" ablation).
    align_views: "joint" or "separate": the passes the alignment vectors are pooled from (see
      the module docstring); "separate" reads the batch fields ``views_*`` of the data layout
      "views". The task path reads the joint pass either way.
    proj_dim: size of the alignment space d_a.
    dropout_rate: dropout before the task head.
    fusion_mode / fusion_heads: ``AdaptiveFusion`` settings.
    constrained_training: mner only: apply the BIO constraints in the CRF log-likelihood too.
    dtype / param_dtype: compute and parameter dtypes.
  """
  text_config: BertConfig
  labels: Sequence[str]
  task: str = "mner"
  num_entity_types: int = 0
  pair_dim: int = 256
  vision_config: Optional[VisionConfig] = None
  use_context: bool = True
  align_views: str = "joint"
  proj_dim: int = 256
  dropout_rate: float = 0.1
  fusion_mode: str = "adaptive"
  fusion_heads: int = 8
  constrained_training: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    if self.task not in TASKS:
      raise ValueError(f"task={self.task!r}; expected one of {TASKS}")
    if self.align_views not in ALIGN_VIEWS:
      raise ValueError(f"align_views={self.align_views!r}; expected one of {ALIGN_VIEWS}")
    if self.task == "mjere" and not 0 < self.num_entity_types < len(self.labels):
      raise ValueError(f"mjere needs 0 < num_entity_types < {len(self.labels)} grid classes, "
                       f"got {self.num_entity_types}")
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
    if self.task == "mner":
      self.tagger = TaggingHead(len(self.labels), **kw)
      self.crf = crf_lib.CRF(tuple(self.labels), constrained_training=self.constrained_training)
    elif self.task == "mre":
      self.classifier = RelationHead(len(self.labels), **kw)
    else:
      self.pair_scorer = WordPairHead(len(self.labels), self.pair_dim, **kw)

  def _separate_views(self, batch: Batch, deterministic: bool) -> tuple[jax.Array, jax.Array]:
    """(t, c) pooled from the text-only and context-only rows ``views_*`` [B, 2, L], encoded
    together as one batch of 2B rows (token type 0: each row is a first segment)."""
    ids = batch["views_input_ids"]
    rows, length = 2 * ids.shape[0], ids.shape[-1]
    flat = lambda x: jnp.swapaxes(x, 0, 1).reshape(rows, length)  # text rows, then contexts
    states = self.text_encoder(flat(ids), jnp.zeros((rows, length), ids.dtype),
                               flat(batch["views_attention_mask"]), deterministic=deterministic)
    text, context = jnp.split(masked_mean(states, flat(batch["views_mask"])), 2)
    return text, context

  def encode(self, batch: Batch, deterministic: bool,
             alignment: bool = True) -> dict[str, jax.Array]:
    """The head's scores of a batch, ``emissions`` (mner) or ``logits`` (mre, mjere), and with
    ``alignment`` the alignment vectors ``text_vec``, ``context_vec`` (with contexts) and
    ``image_vec`` (with an image encoder)."""
    states = self.text_encoder(batch["input_ids"], batch["token_type_ids"],
                               batch["attention_mask"], deterministic=deterministic)
    context = masked_mean(states, batch["context_mask"]) if self.use_context else None
    out = {}
    if alignment:
      if self.use_context and self.align_views == "separate":
        text_view, context_view = self._separate_views(batch, deterministic)
        out["context_vec"] = self.context_proj(context_view)
      else:
        text_view = masked_mean(states, batch["text_mask"])
        if self.use_context:
          out["context_vec"] = self.context_proj(context)
      out["text_vec"] = self.text_proj(text_view)
    if self.vision_config is not None:
      patches, pooled = self.image_encoder(batch["pixel_values"], deterministic=deterministic)
      if alignment:
        out["image_vec"] = self.image_proj(pooled)
      states = self.fusion(states, patches, context, batch["attention_mask"],
                           deterministic=deterministic)
    states = self.dropout(states, deterministic=deterministic)
    if self.task == "mner":
      out["emissions"] = self.tagger(states, batch["word_starts"])
    elif self.task == "mre":
      out["logits"] = self.classifier(states, batch["head_pos"], batch["tail_pos"])
    else:
      out["logits"] = self.pair_scorer(states, batch["word_starts"])
    return out

  def __call__(self, batch: Batch, deterministic: bool = True) -> dict[str, jax.Array]:
    """``encode`` plus the task loss of each example as ``task_loss [B]`` (a sum over its
    scored units) and ``task_units [B]`` (how many units: 1, or the valid grid cells for
    mjere), so that sum(loss) / sum(units) is the per-unit mean over any set of rows."""
    out = self.encode(batch, deterministic)
    if self.task == "mner":
      loss = -self.crf(out["emissions"], batch["tags"], batch["num_words"])
      units = jnp.ones_like(loss)
    elif self.task == "mre":
      loss = optax.softmax_cross_entropy_with_integer_labels(out["logits"], batch["relation"])
      units = jnp.ones_like(loss)
    else:
      grid = batch["grid"]
      valid = grid != wordpair.IGNORE
      cells = optax.softmax_cross_entropy_with_integer_labels(out["logits"],
                                                              jnp.maximum(grid, 0))
      loss = jnp.sum(jnp.where(valid, cells, 0.0), axis=(1, 2))
      units = jnp.sum(valid, axis=(1, 2)).astype(jnp.float32)
    out["task_loss"], out["task_units"] = loss, units
    return out

  def predict(self, batch: Batch) -> jax.Array:
    """The task's prediction per example: constrained Viterbi tags ``[B, W]`` (-1 beyond each
    sentence; mner), relation ids ``[B]`` (mre) or grids ``[B, W, W]`` (-1 on ignored cells,
    no relation on the diagonal; mjere)."""
    out = self.encode(batch, deterministic=True, alignment=False)
    if self.task == "mner":
      return self.crf.decode(out["emissions"], batch["num_words"])[0]
    if self.task == "mre":
      return jnp.argmax(out["logits"], axis=-1).astype(jnp.int32)
    valid = wordpair.valid_cells(batch["num_words"], out["logits"].shape[1])
    return wordpair.predict_grid(out["logits"], valid, self.num_entity_types)
