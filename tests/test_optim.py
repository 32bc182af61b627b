"""Parameter groups, decay mask and schedule of shapca_jax.optim against hand-computed values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shapca_jax import optim


def _params():
  return {
      "text_encoder": {"layer_0": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones((2,))},
                       "LayerNorm": {"scale": jnp.ones((2,)), "bias": jnp.ones((2,))}},
      "image_encoder": {"proj": {"kernel": jnp.ones((2, 2))}},
      "crf": {"transitions": jnp.ones((3, 3)), "start": jnp.ones((3,)), "end": jnp.ones((3,))},
      "head": {"dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones((3,))}},
  }


def test_groups_and_decay_mask():
  groups = optim.param_groups(_params())
  assert groups["text_encoder"]["layer_0"]["kernel"] == "encoder"
  assert groups["image_encoder"]["proj"]["kernel"] == "encoder"
  assert groups["crf"]["transitions"] == "crf"
  assert groups["head"]["dense"]["bias"] == "new"
  mask = optim.decay_mask(_params())
  assert mask["text_encoder"]["layer_0"]["kernel"]
  assert not mask["text_encoder"]["layer_0"]["bias"]
  assert not mask["text_encoder"]["LayerNorm"]["scale"]
  assert mask["crf"]["transitions"]


def test_schedule_warmup_then_linear_decay():
  sched = optim.warmup_linear_decay(1.0, total_steps=100, warmup_ratio=0.1)
  expected = {0: 0.0, 5: 0.5, 10: 1.0, 55: 0.5, 100: 0.0}
  for step, value in expected.items():
    np.testing.assert_allclose(float(sched(step)), value, atol=1e-6)


def test_first_step_uses_each_group_learning_rate():
  # With no warm-up, Adam's first update is -lr * g / (|g| + eps) - lr * wd * p: each group moves by
  # its own learning rate, and decay shows up only where the mask allows it.
  params = _params()
  lrs = {"encoder": 1e-3, "new": 1e-2, "crf": 1e-1}
  wd = 0.5
  tx = optim.make_optimizer(params, learning_rates=lrs, total_steps=10, warmup_ratio=0.0,
                            weight_decay=wd, grad_clip_norm=1e9)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["text_encoder"]["layer_0"]["kernel"], -1e-3 * (1 + wd), rtol=1e-5)
  np.testing.assert_allclose(updates["text_encoder"]["layer_0"]["bias"], -1e-3, rtol=1e-5)
  np.testing.assert_allclose(updates["head"]["dense"]["bias"], -1e-2, rtol=1e-5)
  np.testing.assert_allclose(updates["crf"]["transitions"], -1e-1 * (1 + wd), rtol=1e-5)


def test_learning_rate_table_is_the_rate_each_update_applies():
  # Adam's update of a constant gradient is lr * g / (|g| + eps): each step moves the params of
  # a group by the rate of that update, which the table must hold at index step - 1.
  params = {"text_encoder": {"w": jnp.zeros(())}, "head": {"w": jnp.zeros(())},
            "crf": {"transitions": jnp.zeros(())}}
  lrs = {"encoder": 1e-3, "new": 1e-2, "crf": 1e-1}
  total, warmup_ratio = 10, 0.3
  tx = optim.make_optimizer(params, learning_rates=lrs, total_steps=total,
                            warmup_ratio=warmup_ratio, weight_decay=0.0, grad_clip_norm=1e9)
  table = optim.learning_rate_table(lrs, total, warmup_ratio)
  grads = jax.tree.map(jnp.ones_like, params)
  opt_state, update = tx.init(params), jax.jit(tx.update)
  for step in range(1, total + 1):
    updates, opt_state = update(grads, opt_state, params)
    for group, top in (("encoder", "text_encoder"), ("new", "head"), ("crf", "crf")):
      moved = -float(jax.tree.leaves(updates[top])[0])
      np.testing.assert_allclose(moved, table[group][step - 1], rtol=1e-4, atol=1e-12)
  # Warm-up over round(0.3 * 10) = 3 updates from 0, then linear decay to 0 over the other 7.
  expected = [0, 1 / 3, 2 / 3, 1] + [1 - k / 7 for k in range(1, 7)]
  np.testing.assert_allclose(table["new"], np.array(expected) * 1e-2, rtol=1e-5, atol=1e-12)


def test_gradient_clipping_bounds_global_norm():
  params = {"head": {"w": jnp.zeros((4,))}}
  tx = optim.make_optimizer(params, learning_rates={"encoder": 1.0, "new": 1.0, "crf": 1.0},
                            total_steps=10, warmup_ratio=0.0, weight_decay=0.0, grad_clip_norm=1.0)
  grads = {"head": {"w": jnp.full((4,), 10.0)}}
  _, state = tx.update(grads, tx.init(params), params)
  # Adam's first moment after one step is (1 - b1) * clipped grad; a clipped norm of 1 over four
  # equal entries makes each 0.5.
  adam_state = state[1].inner_states["new"].inner_state[0]
  np.testing.assert_allclose(np.asarray(adam_state.mu["head"]["w"]), 0.1 * 0.5, rtol=1e-5)


def test_missing_group_is_named():
  with pytest.raises(ValueError, match="crf"):
    optim.make_optimizer(_params(), learning_rates={"encoder": 1.0, "new": 1.0}, total_steps=1,
                         warmup_ratio=0.0, weight_decay=0.0, grad_clip_norm=1.0)
