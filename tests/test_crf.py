"""Tests for shapca_jax.crf against brute-force path enumeration and pytorch-crf."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shapca_jax import crf

LABELS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-MISC", "I-MISC")


def _random_params(rng, num_tags, scale=1.0):
  return {
      "transitions": (scale * rng.normal(size=(num_tags, num_tags))).astype(np.float32),
      "start": rng.normal(size=num_tags).astype(np.float32),
      "end": rng.normal(size=num_tags).astype(np.float32),
  }


def _random_mask(rng, batch, time, contiguous):
  """Prefix masks from random lengths (0 included), or arbitrary on/off patterns."""
  if contiguous:
    return np.arange(time)[None, :] < rng.integers(0, time + 1, size=batch)[:, None]
  return rng.random((batch, time)) < 0.6


def _brute_force(params, emissions, mask, allowed=None):
  """Enumerates every tag path over each row's on positions, in float64.

  Returns per row: log-partition, gold-free Viterbi path (list), its score, and marginals
  [T, K] (zero at off positions). ``allowed`` (a CrfConstraints) removes forbidden paths.
  """
  transitions, start, end = (np.float64(params[k]) for k in ("transitions", "start", "end"))
  num_tags = transitions.shape[0]
  results = []
  for row_emissions, row_mask in zip(np.float64(emissions), mask):
    on = np.flatnonzero(row_mask)
    marginals = np.zeros(row_emissions.shape)
    if on.size == 0:
      results.append((0.0, [], 0.0, marginals))
      continue
    paths = np.array(list(itertools.product(range(num_tags), repeat=on.size)))
    scores = (start[paths[:, 0]] + end[paths[:, -1]]
              + row_emissions[on, paths].sum(axis=1)
              + transitions[paths[:, :-1], paths[:, 1:]].sum(axis=1))
    if allowed is not None:
      legal = (allowed.start[paths[:, 0]] & allowed.end[paths[:, -1]]
               & allowed.transitions[paths[:, :-1], paths[:, 1:]].all(axis=1))
      paths, scores = paths[legal], scores[legal]
    log_z = np.logaddexp.reduce(scores)
    probabilities = np.exp(scores - log_z)
    for step, position in enumerate(on):
      marginals[position] = np.bincount(paths[:, step], probabilities, minlength=num_tags)
    best = int(np.argmax(scores))
    results.append((log_z, paths[best].tolist(), scores[best], marginals))
  return results


def _path_score(params, row_emissions, on, path):
  p = {k: np.float64(v) for k, v in params.items()}
  if not path:
    return 0.0
  return (p["start"][path[0]] + p["end"][path[-1]] + sum(row_emissions[on, path])
          + sum(p["transitions"][a, b] for a, b in zip(path[:-1], path[1:])))


def _decoded_paths(tags):
  return [row[row >= 0].tolist() for row in np.asarray(tags)]


@pytest.mark.parametrize("num_tags,contiguous,scale", [
    (3, True, 1.0), (5, True, 1.0), (4, False, 1.0), (4, False, 40.0)])
def test_matches_brute_force(num_tags, contiguous, scale):
  rng = np.random.default_rng(num_tags + int(scale))
  batch, time = 8, 4
  params = _random_params(rng, num_tags, scale)
  emissions = (2 * rng.normal(size=(batch, time, num_tags))).astype(np.float32)
  mask = _random_mask(rng, batch, time, contiguous)
  tags = rng.integers(0, num_tags, size=(batch, time))
  expected = _brute_force(params, emissions, mask)

  log_z = jax.jit(crf.crf_log_partition)(params, emissions, mask)
  log_likelihood = jax.jit(crf.crf_log_likelihood)(params, emissions, tags, mask)
  decoded, scores = jax.jit(crf.crf_decode)(params, emissions, mask)
  marginals = jax.jit(crf.crf_marginals)(params, emissions, mask)

  tolerance = dict(rtol=1e-5, atol=1e-4 * scale)
  np.testing.assert_allclose(log_z, [r[0] for r in expected], **tolerance)
  gold = [_path_score(params, np.float64(e), np.flatnonzero(m), list(t[m]))
          for e, m, t in zip(emissions, mask, tags)]
  np.testing.assert_allclose(log_likelihood, np.array(gold) - [r[0] for r in expected],
                             **tolerance)
  assert _decoded_paths(decoded) == [r[1] for r in expected]
  np.testing.assert_allclose(scores, [r[2] for r in expected], **tolerance)
  np.testing.assert_allclose(marginals, np.stack([r[3] for r in expected]), atol=1e-5)
  assert np.all((np.asarray(decoded) >= 0) == mask)


def test_wide_transition_spans_stay_exact():
  # The leading tag 0 leaves only through e^-100 transitions, the e^-90 tag 1 through e^0
  # ones: a float32 rescaled step would lose both terms, the log-space fallback keeps them.
  params = {"transitions": np.array([[-100.0, -100.0], [0.0, 0.0]], np.float32),
            "start": np.zeros(2, np.float32), "end": np.zeros(2, np.float32)}
  emissions = np.array([[[0.0, -90.0], [0.0, 1.0], [2.0, 0.0]]], np.float32)
  mask = np.ones((1, 3), bool)
  expected = _brute_force(params, emissions, mask)[0]
  np.testing.assert_allclose(crf.crf_log_partition(params, emissions), [expected[0]], rtol=1e-6)
  np.testing.assert_allclose(crf.crf_marginals(params, emissions), expected[3][None], atol=1e-6)


def test_constrained_functions_match_brute_force_over_legal_paths():
  rng = np.random.default_rng(7)
  labels = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC")
  constraints = crf.bio_constraints(labels)
  params = _random_params(rng, len(labels))
  emissions = (2 * rng.normal(size=(6, 4, len(labels)))).astype(np.float32)
  mask = _random_mask(rng, 6, 4, contiguous=True)
  expected = _brute_force(params, emissions, mask, allowed=constraints)

  log_z = crf.crf_log_partition(params, emissions, mask, constraints=constraints)
  decoded, scores = crf.crf_decode(params, emissions, mask, constraints=constraints)
  marginals = crf.crf_marginals(params, emissions, mask, constraints=constraints)
  np.testing.assert_allclose(log_z, [r[0] for r in expected], rtol=1e-5, atol=1e-4)
  assert _decoded_paths(decoded) == [r[1] for r in expected]
  np.testing.assert_allclose(scores, [r[2] for r in expected], rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(marginals, np.stack([r[3] for r in expected]), atol=1e-5)


def _torch_crf(params):
  torch = pytest.importorskip("torch")
  torchcrf = pytest.importorskip("torchcrf")
  model = torchcrf.CRF(params["start"].shape[0], batch_first=True)
  with torch.no_grad():
    model.transitions.copy_(torch.from_numpy(params["transitions"]))
    model.start_transitions.copy_(torch.from_numpy(params["start"]))
    model.end_transitions.copy_(torch.from_numpy(params["end"]))
  return torch, model


def test_matches_pytorch_crf_likelihood_gradients_and_paths():
  rng = np.random.default_rng(0)
  batch, time, num_tags = 8, 12, len(LABELS)
  params = _random_params(rng, num_tags, scale=0.5)
  emissions = rng.normal(size=(batch, time, num_tags)).astype(np.float32)
  tags = rng.integers(0, num_tags, size=(batch, time))
  lengths = rng.integers(1, time + 1, size=batch)  # pytorch-crf needs the first step on.
  mask = np.arange(time)[None, :] < lengths[:, None]
  torch, model = _torch_crf(params)

  torch_emissions = torch.from_numpy(emissions).requires_grad_(True)
  torch_llh = model(torch_emissions, torch.from_numpy(tags), torch.from_numpy(mask),
                    reduction="none")
  torch_llh.sum().backward()
  total = lambda p, e: jnp.sum(crf.crf_log_likelihood(p, e, tags, lengths))
  llh = crf.crf_log_likelihood(params, emissions, tags, lengths)
  param_grads, emission_grads = jax.grad(total, argnums=(0, 1))(params, emissions)
  decoded, _ = crf.crf_decode(params, emissions, lengths)

  np.testing.assert_allclose(llh, torch_llh.detach().numpy(), rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(emission_grads, torch_emissions.grad.numpy(), atol=1e-5)
  for name, torch_param in (("transitions", model.transitions),
                            ("start", model.start_transitions), ("end", model.end_transitions)):
    np.testing.assert_allclose(param_grads[name], torch_param.grad.numpy(), atol=1e-4)
  assert _decoded_paths(decoded) == model.decode(torch.from_numpy(emissions),
                                                 torch.from_numpy(mask))


def test_batched_equals_per_example_and_padding_changes_nothing():
  rng = np.random.default_rng(1)
  batch, time, num_tags = 5, 7, 4
  params = _random_params(rng, num_tags)
  emissions = rng.normal(size=(batch, time, num_tags)).astype(np.float32)
  tags = rng.integers(0, num_tags, size=(batch, time))
  lengths = np.array([7, 3, 0, 1, 5])
  llh = crf.crf_log_likelihood(params, emissions, tags, lengths)
  decoded, scores = crf.crf_decode(params, emissions, lengths)

  for b, length in enumerate(lengths):
    single = lambda fn, *args: fn(params, emissions[b:b + 1, :length], *args)
    np.testing.assert_allclose(
        llh[b], single(crf.crf_log_likelihood, tags[b:b + 1, :length])[0], rtol=1e-6)
    row_tags, row_score = single(crf.crf_decode)
    assert _decoded_paths(row_tags)[0] == _decoded_paths(decoded)[b]
    np.testing.assert_allclose(scores[b], row_score[0], rtol=1e-6)

  # Garbage in the padding (huge emissions, ignore-index tags) must not leak in.
  padded_emissions = np.concatenate(
      [emissions, 1e3 * rng.normal(size=(batch, 3, num_tags)).astype(np.float32)], axis=1)
  padded_tags = np.concatenate([tags, np.full((batch, 3), -100)], axis=1)
  np.testing.assert_allclose(
      crf.crf_log_likelihood(params, padded_emissions, padded_tags, lengths), llh, rtol=1e-6)
  padded_decoded, padded_scores = crf.crf_decode(params, padded_emissions, lengths)
  assert _decoded_paths(padded_decoded) == _decoded_paths(decoded)
  assert np.all(np.asarray(padded_decoded)[:, time:] == -1)
  np.testing.assert_allclose(padded_scores, scores, rtol=1e-6)
  marginals = crf.crf_marginals(params, padded_emissions, lengths)
  np.testing.assert_allclose(jnp.sum(marginals, axis=-1),
                             np.arange(time + 3)[None, :] < lengths[:, None], atol=1e-5)


def test_lengths_bool_int_and_float_masks_agree():
  rng = np.random.default_rng(2)
  params = _random_params(rng, 3)
  emissions = rng.normal(size=(4, 6, 3)).astype(np.float32)
  tags = rng.integers(0, 3, size=(4, 6))
  lengths = np.array([6, 2, 0, 4])
  bool_mask = np.arange(6)[None, :] < lengths[:, None]
  reference = crf.crf_log_likelihood(params, emissions, tags, lengths)
  reference_tags, _ = crf.crf_decode(params, emissions, lengths)
  for mask in (bool_mask, bool_mask.astype(np.int32), bool_mask.astype(np.float32)):
    np.testing.assert_array_equal(crf.crf_log_likelihood(params, emissions, tags, mask),
                                  reference)
    np.testing.assert_array_equal(crf.crf_decode(params, emissions, mask)[0], reference_tags)


def test_empty_rows_give_zero_and_finite_gradients():
  rng = np.random.default_rng(3)
  params = crf.apply_constraints(_random_params(rng, len(LABELS)), crf.bio_constraints(LABELS))
  emissions = rng.normal(size=(2, 5, len(LABELS))).astype(np.float32)
  tags = np.zeros((2, 5), dtype=np.int32)
  lengths = np.array([0, 3])
  llh = crf.crf_log_likelihood(params, emissions, tags, lengths)
  grads = jax.grad(lambda p, e: jnp.sum(crf.crf_log_likelihood(p, e, tags, lengths)),
                   argnums=(0, 1))(params, emissions)
  decoded, scores = crf.crf_decode(params, emissions, lengths)
  assert llh[0] == 0.0 and scores[0] == 0.0 and np.isfinite(llh[1])
  assert np.all(np.asarray(decoded[0]) == -1)
  assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))
  np.testing.assert_array_equal(grads[1][0], 0.0)


def test_bio_constraints_follow_the_scheme():
  constraints = crf.bio_constraints(("O", "B-PER", "I-PER", "B-LOC", "I-LOC"))
  #                               to:  O      B-PER  I-PER  B-LOC  I-LOC
  expected = np.array([[True, True, False, True, False],   # from O
                       [True, True, True, True, False],    # from B-PER
                       [True, True, True, True, False],    # from I-PER
                       [True, True, False, True, True],    # from B-LOC
                       [True, True, False, True, True]])   # from I-LOC
  np.testing.assert_array_equal(constraints.transitions, expected)
  np.testing.assert_array_equal(constraints.start, [True, True, False, True, False])
  assert constraints.end.all()
  with pytest.raises(ValueError, match="'E-PER' at index 1"):
    crf.bio_transition_mask(("O", "E-PER"))


def test_constrained_decoding_never_emits_forbidden_transitions():
  rng = np.random.default_rng(4)
  constraints = crf.bio_constraints(LABELS)
  params = _random_params(rng, len(LABELS))
  # Emissions that favour I- tags make the unconstrained decoder break the scheme.
  emissions = 4 * rng.normal(size=(64, 20, len(LABELS))).astype(np.float32)
  emissions[..., 2::2] += 3.0
  mask = _random_mask(rng, 64, 20, contiguous=False)

  def violations(paths):
    return sum((not constraints.start[path[0]])
               + sum(not constraints.transitions[a, b] for a, b in zip(path[:-1], path[1:]))
               for path in paths if path)

  free, _ = crf.crf_decode(params, emissions, mask)
  constrained, _ = crf.crf_decode(params, emissions, mask, constraints=constraints)
  assert violations(_decoded_paths(free)) > 0
  assert violations(_decoded_paths(constrained)) == 0


def test_constrained_training_penalises_illegal_gold_without_nans():
  rng = np.random.default_rng(5)
  constraints = crf.bio_constraints(LABELS)
  params = _random_params(rng, len(LABELS))
  emissions = 30 * rng.normal(size=(2, 4, len(LABELS))).astype(np.float32)
  tags = np.array([[0, 1, 2, 0], [0, 2, 2, 0]])  # Row 1 has O -> I-PER.
  loss = lambda p, e: -jnp.sum(crf.crf_log_likelihood(p, e, tags, constraints=constraints))
  llh = crf.crf_log_likelihood(params, emissions, tags, constraints=constraints)
  grads = jax.grad(loss, argnums=(0, 1))(params, emissions)
  assert llh[1] < crf.FORBIDDEN_SCORE / 2 < llh[0]
  assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))
  # Forbidden entries are replaced, not penalised: they receive no gradient.
  np.testing.assert_array_equal(np.asarray(grads[0]["transitions"])[~constraints.transitions], 0)


def test_bfloat16_emissions_compute_in_float32():
  rng = np.random.default_rng(6)
  params = _random_params(rng, 5)
  emissions = jnp.asarray(rng.normal(size=(3, 6, 5)), jnp.bfloat16)
  tags = rng.integers(0, 5, size=(3, 6))
  llh = crf.crf_log_likelihood(params, emissions, tags)
  assert llh.dtype == jnp.float32
  np.testing.assert_allclose(
      llh, crf.crf_log_likelihood(params, emissions.astype(jnp.float32), tags), rtol=1e-6)


def test_bad_shapes_raise_clear_errors():
  params = _random_params(np.random.default_rng(0), 3)
  emissions = np.zeros((2, 4, 3), np.float32)
  with pytest.raises(ValueError, match=r"emissions must be \[batch, time, tags\]"):
    crf.crf_log_partition(params, emissions[0])
  with pytest.raises(ValueError, match=r"lengths must be .* got shape \(3,\)"):
    crf.crf_log_partition(params, emissions, np.array([1, 2, 3]))
  with pytest.raises(ValueError, match=r"tags must be \[batch, time\]"):
    crf.crf_log_likelihood(params, emissions, np.zeros((2, 3), np.int32))
  with pytest.raises(ValueError, match=r"params\['transitions'\] has shape \(3, 3\)"):
    crf.crf_decode(params, np.zeros((2, 4, 4), np.float32))


def test_flax_module_initialises_like_pytorch_crf_and_applies_constraints():
  rng = np.random.default_rng(8)
  module = crf.CRF(labels=LABELS)
  variables = module.init(jax.random.key(0), jnp.zeros((1, 2, len(LABELS))),
                          jnp.zeros((1, 2), jnp.int32))
  params = variables["params"]
  assert {k: v.shape for k, v in params.items()} == {
      "transitions": (9, 9), "start": (9,), "end": (9,)}
  values = np.concatenate([np.ravel(v) for v in params.values()])
  assert -0.1 <= values.min() < -0.08 and 0.08 < values.max() < 0.1

  emissions = rng.normal(size=(3, 5, len(LABELS))).astype(np.float32)
  tags = rng.integers(0, len(LABELS), size=(3, 5))
  lengths = np.array([5, 2, 4])
  constraints = crf.bio_constraints(LABELS)
  np.testing.assert_array_equal(module.apply(variables, emissions, tags, lengths),
                                crf.crf_log_likelihood(params, emissions, tags, lengths))
  np.testing.assert_array_equal(
      crf.CRF(labels=LABELS, constrained_training=True).apply(variables, emissions, tags, lengths),
      crf.crf_log_likelihood(params, emissions, tags, lengths, constraints=constraints))
  decoded = module.apply(variables, emissions, lengths, method="decode")
  expected = crf.crf_decode(params, emissions, lengths, constraints=constraints)
  np.testing.assert_array_equal(decoded[0], expected[0])
  with pytest.raises(ValueError, match="constrained_training=True"):
    crf.CRF(labels=LABELS, bio=False, constrained_training=True).apply(
        variables, emissions, tags, lengths)
