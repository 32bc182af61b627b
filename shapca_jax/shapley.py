"""Shapley values of the per-anchor similarity games of Shap-CA (METHOD §4).

In a batch, k players (e.g. the contexts) play one cooperative game per anchor j (e.g. the
text of example j). All games are described by the similarity matrix `sim[i, j]` between
player i and anchor j, shape [k, k_a]; every Shapley value returned here has that shape too:
`phi[i, j]` is the contribution of player i in the game of anchor j.

Every utility of METHOD §4 (a reconstruction, see docs/method.md) values a coalition through
additive sums over its members, so a coalition's value follows from a few running sums:

  softmax_expectation  v_j(S) = sum_{i in S} softmax_S(s_.j / tau)_i s_ij   (default)
  mean_embedding       v_j(S) = cos(anchor_j, mean_{i in S} player_i)
  logsumexp            v_j(S) = tau log sum_{i in S} exp(s_ij / tau)
  uniform_mean         v_j(S) = mean_{i in S} s_ij      (closed form: `uniform_mean_shapley`)

with v_j(empty) = 0. `Game` captures that structure. The Monte Carlo estimator walks M
random permutations shared by all anchors (plus their reverses: antithetic sampling): the
values of all prefixes of a permutation follow from running sums of the per-player terms,
so an estimate costs O(M k k_a) and contains no Python loop over permutations, players or
anchors. On CPU the M permutations are walked in step by one scan over positions that keeps
the running sums in cache; on GPU/TPU the permuted terms are gathered at once and summed by
the native parallel cumulative sum. `exact_shapley` enumerates all coalitions and is the
reference for small k.
"""

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

UTILITIES = ("softmax_expectation", "mean_embedding", "logsumexp", "uniform_mean")

# Coalition enumeration costs 2^k rows; beyond this many players use `mc_shapley`.
EXACT_MAX_PLAYERS = 16

# Permutations are processed in chunks whose [k, chunk, k_a] intermediates hold at most
# this many elements, so memory stays flat in M (k = 1024 -> 16 permutations per chunk).
_CHUNK_ELEMENTS = 1 << 24

ValueFn = Callable[[tuple[jax.Array, ...], jax.Array | None], jax.Array]


class Game(NamedTuple):
  """k_a cooperative games over k players whose values depend on additive coalition sums.

  v_j(S) = value(sums, sq_norm)[j] with sums = tuple(sum_{i in S} t[i] for t in terms) and,
  when `gram` is set, sq_norm = ||sum_{i in S} x_i||^2 = sum_{i, i' in S} gram[i, i'] for the
  player vectors x. `value` is only called on non-empty coalitions; v(empty) = 0.

  Attributes:
    terms: per-player additive terms, each of shape [k, k_a] or [k, 1].
    value: maps coalition sums (leading batch axes, then k_a or 1) and the squared norm
      (same leading axes, then 1; None when gram is None) to values [..., k_a].
    gram: [k, k] Gram matrix of the player vectors, or None.
  """
  terms: tuple[jax.Array, ...]
  value: ValueFn
  gram: jax.Array | None = None

  @property
  def num_players(self) -> int:
    return self.terms[0].shape[0]

  @property
  def num_anchors(self) -> int:
    return max(t.shape[-1] for t in self.terms)


def _safe_ratio(num: jax.Array, den: jax.Array) -> jax.Array:
  """num / den where den > 0, else 0 (the value of a coalition of masked players only)."""
  ok = den > 0
  return jnp.where(ok, num / jnp.where(ok, den, 1), 0)


def _column_max(sim: jax.Array, mask: jax.Array) -> jax.Array:
  """Per-anchor max over unmasked players: the shift that keeps exp(s / tau) <= 1."""
  shift = jnp.max(jnp.where(mask > 0, sim, -jnp.inf), axis=0)
  return jax.lax.stop_gradient(jnp.where(jnp.isfinite(shift), shift, 0))


def _softmax_expectation(sim, mask, tau, players):
  del players
  # Shift invariance of the softmax: exact as long as (max - min) / tau stays below the
  # float range (~80 in float32), always true for cosine similarities and tau >= 0.025.
  e = jnp.exp((sim - _column_max(sim, mask)) / tau) * mask
  return Game((e * sim, e), lambda sums, _: _safe_ratio(*sums))


