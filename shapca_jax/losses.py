"""Contrastive alignment losses of Shap-CA (METHOD §4), in the project's reconstruction.

One direction (e.g. context -> text): the k contexts are players, text j is the anchor of
game j, and the loss asks the paired context i = j to carry the largest Shapley value:
cross-entropy of softmax_i(phi_ij / tau_c) against i = j, averaged over anchors. Four
directions make the alignment loss

  L_align = lambda_ct (L_c->t + L_t->c) + lambda_ci (L_c->i + L_i->c).

A lambda of 0 switches its pair of directions off (the context-text-only and
context-image-only ablations), and kind="infonce" replaces the Shapley values by the
cosine similarities themselves (the "direct contrastive alignment" ablation).

Examples that share an image (MNRE, JMERE) are not negatives of each other: pass their
group ids [k] (or a boolean [k, k] "same group" matrix) as `same_group`. Padding examples
are switched off by `valid` [k]: they are neither anchors, negatives nor players.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from shapca_jax import shapley

KINDS = ("shapley", "infonce")


@dataclasses.dataclass(frozen=True)
class AlignmentConfig:
  """Settings of the alignment loss; defaults are the reconstruction's (METHOD §4)."""
  kind: str = "shapley"
  utility: str = "softmax_expectation"
  tau_u: float = 0.1
  tau_c: float = 0.1
  num_permutations: int = 32
  antithetic: bool = True
  lambda_ct: float = 0.1
  lambda_ci: float = 0.1

  def __post_init__(self):
    def fail(key, rule):
      raise ValueError(f"alignment config key {key!r} {rule}, got {getattr(self, key)!r}")

    if self.kind not in KINDS:
      fail("kind", f"must be one of {KINDS}")
    if self.utility not in shapley.UTILITIES:
      fail("utility", f"must be one of {shapley.UTILITIES}")
    for key in ("tau_u", "tau_c"):
      if not getattr(self, key) > 0:
        fail(key, "must be positive")
    if not (isinstance(self.num_permutations, int) and self.num_permutations >= 1):
      fail("num_permutations", "must be a positive integer")
    for key in ("lambda_ct", "lambda_ci"):
      if not getattr(self, key) >= 0:
        fail(key, "must be non-negative")

  @classmethod
  def from_mapping(cls, config: Any) -> "AlignmentConfig":
    """From a dict or ml_collections.ConfigDict; unknown keys are an error naming the key."""
    values = dict(config.items())
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
      if key not in known:
        raise ValueError(f"unknown alignment config key {key!r}; known keys: {sorted(known)}")
    return cls(**values)


def same_group_matrix(same_group: jax.Array) -> jax.Array:
  """Boolean [k, k] "same group" matrix from group ids [k] (or such a matrix itself)."""
  if same_group.ndim == 1:
    return same_group[:, None] == same_group[None, :]
  if same_group.ndim == 2 and same_group.shape[0] == same_group.shape[1]:
    return same_group.astype(bool)
  raise ValueError(f"same_group must be group ids [k] or a [k, k] matrix, got {same_group.shape}")


def contrastive_loss(scores: jax.Array,
                     tau: float,
                     same_group: jax.Array | None = None,
                     valid: jax.Array | None = None) -> jax.Array:
  """Mean over anchors j of -log softmax_i(scores[i, j] / tau) at i = j.

  Args:
    scores: [k, k], player i (axis 0) against anchor j (axis 1); pair (j, j) is positive.
    tau: temperature.
    same_group: group ids [k] or boolean [k, k]; players of the anchor's group other than
      the anchor's own are left out of its softmax (they are not negatives).
    valid: boolean [k]; invalid examples are left out as players and as anchors.

  Returns:
    The scalar loss (0 when no anchor is valid).
  """
  k = scores.shape[0]
  if scores.shape != (k, k):
    raise ValueError(f"scores must be square [k, k] (pairs on the diagonal), got {scores.shape}")
  left_out = jnp.zeros((k, k), bool)
  if same_group is not None:
    left_out = same_group_matrix(same_group)
  if valid is not None:
    left_out = left_out | ~valid[:, None]
  left_out = left_out & ~jnp.eye(k, dtype=bool)  # an anchor's own pair always competes
  logits = jnp.where(left_out, -jnp.inf, scores / tau)
  nll = -jnp.diagonal(jax.nn.log_softmax(logits, axis=0))
  weights = jnp.ones((k,), scores.dtype) if valid is None else valid.astype(scores.dtype)
  return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1)


def shapley_contrastive_loss(sim: jax.Array,
                             key: jax.Array,
                             config: AlignmentConfig = AlignmentConfig(),
                             players: jax.Array | None = None,
                             same_group: jax.Array | None = None,
                             valid: jax.Array | None = None) -> jax.Array:
  """The loss of one direction on the Monte Carlo Shapley values of the games of `sim`.

  Args:
    sim: [k, k] cosine similarities, players on axis 0, their paired anchors on axis 1.
    key: PRNG key for the permutations.
    config: utility, tau_u, tau_c, num_permutations and antithetic are used.
    players: player vectors [k, d] (utility "mean_embedding" only).
    same_group, valid: see `contrastive_loss`.
  """
  phi = shapley.mc_shapley(sim, key, num_permutations=config.num_permutations,
                           utility=config.utility, tau=config.tau_u,
                           antithetic=config.antithetic, players=players, player_mask=valid)
  return contrastive_loss(phi, config.tau_c, same_group, valid)


def alignment_loss(t: jax.Array,
                   c: jax.Array,
                   u: jax.Array | None,
                   key: jax.Array,
                   config: AlignmentConfig = AlignmentConfig(),
                   same_group: jax.Array | None = None,
                   valid: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """L_align over the text t, context c and image u vectors of a batch.

  Args:
    t, c: [k, d] projected (L2-normalised) text and context vectors.
    u: [k, d] image vectors, or None when the image branch is off (no image directions).
    key: PRNG key; each direction draws its own permutations.
    config: the AlignmentConfig.
    same_group: group ids [k] (e.g. image ids) or boolean [k, k]; see `contrastive_loss`.
    valid: boolean [k] marking real (non-padding) examples.

  Returns:
    (total, terms): the weighted total and each active direction's unweighted loss under
    "c2t", "t2c", "c2i", "i2c".
  """
  directions = {}  # name -> (players, anchors, lambda)
  if config.lambda_ct > 0:
    directions.update(c2t=(c, t, config.lambda_ct), t2c=(t, c, config.lambda_ct))
  if config.lambda_ci > 0 and u is not None:
    directions.update(c2i=(c, u, config.lambda_ci), i2c=(u, c, config.lambda_ci))
  if not directions:
    return jnp.zeros((), t.dtype), {}
  players = jnp.stack([p for p, _, _ in directions.values()])
  anchors = jnp.stack([a for _, a, _ in directions.values()])
  weights = jnp.asarray([w for _, _, w in directions.values()], t.dtype)
  sims = jax.vmap(shapley.cosine_similarity)(players, anchors)
  if config.kind == "infonce":
    losses = jax.vmap(lambda s: contrastive_loss(s, config.tau_c, same_group, valid))(sims)
  else:
    keys = jax.random.split(key, len(directions))
    losses = jax.vmap(lambda s, k, p: shapley_contrastive_loss(s, k, config, p, same_group, valid))(
        sims, keys, players)
  return jnp.sum(weights * losses), dict(zip(directions, losses))
