"""AdaptiveFusion against a float64 NumPy re-implementation of the METHOD §5 formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shapca_jax.models.fusion import AdaptiveFusion

B, L, N, H, HV, HC, HEADS = 2, 5, 4, 8, 6, 7, 2


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  text = rng.normal(size=(B, L, H)).astype(np.float32)
  image = rng.normal(size=(B, N, HV)).astype(np.float32)
  context = rng.normal(size=(B, HC)).astype(np.float32)
  text_mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=np.int32)
  image_mask = np.array([[True] * N, [True, True, False, False]])
  return text, image, context, text_mask, image_mask


def _init(module, inputs):
  text, image, context, text_mask, image_mask = inputs
  variables = module.init(jax.random.key(0), text, image, context, text_mask,
                          image_mask=image_mask)
  # Non-trivial LayerNorm and biases, so the oracle checks that they are applied.
  return jax.tree.map(
      lambda x: x + 0.1 * jax.random.normal(jax.random.key(x.size), x.shape, x.dtype), variables)


def _np_params(variables):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), variables["params"])


def _oracle_update(p, t, real, context, mode):
  """W_o A for one example, attending only over its real patches (slicing, not masking)."""
  dense = lambda name, x: x @ p[name]["kernel"] + p[name]["bias"]
  sigmoid = lambda x: 1.0 / (1.0 + np.exp(-x))
  q, k, v = dense("query", t), dense("key", real), dense("value", real)
  if mode == "adaptive":
    bridge = dense("bridge", context)
    gq = sigmoid(dense("gate_q", np.concatenate([q, np.tile(bridge, (len(q), 1))], 1)))
    gk = sigmoid(dense("gate_k", np.concatenate([k, np.tile(bridge, (len(k), 1))], 1)))
    q = gq * q + (1 - gq) * bridge
    k = gk * k + (1 - gk) * bridge
  d = H // HEADS
  heads = []
  for h in range(HEADS):
    cols = slice(h * d, (h + 1) * d)
    logits = q[:, cols] @ k[:, cols].T / np.sqrt(d)
    weights = np.exp(logits - logits.max(1, keepdims=True))
    weights /= weights.sum(1, keepdims=True)
    heads.append(weights @ v[:, cols])
  return dense("out", np.concatenate(heads, 1))


def _oracle(p, text, image, context, text_mask, image_mask, mode, eps=1e-12):
  """Per-example loops; an example without real patches and padded tokens get no update."""
  out = np.empty((B, L, H))
  for b in range(B):
    t = text[b].astype(np.float64)
    real = image[b][image_mask[b]].astype(np.float64)
    update = _oracle_update(p, t, real, context[b].astype(np.float64), mode) if len(real) else 0.0
    residual = t + update * text_mask[b][:, None]
    mean = residual.mean(-1, keepdims=True)
    var = residual.var(-1, keepdims=True)
    norm = (residual - mean) / np.sqrt(var + eps)
    out[b] = norm * p["layer_norm"]["scale"] + p["layer_norm"]["bias"]
  return out


@pytest.mark.parametrize("mode", ["adaptive", "plain"])
def test_matches_numpy_oracle(mode):
  inputs = _inputs()
  module = AdaptiveFusion(num_heads=HEADS, dropout_rate=0.1, mode=mode)
  variables = _init(module, inputs)
  fused = jax.jit(lambda v, *a: module.apply(v, *a[:4], image_mask=a[4]))(variables, *inputs)
  expected = _oracle(_np_params(variables), *inputs, mode=mode)
  np.testing.assert_allclose(np.asarray(fused), expected, rtol=1e-4, atol=1e-5)
  has_gates = {"bridge", "gate_q", "gate_k"} <= set(variables["params"])
  assert has_gates == (mode == "adaptive")


def test_padded_patches_and_imageless_examples():
  text, image, context, text_mask, image_mask = _inputs()
  module = AdaptiveFusion(num_heads=HEADS, dropout_rate=0.0)
  variables = _init(module, _inputs())
  fused = module.apply(variables, text, image, context, text_mask, image_mask=image_mask)
  scrambled = image.copy()
  scrambled[1, 2:] = 1e3  # values behind the mask must not matter
  refused = module.apply(variables, text, scrambled, context, text_mask, image_mask=image_mask)
  np.testing.assert_allclose(np.asarray(fused), np.asarray(refused), rtol=1e-6)

  no_image = image_mask.copy()
  no_image[1] = False
  fused = module.apply(variables, text, image, context, text_mask, image_mask=no_image)
  expected = _oracle(_np_params(variables), text, image, context, text_mask, no_image,
                     mode="adaptive")
  np.testing.assert_allclose(np.asarray(fused), expected, rtol=1e-4, atol=1e-5)


def test_gradient_reaches_gates_and_bridge():
  text, image, context, text_mask, image_mask = _inputs()
  module = AdaptiveFusion(num_heads=HEADS, dropout_rate=0.0)
  variables = _init(module, _inputs())
  target = np.random.default_rng(1).normal(size=(B, L, H))

  def loss(params):
    fused = module.apply({"params": params}, text, image, context, text_mask,
                         image_mask=image_mask)
    return jnp.sum((fused - target) ** 2)

  grads = jax.grad(loss)(variables["params"])
  for name in ("gate_q", "gate_k", "bridge"):
    for leaf in jax.tree.leaves(grads[name]):
      assert np.all(np.isfinite(leaf))
      assert np.abs(leaf).max() > 1e-6, name


def test_dropout_needs_rng_and_is_reproducible():
  text, image, context, text_mask, image_mask = _inputs()
  module = AdaptiveFusion(num_heads=HEADS, dropout_rate=0.5)
  variables = _init(module, _inputs())
  run = lambda key: module.apply(variables, text, image, context, text_mask,
                                 image_mask=image_mask, deterministic=False,
                                 rngs={"dropout": key})
  first, again, other = run(jax.random.key(1)), run(jax.random.key(1)), run(jax.random.key(2))
  np.testing.assert_array_equal(np.asarray(first), np.asarray(again))
  assert not np.allclose(np.asarray(first), np.asarray(other))
  evaluated = module.apply(variables, text, image, context, text_mask, image_mask=image_mask)
  assert not np.allclose(np.asarray(first), np.asarray(evaluated))


def test_bfloat16_compute_close_to_float32():
  inputs = _inputs()
  variables = _init(AdaptiveFusion(num_heads=HEADS), inputs)
  text, image, context, text_mask, image_mask = inputs
  full = AdaptiveFusion(num_heads=HEADS).apply(
      variables, text, image, context, text_mask, image_mask=image_mask)
  half = AdaptiveFusion(num_heads=HEADS, dtype=jnp.bfloat16).apply(
      variables, text, image, context, text_mask, image_mask=image_mask)
  assert half.dtype == jnp.bfloat16
  assert jax.tree.leaves(variables)[0].dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(half, np.float32), np.asarray(full), atol=0.1)


@pytest.mark.parametrize("kwargs, message", [
    ({"num_heads": HEADS, "mode": "gated"}, "config key `fusion`"),
    ({"num_heads": 3}, "not divisible by num_heads=3"),
])
def test_bad_configuration_is_named(kwargs, message):
  text, image, context, text_mask, _ = _inputs()
  with pytest.raises(ValueError, match=message):
    AdaptiveFusion(**kwargs).init(jax.random.key(0), text, image, context, text_mask)


def test_adaptive_without_context_is_an_error():
  text, image, _, text_mask, _ = _inputs()
  with pytest.raises(ValueError, match="needs context_vec"):
    AdaptiveFusion(num_heads=HEADS).init(jax.random.key(0), text, image, None, text_mask)