def _logsumexp(sim, mask, tau, players):
  del players
  shift = _column_max(sim, mask)
  e = jnp.exp((sim - shift) / tau) * mask

  def value(sums, _):
    (total,) = sums
    ok = total > 0
    return jnp.where(ok, tau * jnp.log(jnp.where(ok, total, 1)) + shift, 0)

  return Game((e,), value)


def _uniform_mean(sim, mask, tau, players):
  del tau, players
  return Game((sim * mask, mask), lambda sums, _: _safe_ratio(*sums))


def _mean_embedding(sim, mask, tau, players):
  """cos(a, sum x_i) = sum_i cos(x_i, a) ||x_i|| / ||sum x_i||: only sim and the Gram matrix."""
  del tau
  if players is None:
    raise ValueError("utility='mean_embedding' needs the player vectors: pass players=[k, d]")
  if players.ndim != 2 or players.shape[0] != sim.shape[0]:
    raise ValueError(f"players must have shape [k={sim.shape[0]}, d], got {players.shape}")
  players = players * mask
  gram = players @ players.T
  sq = jnp.diagonal(gram)[:, None]
  norms = jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1)), 0)

  def value(sums, sq_norm):
    (dots,) = sums
    ok = sq_norm > 0
    return jnp.where(ok, dots / jnp.sqrt(jnp.where(ok, sq_norm, 1)), 0)

  return Game((sim * norms,), value, gram)


_GAME_BUILDERS = {
    "softmax_expectation": _softmax_expectation,
    "mean_embedding": _mean_embedding,
    "logsumexp": _logsumexp,
    "uniform_mean": _uniform_mean,
}


def _check_sim(sim: jax.Array) -> None:
  if sim.ndim != 2:
    raise ValueError(f"sim must be [k_players, k_anchors], got shape {sim.shape}")


def make_game(sim: jax.Array,
              utility: str = "softmax_expectation",
              tau: float = 0.1,
              players: jax.Array | None = None,
              player_mask: jax.Array | None = None) -> Game:
  """The games of METHOD §4 for the similarities `sim` [k, k_a].

  Args:
    sim: similarity of player i to anchor j (cosine similarity for mean_embedding).
    utility: one of UTILITIES.
    tau: utility temperature tau_u (softmax_expectation and logsumexp).
    players: player vectors [k, d]; needed by mean_embedding only.
    player_mask: optional [k] booleans; False players (e.g. batch padding) are null players,
      which leaves the Shapley values of the others equal to those of the smaller game.

  Returns:
    The Game.
  """
  _check_sim(sim)
  if utility not in _GAME_BUILDERS:
    raise ValueError(f"utility must be one of {UTILITIES}, got {utility!r}")
  if not tau > 0:
    raise ValueError(f"tau must be positive, got {tau}")
  if player_mask is None:
    mask = jnp.ones((sim.shape[0], 1), sim.dtype)
  else:
    if player_mask.shape != sim.shape[:1]:
      raise ValueError(f"player_mask must have shape [{sim.shape[0]}], got {player_mask.shape}")
    mask = player_mask.astype(sim.dtype)[:, None]
  return _GAME_BUILDERS[utility](sim, mask, tau, players)


@functools.lru_cache(maxsize=None)
def _coalition_tables(k: int) -> tuple[np.ndarray, np.ndarray]:
  """Memberships of all non-empty coalitions [2^k - 1, k] and their Shapley weights.

  phi_i = sum_S v(S) coef[S, i] with coef = w(|S| - 1) if i in S else -w(|S|), where
  w(s) = s! (k - s - 1)! / k! weighs the marginal gain of i over a coalition of size s.
  """
  ids = np.arange(1, 2**k)
  members = (ids[:, None] >> np.arange(k)[None, :]) & 1
  size = members.sum(axis=1, keepdims=True)
  weight = np.array([math.factorial(s) * math.factorial(k - s - 1) / math.factorial(k)
                     for s in range(k)] + [0.0])
  coef = np.where(members == 1, weight[size - 1], -weight[size])
  return members.astype(np.float64), coef


def exact_game_shapley(game: Game) -> jax.Array:
  """Exact Shapley values [k, k_a] of `game` by enumerating all 2^k coalitions."""
  k = game.num_players
  if k > EXACT_MAX_PLAYERS:
    raise ValueError(f"exact Shapley enumerates 2^k coalitions: k={k} exceeds "
                     f"{EXACT_MAX_PLAYERS}; use mc_shapley")
  dtype = game.terms[0].dtype
  members, coef = (jnp.asarray(a, dtype) for a in _coalition_tables(k))
  sums = tuple(members @ t for t in game.terms)
  sq_norm = None
  if game.gram is not None:
    sq_norm = jnp.einsum("si,ij,sj->s", members, game.gram, members)[:, None]
  return coef.T @ game.value(sums, sq_norm)


