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
DIRECTIONS = ("c2t", "t2c", "c2i", "i2c")
# `alignment_diagnostics` gives f"{direction}_{metric}" for each active direction.
DIAGNOSTICS = ("top1", "phi_margin", "shapley_infonce_grad_cos")


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
  # An anchor's own pair always competes (an invalid anchor's column, weighted 0 below, keeps
  # only it).
  competing = negative_pairs(k, same_group, valid) | jnp.eye(k, dtype=bool)
  logits = jnp.where(competing, scores / tau, -jnp.inf)
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
  return contrastive_loss(shapley_values(sim, key, config, players, valid), config.tau_c,
                          same_group, valid)


def shapley_values(sim: jax.Array, key: jax.Array, config: AlignmentConfig,
                   players: jax.Array | None = None, valid: jax.Array | None = None) -> jax.Array:
  """The Monte Carlo Shapley values phi [k, k] of the games of `sim` (see
  `shapley_contrastive_loss`)."""
  return shapley.mc_shapley(sim, key, num_permutations=config.num_permutations,
                            utility=config.utility, tau=config.tau_u,
                            antithetic=config.antithetic, players=players, player_mask=valid)


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
  names, players, anchors, weights = _directions(t, c, u, config)
  if not names:
    return jnp.zeros((), t.dtype), {}
  sims = jax.vmap(shapley.cosine_similarity)(players, anchors)
  if config.kind == "infonce":
    losses = jax.vmap(lambda s: contrastive_loss(s, config.tau_c, same_group, valid))(sims)
  else:
    keys = jax.random.split(key, len(names))
    losses = jax.vmap(lambda s, k, p: shapley_contrastive_loss(s, k, config, p, same_group, valid))(
        sims, keys, players)
  return jnp.sum(weights * losses), dict(zip(names, losses))


def _directions(t, c, u, config: AlignmentConfig):
  """(names, players [n, k, d], anchors [n, k, d], lambdas [n]) of the active directions."""
  directions = {}  # name -> (players, anchors, lambda)
  if config.lambda_ct > 0:
    directions.update(c2t=(c, t, config.lambda_ct), t2c=(t, c, config.lambda_ct))
  if config.lambda_ci > 0 and u is not None:
    directions.update(c2i=(c, u, config.lambda_ci), i2c=(u, c, config.lambda_ci))
  if not directions:
    return (), None, None, None
  players = jnp.stack([p for p, _, _ in directions.values()])
  anchors = jnp.stack([a for _, a, _ in directions.values()])
  weights = jnp.asarray([w for _, _, w in directions.values()], t.dtype)
  return tuple(directions), players, anchors, weights


def negative_pairs(k: int, same_group: jax.Array | None = None,
                   valid: jax.Array | None = None) -> jax.Array:
  """Boolean [k, k]: player i is a negative of anchor j (both valid, i != j, other groups)."""
  negative = ~jnp.eye(k, dtype=bool)
  if same_group is not None:
    negative &= ~same_group_matrix(same_group)
  if valid is not None:
    negative &= valid[:, None] & valid[None, :]
  return negative


def _anchor_mean(values: jax.Array, valid: jax.Array | None) -> jax.Array:
  weights = jnp.ones(values.shape, jnp.float32) if valid is None else valid.astype(jnp.float32)
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def top1_accuracy(scores: jax.Array, same_group: jax.Array | None = None,
                  valid: jax.Array | None = None) -> jax.Array:
  """Share of valid anchors j whose own player scores strictly above all its negatives."""
  negative = negative_pairs(scores.shape[0], same_group, valid)
  best_negative = jnp.max(jnp.where(negative, scores, -jnp.inf), axis=0)
  return _anchor_mean((jnp.diagonal(scores) > best_negative).astype(jnp.float32), valid)


def pair_margin(scores: jax.Array, same_group: jax.Array | None = None,
                valid: jax.Array | None = None) -> jax.Array:
  """Mean score of the true pairs (valid anchors) minus the mean score of the negative pairs."""
  negative = negative_pairs(scores.shape[0], same_group, valid)
  others = jnp.sum(jnp.where(negative, scores, 0.0)) / jnp.maximum(jnp.sum(negative), 1)
  return _anchor_mean(jnp.diagonal(scores), valid) - others


def _cosine(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.sum(a * b) / jnp.maximum(jnp.linalg.norm(a) * jnp.linalg.norm(b), 1e-30)


def alignment_diagnostics(t: jax.Array,
                          c: jax.Array,
                          u: jax.Array | None,
                          key: jax.Array,
                          config: AlignmentConfig = AlignmentConfig(),
                          same_group: jax.Array | None = None,
                          valid: jax.Array | None = None) -> dict[str, jax.Array]:
  """How hard the in-batch games of `alignment_loss` are, per active direction d:

    d_top1                      top-1 retrieval accuracy on the cosine similarities
    d_phi_margin                `pair_margin` of the scores the loss ranks: the Monte Carlo
                                Shapley values (with `key`, the loss's permutations) for
                                kind="shapley", the similarities for kind="infonce"
    d_shapley_infonce_grad_cos  cosine between the gradients w.r.t. the similarity matrix of
                                the Shapley loss and of the InfoNCE loss (both at tau_c)

  Arguments as for `alignment_loss`.
  """
  names, players, anchors, _ = _directions(t, c, u, config)
  if not names:
    return {}
  sims = jax.vmap(shapley.cosine_similarity)(players, anchors)
  keys = jax.random.split(key, len(names))

  def one(sim, k, p):
    shapley_loss = lambda s: shapley_contrastive_loss(s, k, config, p, same_group, valid)
    infonce_loss = lambda s: contrastive_loss(s, config.tau_c, same_group, valid)
    scores = shapley_values(sim, k, config, p, valid) if config.kind == "shapley" else sim
    return {"top1": top1_accuracy(sim, same_group, valid),
            "phi_margin": pair_margin(scores, same_group, valid),
            "shapley_infonce_grad_cos": _cosine(jax.grad(shapley_loss)(sim),
                                                jax.grad(infonce_loss)(sim))}

  per_direction = jax.vmap(one)(sims, keys, players)
  return {f"{name}_{metric}": values[i] for metric, values in per_direction.items()
          for i, name in enumerate(names)}
