"""Linear-chain conditional random field over a plain params pytree (METHOD §1).

The MNER head tags the first word-piece of every word with BIO labels; this module scores,
normalises and decodes those tag sequences. Everything is a pure function of

  params = {"transitions": [K, K], "start": [K], "end": [K]}

where ``transitions[i, j]`` scores tag ``i`` followed by tag ``j`` (the pytorch-crf layout),
so a checkpoint of ``torchcrf.CRF`` maps one to one. ``CRF`` is a small Flax module that holds
these parameters and the BIO constraints.

Which positions belong to a sequence. Every function takes ``lengths`` as one of:
  * ``[B]`` integers: positions ``0 .. lengths[b] - 1`` are the sequence (values above ``T``
    mean ``T``, values below 1 mean an empty sequence);
  * ``[B, T]`` mask of bools, integers or floats: the nonzero positions are the sequence, in
    order. The mask need not be contiguous: a position that is off is skipped, and the tags
    on either side of it are chained by one transition. Masking the first word-pieces of
    words inside a word-piece sequence therefore gives the word-level CRF directly.
  * ``None``: every position is on.
Positions that are off never change a result, whatever their emissions or tags hold (``-100``
or ``-1`` ignore labels are fine). An empty sequence has log-likelihood 0, log-partition 0
and decodes to all ``-1`` with score 0.

Constraints. ``bio_constraints(labels)`` forbids ``O -> I-x``, ``B-x/I-x -> I-y`` for
``y != x`` and starting on ``I-x``. ``apply_constraints`` overwrites every forbidden score with
the large finite ``FORBIDDEN_SCORE`` (never ``-inf``, so no ``-inf * 0`` NaNs in gradients);
every function accepts ``constraints=`` and applies them itself.

Numerics. Emissions are promoted to at least float32 (bfloat16 logits are fine). The forward
algorithm steps by one rescaled ``[B, K] @ [K, K]`` matmul (2-4x faster with its gradient on
CPU than a ``[B, K, K]`` log-sum-exp) and falls back to plain log space at run time when the
transition scores span too widely for that to be exact; marginals are the gradient of the
log-partition. Tags at on positions must lie in ``[0, K)``.

The public functions are jitted (shapes and ``None``-ness of ``lengths``/``constraints`` are
the cache key), so eager calls compile once per shape, and they nest inside a caller's jit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Params = dict[str, jax.Array]

# Replaces forbidden transition/start/end scores. Paths through one are e^-10000 times less
# likely than an allowed path, i.e. impossible in float32, yet every value stays finite.
# Scores at or below it count as forbidden wherever the code needs to tell them apart.
FORBIDDEN_SCORE = -1e4

_PARAM_NAMES = ("transitions", "start", "end")


class CrfConstraints(NamedTuple):
  """Which scores are allowed (True) or forbidden (False)."""
  transitions: np.ndarray  # [K, K] bool, [from, to].
  start: np.ndarray  # [K] bool.
  end: np.ndarray  # [K] bool.


def _parse_bio(labels: Sequence[str]) -> list[tuple[str, str | None]]:
  """Splits each label into (prefix, entity type): 'O' -> ('O', None), 'B-PER' -> ('B', 'PER')."""
  parsed = []
  for index, label in enumerate(labels):
    if label == "O":
      parsed.append(("O", None))
    elif len(label) > 2 and label[:2] in ("B-", "I-"):
      parsed.append((label[0], label[2:]))
    else:
      raise ValueError(f"label {label!r} at index {index} of {tuple(labels)} is not a BIO "
                       "label: expected 'O', 'B-<type>' or 'I-<type>'")
  return parsed


def bio_transition_mask(labels: Sequence[str]) -> np.ndarray:
  """Allowed BIO transitions ``[K, K]`` (``[from, to]``): ``I-x`` only after ``B-x`` or ``I-x``."""
  parsed = _parse_bio(labels)
  allowed = np.ones((len(parsed), len(parsed)), dtype=bool)
  for to, (to_prefix, to_type) in enumerate(parsed):
    if to_prefix == "I":
      allowed[:, to] = [prefix != "O" and entity == to_type for prefix, entity in parsed]
  return allowed


def bio_constraints(labels: Sequence[str]) -> CrfConstraints:
  """BIO constraints: the transition mask, no start on ``I-x``; any tag may end a sequence."""
  start = np.array([prefix != "I" for prefix, _ in _parse_bio(labels)])
  return CrfConstraints(transitions=bio_transition_mask(labels), start=start,
                        end=np.ones(len(labels), dtype=bool))


def apply_constraints(params: Params, constraints: CrfConstraints | None) -> Params:
  """Returns params with every forbidden score replaced by ``FORBIDDEN_SCORE``.

  Forbidden entries are replaced rather than penalised, so they get no gradient and cannot
  drift back; allowed entries are untouched.
  """
  if constraints is None:
    return params
  return {
      name: jnp.where(jnp.asarray(getattr(constraints, name)), params[name], FORBIDDEN_SCORE)
      for name in _PARAM_NAMES
  }


def _check_params(params: Params, num_tags: int) -> None:
  expected = {"transitions": (num_tags, num_tags), "start": (num_tags,), "end": (num_tags,)}
  for name, shape in expected.items():
    if name not in params:
      raise ValueError(f"CRF params lack {name!r}; expected keys {sorted(expected)}")
    if tuple(params[name].shape) != shape:
      raise ValueError(f"CRF params[{name!r}] has shape {tuple(params[name].shape)}, expected "
                       f"{shape} for emissions with {num_tags} tags")


def _prepare(params: Params, emissions: jax.Array, lengths: jax.Array | None,
             constraints: CrfConstraints | None) -> tuple[Params, jax.Array, jax.Array]:
  """Validates shapes; returns float params and emissions and the ``[B, T]`` bool mask."""
  emissions = jnp.asarray(emissions)
  if emissions.ndim != 3:
    raise ValueError(f"emissions must be [batch, time, tags], got shape {emissions.shape}")
  batch, time, num_tags = emissions.shape
  _check_params(params, num_tags)
  dtype = jnp.promote_types(emissions.dtype, jnp.float32)
  params = apply_constraints({k: jnp.asarray(params[k], dtype) for k in _PARAM_NAMES}, constraints)
  if lengths is None:
    mask = jnp.ones((batch, time), dtype=bool)
  else:
    lengths = jnp.asarray(lengths)
    if lengths.shape == (batch,):
      mask = jnp.arange(time)[None, :] < lengths[:, None]
    elif lengths.shape == (batch, time):
      mask = lengths != 0
    else:
      raise ValueError(f"lengths must be [batch] lengths of shape {(batch,)} or a [batch, time] "
                       f"mask of shape {(batch, time)}, got shape {lengths.shape}")
  return params, emissions.astype(dtype), mask


def _time_major(x: jax.Array) -> jax.Array:
  return jnp.swapaxes(x, 0, 1)


def _chain_positions(mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per position, the index of the previous on-position (-1 if none) and whether it is last."""
  positions = jnp.where(mask, jnp.arange(mask.shape[1]), -1)
  last_so_far = jax.lax.cummax(positions, axis=1)
  previous = jnp.pad(last_so_far[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
  is_last = mask & (positions == last_so_far[:, -1:])
  return previous, is_last


@jax.jit
def crf_sequence_score(params: Params, emissions: jax.Array, tags: jax.Array,
                       lengths: jax.Array | None = None, *,
                       constraints: CrfConstraints | None = None) -> jax.Array:
  """Unnormalised score ``[B]`` of the given tag paths (start + emissions + transitions + end)."""
  params, emissions, mask = _prepare(params, emissions, lengths, constraints)
  tags = jnp.asarray(tags)
  if tags.shape != mask.shape:
    raise ValueError(f"tags must be [batch, time]={mask.shape}, got shape {tags.shape}")
  tags = jnp.where(mask, tags, 0).astype(jnp.int32)
  previous, is_last = _chain_positions(mask)
  previous_tags = jnp.take_along_axis(tags, jnp.maximum(previous, 0), axis=1)
  has_previous = previous >= 0
  per_position = (
      jnp.take_along_axis(emissions, tags[..., None], axis=2)[..., 0]
      + jnp.where(has_previous, params["transitions"][previous_tags, tags], params["start"][tags])
      + jnp.where(is_last, params["end"][tags], 0.0))
  return jnp.sum(jnp.where(mask, per_position, 0.0), axis=1)


def _exact_chain(transitions: jax.Array) -> Callable[[jax.Array], jax.Array]:
  """``alpha [B, K] -> log sum_i exp(alpha_i + transitions[i, j])``, plain log space."""
  return lambda alpha: jax.nn.logsumexp(alpha[:, :, None] + transitions, axis=1)


def _scaled_chain(transitions: jax.Array) -> Callable[[jax.Array], jax.Array]:
  """The same as ``_exact_chain`` as one matmul in rescaled probability space.

  On CPU this is 2-4x faster with its gradient than the ``[B, K, K]`` log-sum-exp. Terms
  smaller than ``tiny`` times the largest one are dropped, so it is exact to rounding while
  the allowed transition scores span less than ``_scaled_span_limit`` (see
  ``crf_log_partition``). Shifts carry no gradient: the result does not depend on them.
  """
  top = jax.lax.stop_gradient(jnp.max(transitions))
  weights = jnp.exp(transitions - top)
  tiny = jnp.finfo(transitions.dtype).tiny

  def chain(alpha):
    peak = jax.lax.stop_gradient(jnp.max(alpha, axis=1, keepdims=True))
    # HIGHEST: GPUs would otherwise use TF32 and TPUs bfloat16 passes for this float32 dot.
    mass = jnp.matmul(jnp.exp(alpha - peak), weights, precision=jax.lax.Precision.HIGHEST)
    # The floor keeps tags unreachable from the leading ones finite (no NaN gradients).
    return jnp.log(jnp.maximum(mass, tiny)) + peak + top
  return chain


def _scaled_span_limit(dtype: jnp.dtype) -> float:
  """Largest span of allowed transition scores for which dropped terms stay below rounding.

  A dropped term is below ``tiny`` relative to the leading state; it can regain at most
  ``exp(span)`` through a transition, which must keep it under ``eps``.
  """
  info = jnp.finfo(dtype)
  return math.log(float(info.eps) / float(info.tiny))


def _forward_log_z(chain: Callable[[jax.Array], jax.Array], start: jax.Array, end: jax.Array,
                   emissions: jax.Array, mask: jax.Array, is_first: jax.Array) -> jax.Array:
  """The forward algorithm: log-partition ``[B]``; off positions carry alpha unchanged."""
  def step(alpha, inputs):
    emission, on, first = inputs
    new_alpha = jnp.where(first[:, None], start, chain(alpha)) + emission
    return jnp.where(on[:, None], new_alpha, alpha), None

  alpha0 = jnp.zeros(emissions.shape[::2], emissions.dtype)
  alpha, _ = jax.lax.scan(
      step, alpha0, (_time_major(emissions), _time_major(mask), _time_major(is_first)))
  return jax.nn.logsumexp(alpha + end, axis=1)


@jax.jit
def crf_log_partition(params: Params, emissions: jax.Array, lengths: jax.Array | None = None,
                      *, constraints: CrfConstraints | None = None) -> jax.Array:
  """Log of the sum over all tag paths of exp(score), ``[B]``: the forward algorithm.

  The fast rescaled step is used while the allowed transition scores (those above
  ``FORBIDDEN_SCORE``) span at most ~71 in float32; wider spans switch to the plain
  log-space step at run time, so the result is exact to float rounding either way.
  """
  params, emissions, mask = _prepare(params, emissions, lengths, constraints)
  previous, _ = _chain_positions(mask)
  is_first = mask & (previous < 0)
  transitions = params["transitions"]
  top = jnp.max(transitions)
  bottom = jnp.min(jnp.where(transitions > FORBIDDEN_SCORE, transitions, top))
  forward = lambda chain: lambda: _forward_log_z(
      chain(transitions), params["start"], params["end"], emissions, mask, is_first)
  log_z = jax.lax.cond(top - bottom <= _scaled_span_limit(transitions.dtype),
                       forward(_scaled_chain), forward(_exact_chain))
  return jnp.where(jnp.any(mask, axis=1), log_z, 0.0)


@jax.jit
def crf_log_likelihood(params: Params, emissions: jax.Array, tags: jax.Array,
                       lengths: jax.Array | None = None, *,
                       constraints: CrfConstraints | None = None) -> jax.Array:
  """Log-likelihood ``[B]`` of ``tags`` given ``emissions [B, T, K]``; the loss is its negation.

  Args:
    params: ``{"transitions": [K, K], "start": [K], "end": [K]}``.
    emissions: unary scores ``[B, T, K]``.
    tags: gold tags ``[B, T]``; values at off positions are ignored.
    lengths: ``[B]`` lengths or a ``[B, T]`` mask (see the module docstring); None = all on.
    constraints: forbidden scores to apply first, e.g. ``bio_constraints(labels)``.
  """
  kwargs = dict(lengths=lengths, constraints=constraints)
  return (crf_sequence_score(params, emissions, tags, **kwargs)
          - crf_log_partition(params, emissions, **kwargs))


@jax.jit
def crf_marginals(params: Params, emissions: jax.Array, lengths: jax.Array | None = None, *,
                  constraints: CrfConstraints | None = None) -> jax.Array:
  """Posterior ``P(tag_t = k | x)`` as ``[B, T, K]``; rows at off positions are all zero."""
  total_log_z = lambda e: jnp.sum(crf_log_partition(params, e, lengths, constraints=constraints))
  dtype = jnp.promote_types(jnp.asarray(emissions).dtype, jnp.float32)
  return jax.grad(total_log_z)(jnp.asarray(emissions, dtype))


@jax.jit
def crf_decode(params: Params, emissions: jax.Array, lengths: jax.Array | None = None, *,
               constraints: CrfConstraints | None = None) -> tuple[jax.Array, jax.Array]:
  """Viterbi: the best tag path per row and its score.

  Returns:
    ``(tags, scores)``: ``tags [B, T]`` int32 with ``-1`` at off positions, and
    ``scores [B]``, the ``crf_sequence_score`` of those tags (0 for an empty row).
  """
  params, emissions, mask = _prepare(params, emissions, lengths, constraints)
  params, emissions = jax.lax.stop_gradient((params, emissions))
  previous, _ = _chain_positions(mask)
  is_first = mask & (previous < 0)
  transitions, start = params["transitions"], params["start"]
  num_tags = emissions.shape[2]
  # Off positions point every tag back to itself, so the backtrace walks through them.
  identity = jnp.broadcast_to(jnp.arange(num_tags, dtype=jnp.int32), emissions.shape[::2])

  def forward(delta, inputs):
    emission, on, first = inputs
    candidates = delta[:, :, None] + transitions
    best_previous = jnp.argmax(candidates, axis=1).astype(jnp.int32)
    chained = jnp.max(candidates, axis=1)
    new_delta = jnp.where(first[:, None], start, chained) + emission
    pointer = jnp.where((on & ~first)[:, None], best_previous, identity)
    return jnp.where(on[:, None], new_delta, delta), pointer

  delta0 = jnp.zeros(emissions.shape[::2], emissions.dtype)
  delta, pointers = jax.lax.scan(
      forward, delta0, (_time_major(emissions), _time_major(mask), _time_major(is_first)))
  final = delta + params["end"]

  def backward(tag, inputs):
    pointer, on = inputs
    return jnp.take_along_axis(pointer, tag[:, None], axis=1)[:, 0], jnp.where(on, tag, -1)

  last_tag = jnp.argmax(final, axis=1).astype(jnp.int32)
  _, tags = jax.lax.scan(backward, last_tag, (pointers, _time_major(mask)), reverse=True)
  nonempty = jnp.any(mask, axis=1)
  return _time_major(tags), jnp.where(nonempty, jnp.max(final, axis=1), 0.0)


def _uniform_init(scale: float) -> nn.initializers.Initializer:
  """Uniform on [-scale, scale), the pytorch-crf initialisation."""
  def init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, minval=-scale, maxval=scale)
  return init


class CRF(nn.Module):
  """Holds CRF parameters for ``labels`` and applies the BIO constraints.

  Attributes:
    labels: the tag names; ``len(labels)`` is the number of tags.
    bio: build ``bio_constraints(labels)`` and apply them whenever decoding (and in
      ``marginals``, so they agree with the decoded paths). False for non-BIO tag sets.
    constrained_training: also apply them in the log-likelihood (requires ``bio``).
    init_scale: parameters start uniform in ``[-init_scale, init_scale)`` like pytorch-crf.
  """
  labels: Sequence[str]
  bio: bool = True
  constrained_training: bool = False
  init_scale: float = 0.1

  def setup(self):
    if self.constrained_training and not self.bio:
      raise ValueError("CRF(constrained_training=True) needs bio=True: there are no "
                       "constraints to train with")
    self.constraints = bio_constraints(self.labels) if self.bio else None
    num_tags = len(self.labels)
    init = _uniform_init(self.init_scale)
    self.transitions = self.param("transitions", init, (num_tags, num_tags))
    self.start = self.param("start", init, (num_tags,))
    self.end = self.param("end", init, (num_tags,))

  def _params(self) -> Params:
    return {"transitions": self.transitions, "start": self.start, "end": self.end}

  def __call__(self, emissions: jax.Array, tags: jax.Array,
               lengths: jax.Array | None = None) -> jax.Array:
    """Log-likelihood ``[B]``; constrained only when ``constrained_training``."""
    constraints = self.constraints if self.constrained_training else None
    return crf_log_likelihood(self._params(), emissions, tags, lengths, constraints=constraints)

  def decode(self, emissions: jax.Array,
             lengths: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Constrained Viterbi: ``(tags [B, T] with -1 at off positions, scores [B])``."""
    return crf_decode(self._params(), emissions, lengths, constraints=self.constraints)

  def marginals(self, emissions: jax.Array, lengths: jax.Array | None = None) -> jax.Array:
    """Constrained posterior marginals ``[B, T, K]``."""
    return crf_marginals(self._params(), emissions, lengths, constraints=self.constraints)