@functools.partial(jax.jit, static_argnames=("utility", "tau"))
def exact_shapley(sim: jax.Array,
                  *,
                  utility: str = "softmax_expectation",
                  tau: float = 0.1,
                  players: jax.Array | None = None,
                  player_mask: jax.Array | None = None) -> jax.Array:
  """Exact Shapley values phi [k, k_a] of the games of `sim` (k <= EXACT_MAX_PLAYERS).

  See `make_game` for the arguments.
  """
  return exact_game_shapley(make_game(sim, utility, tau, players, player_mask))


def uniform_mean_shapley(sim: jax.Array) -> jax.Array:
  """Closed-form Shapley values of the uniform_mean utility (METHOD §4).

  phi_ij = s_ij / k + (s_ij - mean_{i' != i} s_i'j) (H_k - 1) / k, H_k the k-th harmonic
  number: affine in s, so a contrastive loss on it is InfoNCE with a rescaled temperature.
  """
  _check_sim(sim)
  k = sim.shape[0]
  if k == 1:
    return sim
  harmonic = sum(1.0 / n for n in range(1, k + 1))
  others_mean = (jnp.sum(sim, axis=0, keepdims=True) - sim) / (k - 1)
  return sim / k + (sim - others_mean) * (harmonic - 1) / k


# Below this many players a permutation's positions are counted with a k x k comparison,
# which on CPU beats XLA's comparator sort; above it, sorting is cheaper than O(k^2).
_RANK_BY_COUNTING_MAX = 64


def _inverse_permutations(perms: jax.Array) -> jax.Array:
  """inverse[m, perms[m, t]] = t for each row of perms [M, k]."""
  num, k = perms.shape
  index = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (num, k))
  return jnp.zeros_like(index).at[jnp.arange(num)[:, None], perms].set(index, unique_indices=True)


def _permutations_and_positions(key: jax.Array, num: int, k: int) -> tuple[jax.Array, jax.Array]:
  """Uniform random permutations perms [num, k] and their inverses, positions [num, k].

  Each row orders range(k) by independent random 32-bit words, ties broken by index, so the
  order is slightly non-uniform only on a tie. Counting positions with a tie-break costs two
  more comparisons per pair, so there the low b = ceil(log2 k) bits of each word are replaced
  by the player's index instead, which makes the keys of a row distinct: a tie of the top
  32 - b bits has probability < k^2 / 2^(33 - b) per row (3e-5 at k = 64); sorting keeps all
  32 bits (< k^2 / 2^33).
  """
  bits = jax.random.bits(key, (num, k), jnp.uint32)
  if k <= _RANK_BY_COUNTING_MAX:
    width = max(1, (k - 1).bit_length())
    keys = (bits >> width << width) | jnp.arange(k, dtype=jnp.uint32)
    positions = jnp.sum(keys[:, None, :] < keys[:, :, None], axis=-1, dtype=jnp.int32)
    return _inverse_permutations(positions), positions
  perms = jnp.argsort(bits, axis=1, stable=True).astype(jnp.int32)
  return perms, _inverse_permutations(perms)


def sample_permutations(key: jax.Array, num: int, k: int) -> jax.Array:
  """`num` independent uniform random permutations of range(k), int32 [num, k]."""
  return _permutations_and_positions(key, num, k)[0]


def _stacked_terms(game: Game):
  """All terms side by side [k, W], and the function splitting sums [..., W] back into terms."""
  splits = np.cumsum([t.shape[-1] for t in game.terms])[:-1]
  return jnp.concatenate(game.terms, axis=-1), lambda x: tuple(jnp.split(x, splits, axis=-1))


def _walked_orders(perms: jax.Array, positions: jax.Array, antithetic: bool):
  """The orders walked and their inverses: the permutations, then their reverses if antithetic."""
  if not antithetic:
    return perms, positions
  k = perms.shape[1]
  return jnp.concatenate([perms, perms[:, ::-1]]), jnp.concatenate([positions, k - 1 - positions])


