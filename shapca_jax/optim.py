"""AdamW with parameter groups, warm-up then linear decay, and gradient clipping (METHOD §6).

Three groups, each with its own peak learning rate and the same schedule shape:
  * ``encoder``: the pretrained text / image towers (top-level ``text_encoder`` / ``image_encoder``),
  * ``crf``: the CRF transition, start and end scores (top-level ``crf``),
  * ``new``: everything else (projection heads, fusion, classifiers).
Weight decay applies to every weight matrix and embedding but not to biases and normalisation
scales, the convention of BERT fine-tuning (``no_decay = ["bias", "LayerNorm.weight"]``).
"""

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

GROUPS = ("encoder", "new", "crf")
ENCODER_MODULES = ("text_encoder", "image_encoder")
CRF_MODULE = "crf"
NO_DECAY_LEAVES = ("bias", "scale")


def _path_keys(path) -> tuple[str, ...]:
  return tuple(str(getattr(entry, "key", entry)) for entry in path)


def param_group(path) -> str:
  """The learning-rate group of the parameter at ``path`` (a tree path of dict keys)."""
  keys = _path_keys(path)
  top = keys[0] if keys else ""
  if top in ENCODER_MODULES:
    return "encoder"
  if top == CRF_MODULE:
    return "crf"
  return "new"


def param_groups(params) -> Any:
  """A pytree of group names with the structure of ``params``."""
  return jax.tree_util.tree_map_with_path(lambda path, _: param_group(path), params)


def decay_mask(params) -> Any:
  """True where weight decay applies: not on biases and normalisation scales."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: _path_keys(path)[-1] not in NO_DECAY_LEAVES, params)


def warmup_linear_decay(peak_lr: float, total_steps: int, warmup_ratio: float) -> optax.Schedule:
  """Linear warm-up from 0 over ``warmup_ratio * total_steps`` steps, then linear decay to 0."""
  warmup_steps = int(round(warmup_ratio * total_steps))
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak_lr, max(warmup_steps, 1)),
       optax.linear_schedule(peak_lr, 0.0, max(total_steps - warmup_steps, 1))],
      boundaries=[warmup_steps])


def _check_groups(learning_rates: Mapping[str, float]) -> None:
  missing = [g for g in GROUPS if g not in learning_rates]
  if missing:
    raise ValueError(f"learning_rates lacks the groups {missing}; it needs {list(GROUPS)}")


def learning_rate_table(learning_rates: Mapping[str, float], total_steps: int,
                        warmup_ratio: float) -> dict[str, np.ndarray]:
  """Each group's learning rate of every update, as ``make_optimizer`` applies it: entry
  ``s - 1`` is the rate of the update that makes step ``s`` (optax evaluates a schedule at the
  count of updates before). Computed once, so logging the rates costs the loop nothing."""
  _check_groups(learning_rates)
  counts = jnp.arange(total_steps)
  return {group: np.asarray(warmup_linear_decay(learning_rates[group], total_steps,
                                                warmup_ratio)(counts))
          for group in GROUPS}


def make_optimizer(params, *, learning_rates: Mapping[str, float], total_steps: int,
                   warmup_ratio: float, weight_decay: float,
                   grad_clip_norm: float) -> optax.GradientTransformation:
  """Clip the global gradient norm, then AdamW per group with its own schedule."""
  _check_groups(learning_rates)
  transforms = {
      group: optax.adamw(
          warmup_linear_decay(learning_rates[group], total_steps, warmup_ratio),
          weight_decay=weight_decay, mask=decay_mask)
      for group in GROUPS
  }
  return optax.chain(
      optax.clip_by_global_norm(grad_clip_norm),
      optax.multi_transform(transforms, param_groups(params)),
  )