def _walk_draws(game: Game, perms: jax.Array, positions: jax.Array, antithetic: bool,
                per_draw: bool) -> jax.Array:
  """Estimates summed per player, [k, M, k_a] per draw or [k, 1, k_a] over all draws (CPU).

  One scan over positions walks all orders in step: each step adds the joining players'
  terms to the running sums and scatter-adds their gains v(new) - v(old) to them, so no
  [k, M, k_a] intermediate exists unless per-draw sums are asked for. At small k a call
  costs the number of XLA ops run per step rather than arithmetic, hence v(old) is
  recomputed instead of carried, and the orders need no inverse.
  """
  num, k = perms.shape
  orders, _ = _walked_orders(perms, positions, antithetic)
  slots = num if per_draw else 1
  draw = jnp.arange(orders.shape[0], dtype=orders.dtype) % num  # an order and its reverse share
  weight = 0.5 if antithetic else 1.0
  stacked, unstack = _stacked_terms(game)

  def take(x, index):
    return x.at[index].get(mode="promise_in_bounds")

  def step(carry, joining):
    (sums, gram_rows, sq_norm), total = carry
    new_sums, new_gram_rows, new_sq_norm = sums + take(stacked, joining), None, None
    if gram_rows is not None:
      # Joining adds 2 x_t . (sum of members) + ||x_t||^2 to the squared norm of the sum.
      cross = jnp.take_along_axis(gram_rows, joining[:, None], axis=1, mode="promise_in_bounds")
      diagonal = game.gram.at[joining, joining].get(mode="promise_in_bounds")
      new_sq_norm = sq_norm + 2 * cross + diagonal[:, None]
      new_gram_rows = gram_rows + take(game.gram, joining)
    gain = game.value(unstack(new_sums), new_sq_norm) - game.value(unstack(sums), sq_norm)
    row = joining * slots + draw if per_draw else joining
    total = total.at[row].add(weight * gain, mode="promise_in_bounds")
    return ((new_sums, new_gram_rows, new_sq_norm), total), None

  width = orders.shape[0]
  state = (jnp.zeros((width, stacked.shape[-1]), stacked.dtype), None, None)
  if game.gram is not None:
    # Running Gram rows of the members: the joining player's entry is x_t . (sum of members).
    state = state[:1] + (jnp.zeros((width, k), stacked.dtype), jnp.zeros((width, 1), stacked.dtype))
  total = jnp.zeros((k * slots, game.num_anchors), stacked.dtype)
  (_, total), _ = jax.lax.scan(step, (state, total), orders.T)
  return total.reshape(k, slots, game.num_anchors)


def _parallel_values(game: Game, perms: jax.Array) -> jax.Array:
  """Prefix values [k, M, k_a] from gathered terms and parallel cumulative sums (GPU, TPU)."""
  order = perms.T
  cumsum = functools.partial(jax.lax.cumsum, axis=0)
  stacked, unstack = _stacked_terms(game)
  sums = unstack(cumsum(stacked[order]))
  sq_norm = None
  if game.gram is not None:
    gram = game.gram[order[:, :, None], perms[None, :, :]]  # [k, M, k] in walk order
    earlier = np.tri(gram.shape[0], gram.shape[0], -1, dtype=bool)[:, None, :]
    cross = jnp.sum(jnp.where(earlier, gram, 0), axis=-1)
    # Joining at position t adds 2 x_t . (sum of earlier players) + ||x_t||^2.
    sq_norm = cumsum(2 * cross + jnp.diagonal(gram, axis1=0, axis2=2).T)[..., None]
  return game.value(sums, sq_norm)


def _parallel_draws(game: Game, perms: jax.Array, positions: jax.Array, antithetic: bool,
                    per_draw: bool) -> jax.Array:
  """`_walk_draws` from the prefix values of all orders at once (GPU, TPU)."""
  num = perms.shape[0]
  orders, inverses = _walked_orders(perms, positions, antithetic)
  gains = jnp.diff(_parallel_values(game, orders), axis=0, prepend=0)
  draws = jnp.take_along_axis(gains, inverses.T[..., None], axis=0, mode="promise_in_bounds",
                              wrap_negative_indices=False)
  if antithetic:
    draws = 0.5 * (draws[:, :num] + draws[:, num:])
  return draws if per_draw else jnp.sum(draws, axis=1, keepdims=True)


def _draws(game: Game, perms: jax.Array, positions: jax.Array, antithetic: bool,
           per_draw: bool) -> jax.Array:
  """Shapley estimates summed per player: [k, M, k_a] per draw, or [k, 1, k_a] over draws.

  Draw m is each player's marginal gain in permutation m, with `antithetic` the mean over
  permutation m and its reverse.
  """
  return jax.lax.platform_dependent(
      perms, positions,
      cpu=functools.partial(_walk_draws, game, antithetic=antithetic, per_draw=per_draw),
      default=functools.partial(_parallel_draws, game, antithetic=antithetic, per_draw=per_draw))


def _chunk_size(num: int, per_permutation: int) -> int:
  """Largest divisor of num whose chunk stays within _CHUNK_ELEMENTS."""
  limit = max(1, _CHUNK_ELEMENTS // per_permutation)
  return max(c for c in range(1, min(num, limit) + 1) if num % c == 0)


def _estimate(game: Game, perms: jax.Array, positions: jax.Array, antithetic: bool,
              return_stderr: bool, chunk_size: int | None):
  """Mean (and standard error) of the per-draw estimates, chunk by chunk of permutations."""
  num, k = perms.shape
  if k != game.num_players:
    raise ValueError(f"permutations have {k} players, the game has {game.num_players}")
  width = max(game.num_anchors, k if game.gram is not None else 1)
  chunk = chunk_size or _chunk_size(num, k * width * (2 if antithetic else 1))
  if num % chunk:
    raise ValueError(f"chunk_size={chunk} must divide the number of permutations {num}")

  def moments(p, q):
    draws = _draws(game, p, q, antithetic, per_draw=return_stderr)
    return draws.sum(axis=1), (jnp.square(draws).sum(axis=1) if return_stderr else None)

  if chunk == num:
    total, total_sq = moments(perms, positions)
  else:
    def step(carry, chunk_perms):
      return jax.tree.map(jnp.add, carry, moments(*chunk_perms)), None

    zeros = jnp.zeros((k, game.num_anchors), game.terms[0].dtype)
    init = (zeros, zeros if return_stderr else None)
    chunks = tuple(x.reshape(num // chunk, chunk, k) for x in (perms, positions))
    (total, total_sq), _ = jax.lax.scan(step, init, chunks)
  phi = total / num
  if not return_stderr:
    return phi
  variance = jnp.maximum(total_sq - num * jnp.square(phi), 0) / max(num - 1, 1)
  return phi, jnp.sqrt(variance / num)


def shapley_from_permutations(game: Game,
                              perms: jax.Array,
                              *,
                              antithetic: bool = False,
                              return_stderr: bool = False,
                              chunk_size: int | None = None):
  """Monte Carlo Shapley values of `game` from the given permutations.

  Args:
    game: the games (see `make_game`).
    perms: int [M, k], each row a permutation of range(k); shared by all anchors.
    antithetic: also walk each permutation in reverse (2M orders).
    return_stderr: also return the standard error of each estimate, from the spread of
      the M draws (a permutation and its reverse count as one draw).
    chunk_size: permutations per chunk (must divide M); default: bounded memory.

  Returns:
    phi [k, k_a], or (phi, stderr) when return_stderr.
  """
  return _estimate(game, perms, _inverse_permutations(perms), antithetic, return_stderr,
                   chunk_size)


@functools.partial(jax.jit, static_argnames=("num_permutations", "utility", "tau", "antithetic",
                                             "return_stderr", "chunk_size"))
def mc_shapley(sim: jax.Array,
               key: jax.Array,
               *,
               num_permutations: int = 32,
               utility: str = "softmax_expectation",
               tau: float = 0.1,
               antithetic: bool = True,
               return_stderr: bool = False,
               players: jax.Array | None = None,
               player_mask: jax.Array | None = None,
               chunk_size: int | None = None):
  """Monte Carlo Shapley values phi [k, k_a] of the games of `sim` [k, k_a].

  Draws `num_permutations` permutations from `key` (plus their reverses when `antithetic`),
  shared by all anchors. Jitted; differentiable in `sim` (and `players`); usable under
  jax.vmap over extra batch axes. See `make_game` and `shapley_from_permutations` for
  the other arguments.
  """
  game = make_game(sim, utility, tau, players, player_mask)
  perms, positions = _permutations_and_positions(key, num_permutations, game.num_players)
  return _estimate(game, perms, positions, antithetic, return_stderr, chunk_size)


def cosine_similarity(players: jax.Array, anchors: jax.Array, eps: float = 1e-8) -> jax.Array:
  """sim[i, j] = cos(players[i], anchors[j]) for players [k, d] and anchors [k_a, d]."""
  def normalise(x):
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), eps**2))

  return normalise(players) @ normalise(anchors).T
