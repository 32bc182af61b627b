"""Shap-CA for multimodal NER in PyTorch, as the field writes it: the baseline of our JAX model.

The same computation as ``shapca_jax.models.shapca.ShapCA`` plus ``shapca_jax.train.train_step``
(METHOD §3-§6, the project's reconstruction), built from the usual PyTorch parts:

  transformers ``BertModel`` / ``CLIPVisionModel``   the text and image towers
  pytorch-crf ``torchcrf.CRF``                       the tagging CRF (``LinearChainCRF`` below,
                                                     equal to it, when pytorch-crf is missing)
  a Python loop over Monte Carlo permutations        the Shapley contrastive alignment
  ``torch.optim.AdamW`` + ``LambdaLR``               the parameter groups of ``shapca_jax.optim``

``load_flax_params(model, params)`` copies the Flax params of a ``ShapCA`` into ``ShapCATorch``,
so both run the same weights. The permutations are drawn by a ``PermutationSampler``; the
default draws them with ``torch.randperm``, and a parity check passes the ones JAX drew.

  model = ShapCATorch(text_config, MNER_LABELS, vision_config, proj_dim=256)
  load_flax_params(model, flax_params)
  trainer = TorchTrainer(model, align=AlignmentConfig(), learning_rates={...}, total_steps=...)
  metrics = trainer.step(to_torch_batch(batch))    # a batch of shapca_jax.data

Only the default CRF setting is covered: ``crf.constrained_training=True`` has no baseline.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from shapca_jax.losses import AlignmentConfig
from shapca_jax.models import weights
from shapca_jax.models.bert import BertConfig
from shapca_jax.models.vision import VisionConfig

try:
  import torchcrf
except ImportError:  # accelerator images may lack pytorch-crf; LinearChainCRF equals it
  torchcrf = None

Batch = Mapping[str, torch.Tensor]
# (direction name, number of permutations M, number of players k) -> int64 [M, k].
PermutationSampler = Callable[[str, int, int], torch.Tensor]
# Torch parameter name -> (Flax parameter path, torch array -> Flax array).
FlaxLayout = dict[str, tuple[tuple[str, ...], Callable[[np.ndarray], np.ndarray]]]

DIRECTIONS = ("c2t", "t2c", "c2i", "i2c")
ENCODER_MODULES = ("text_encoder", "image_encoder")
_CRF_NAMES = {"transitions": "transitions", "start_transitions": "start",
              "end_transitions": "end"}


# ----------------------------------------------------------------------------- CRF


class LinearChainCRF(nn.Module):
  """``torchcrf.CRF(num_tags, batch_first=True)``'s log-likelihood, for images without it.

  Same parameter names, initialisation and ``forward(emissions, tags, mask, reduction)``.
  """

  def __init__(self, num_tags: int):
    super().__init__()
    self.num_tags = num_tags
    self.start_transitions = nn.Parameter(torch.empty(num_tags).uniform_(-0.1, 0.1))
    self.end_transitions = nn.Parameter(torch.empty(num_tags).uniform_(-0.1, 0.1))
    self.transitions = nn.Parameter(torch.empty(num_tags, num_tags).uniform_(-0.1, 0.1))

  def forward(self, emissions: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor,
              reduction: str = "none") -> torch.Tensor:
    if reduction != "none":
      raise ValueError(f"only reduction='none' is implemented, got {reduction!r}")
    if not bool(mask[:, 0].all()):
      raise ValueError("mask of the first timestep must all be on")
    rows = torch.arange(emissions.shape[0], device=emissions.device)
    on = mask.to(emissions.dtype)
    score = self.start_transitions[tags[:, 0]] + emissions[rows, 0, tags[:, 0]]
    alpha = self.start_transitions + emissions[:, 0]
    for i in range(1, emissions.shape[1]):
      score = score + (self.transitions[tags[:, i - 1], tags[:, i]]
                       + emissions[rows, i, tags[:, i]]) * on[:, i]
      step = torch.logsumexp(alpha[:, :, None] + self.transitions + emissions[:, i, None], dim=1)
      alpha = torch.where(mask[:, i, None], step, alpha)
    last = tags[rows, mask.long().sum(dim=1) - 1]
    score = score + self.end_transitions[last]
    return score - torch.logsumexp(alpha + self.end_transitions, dim=1)


def make_crf(num_tags: int, implementation: str = "auto") -> nn.Module:
  """``torchcrf.CRF`` ("torchcrf", or "auto" when installed), else ``LinearChainCRF``."""
  if implementation not in ("auto", "torchcrf", "in_file"):
    raise ValueError(f"crf implementation must be auto, torchcrf or in_file, got "
                     f"{implementation!r}")
  if implementation == "torchcrf" and torchcrf is None:
    raise ImportError("pytorch-crf is not installed (pip install pytorch-crf)")
  if implementation == "in_file" or torchcrf is None:
    return LinearChainCRF(num_tags)
  return torchcrf.CRF(num_tags, batch_first=True)


# ----------------------------------------------------------------------------- model


def _bert(config: BertConfig) -> transformers.BertModel:
  return transformers.BertModel(transformers.BertConfig(**dataclasses.asdict(config)),
                                add_pooling_layer=False)


def _clip(config: VisionConfig) -> transformers.CLIPVisionModel:
  if config.family != "clip":
    raise ValueError(f"the PyTorch baseline has a CLIP image tower only, got family "
                     f"{config.family!r}")
  if not isinstance(config.image_size, int) or not isinstance(config.patch_size, int):
    raise ValueError("CLIPVisionModel needs square images: image_size and patch_size must be "
                     f"ints, got {config.image_size!r} and {config.patch_size!r}")
  names = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "num_channels", "image_size", "patch_size", "hidden_act", "layer_norm_eps",
           "attention_dropout", "initializer_range")
  return transformers.CLIPVisionModel(
      transformers.CLIPVisionConfig(**{n: getattr(config, n) for n in names}))


def masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
  weights_ = mask.float()[..., None]
  return (states.float() * weights_).sum(1) / weights_.sum(1).clamp_min(1.0)


class AlignmentProjection(nn.Module):
  """Linear -> GELU -> Linear, then L2 normalisation."""

  def __init__(self, in_features: int, features: int):
    super().__init__()
    self.hidden = nn.Linear(in_features, features)
    self.out = nn.Linear(features, features)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return F.normalize(self.out(F.gelu(self.hidden(x))).float(), dim=-1, eps=1e-12)


class AdaptiveFusion(nn.Module):
  """Text queries attend to image patches; context-bridged gates on queries and keys."""

  def __init__(self, hidden: int, image_hidden: int, context_hidden: int, num_heads: int,
               dropout_rate: float, mode: str = "adaptive", layer_norm_eps: float = 1e-12):
    super().__init__()
    if mode not in ("adaptive", "plain"):
      raise ValueError(f"fusion mode must be adaptive or plain, got {mode!r}")
    self.mode, self.num_heads = mode, num_heads
    self.query = nn.Linear(hidden, hidden)
    self.key = nn.Linear(image_hidden, hidden)
    self.value = nn.Linear(image_hidden, hidden)
    if mode == "adaptive":
      self.bridge = nn.Linear(context_hidden, hidden)
      self.gate_q = nn.Linear(2 * hidden, hidden)
      self.gate_k = nn.Linear(2 * hidden, hidden)
    self.out = nn.Linear(hidden, hidden)
    self.dropout = nn.Dropout(dropout_rate)
    self.layer_norm = nn.LayerNorm(hidden, eps=layer_norm_eps)

  @staticmethod
  def _gated(gate: nn.Linear, x: torch.Tensor, bridge: torch.Tensor) -> torch.Tensor:
    bridge = bridge[:, None].expand_as(x)
    g = torch.sigmoid(gate(torch.cat([x, bridge], dim=-1)))
    return g * x + (1 - g) * bridge

  def forward(self, text: torch.Tensor, image: torch.Tensor, context: Optional[torch.Tensor],
              text_mask: torch.Tensor) -> torch.Tensor:
    q, k, v = self.query(text), self.key(image), self.value(image)
    if self.mode == "adaptive":
      bridge = self.bridge(context)
      q, k = self._gated(self.gate_q, q, bridge), self._gated(self.gate_k, k, bridge)
    heads = lambda x: x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
    attended = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))
    update = self.dropout(self.out(attended.transpose(1, 2).flatten(2)))
    update = update * text_mask[..., None].to(update.dtype)  # padding receives no image update
    return self.layer_norm(text + update)


class TaggingHead(nn.Module):
  """Emission scores at each word's first word-piece."""

  def __init__(self, hidden: int, num_tags: int):
    super().__init__()
    self.emissions = nn.Linear(hidden, num_tags)

  def forward(self, states: torch.Tensor, word_starts: torch.Tensor) -> torch.Tensor:
    index = word_starts[..., None].expand(-1, -1, states.shape[-1])
    return self.emissions(torch.gather(states, 1, index)).float()


class ShapCATorch(nn.Module):
  """The PyTorch twin of ``shapca_jax.models.shapca.ShapCA``; same arguments, same outputs."""

  def __init__(self, text_config: BertConfig, labels: Sequence[str],
               vision_config: Optional[VisionConfig] = None, *, use_context: bool = True,
               align_views: str = "joint", proj_dim: int = 256, dropout_rate: float = 0.1,
               fusion_mode: str = "adaptive", fusion_heads: int = 8,
               crf_implementation: str = "auto"):
    super().__init__()
    if align_views not in ("joint", "separate"):
      raise ValueError(f"align_views must be joint or separate, got {align_views!r}")
    self.use_context, self.align_views = use_context, align_views
    hidden = text_config.hidden_size
    self.text_encoder = _bert(text_config)
    self.text_proj = AlignmentProjection(hidden, proj_dim)
    if use_context:
      self.context_proj = AlignmentProjection(hidden, proj_dim)
    self.image_encoder = None
    if vision_config is not None:
      self.image_encoder = _clip(vision_config)
      self.image_proj = AlignmentProjection(vision_config.hidden_size, proj_dim)
      self.fusion = AdaptiveFusion(hidden, vision_config.hidden_size, hidden, fusion_heads,
                                   dropout_rate, fusion_mode)
    self.dropout = nn.Dropout(dropout_rate)
    self.tagger = TaggingHead(hidden, len(labels))
    self.crf = make_crf(len(labels), crf_implementation)

  def _encode_text(self, ids, token_types, mask) -> torch.Tensor:
    return self.text_encoder(input_ids=ids, token_type_ids=token_types,
                             attention_mask=mask).last_hidden_state

  def _encode_view(self, batch: Batch, view: int) -> torch.Tensor:
    """The pooled text-only (view 0) or context-only (view 1) pass of the batch."""
    ids = batch["views_input_ids"][:, view]
    states = self._encode_text(ids, torch.zeros_like(ids), batch["views_attention_mask"][:, view])
    return masked_mean(states, batch["views_mask"][:, view])

  def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
    """Alignment vectors, emissions and the CRF log-likelihood per example."""
    states = self._encode_text(batch["input_ids"], batch["token_type_ids"],
                               batch["attention_mask"])
    text = masked_mean(states, batch["text_mask"])
    context = masked_mean(states, batch["context_mask"]) if self.use_context else None
    aligned_context = context
    if self.use_context and self.align_views == "separate":
      text, aligned_context = (self._encode_view(batch, view) for view in (0, 1))
    out = {"text_vec": self.text_proj(text)}
    if self.use_context:
      out["context_vec"] = self.context_proj(aligned_context)
    if self.image_encoder is not None:
      image = self.image_encoder(pixel_values=batch["pixel_values"])
      out["image_vec"] = self.image_proj(image.pooler_output)
      states = self.fusion(states, image.last_hidden_state, context, batch["attention_mask"])
    emissions = self.tagger(self.dropout(states), batch["word_starts"])
    out["emissions"] = emissions
    out["log_likelihood"] = self._log_likelihood(emissions, batch["tags"], batch["num_words"])
    return out

  def _log_likelihood(self, emissions, tags, num_words) -> torch.Tensor:
    positions = torch.arange(emissions.shape[1], device=emissions.device)
    mask = positions[None] < num_words[:, None]
    # pytorch-crf wants every first step on: empty rows (padding) get one, then score 0.
    mask[:, 0] = True
    log_likelihood = self.crf(emissions, tags, mask, reduction="none")
    return torch.where(num_words > 0, log_likelihood, torch.zeros_like(log_likelihood))


def to_torch_batch(batch: Mapping[str, np.ndarray],
                   device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
  """A numpy batch of ``shapca_jax.data`` as tensors: int64 indices, NCHW pixels."""
  out = {}
  for name, value in batch.items():
    value = np.asarray(value)
    if name == "pixel_values":
      value = value.transpose(0, 3, 1, 2)
    tensor = torch.from_numpy(np.ascontiguousarray(value))
    if not tensor.is_floating_point() and tensor.dtype != torch.bool:
      tensor = tensor.long()
    out[name] = tensor.to(device)
  return out


# ----------------------------------------------------------------------------- alignment


def randperm_sampler(generator: Optional[torch.Generator] = None) -> PermutationSampler:
  """Independent ``torch.randperm`` permutations, one call per permutation."""
  def sample(direction: str, num: int, k: int) -> torch.Tensor:
    del direction
    return torch.stack([torch.randperm(k, generator=generator) for _ in range(num)])
  return sample


def cosine_similarity(players: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
  return F.normalize(players, dim=-1, eps=1e-8) @ F.normalize(anchors, dim=-1, eps=1e-8).T


def _safe_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
  ok = den > 0
  return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def _coalition_values(utility: str, sim: torch.Tensor, mask: torch.Tensor, tau: float,
                      shift: torch.Tensor, players: Optional[torch.Tensor],
                      anchors: Optional[torch.Tensor]) -> torch.Tensor:
  """v_j(first t players) at [t, j], for players already in permutation order."""
  if utility == "softmax_expectation":
    w = torch.exp((sim - shift) / tau) * mask
    return _safe_ratio(torch.cumsum(w * sim, 0), torch.cumsum(w, 0))
  if utility == "logsumexp":
    total = torch.cumsum(torch.exp((sim - shift) / tau) * mask, 0)
    ok = total > 0
    value = tau * torch.log(torch.where(ok, total, torch.ones_like(total))) + shift
    return torch.where(ok, value, torch.zeros_like(value))
  if utility == "uniform_mean":
    return _safe_ratio(torch.cumsum(sim * mask, 0), torch.cumsum(mask.expand_as(sim), 0))
  if utility == "mean_embedding":
    total = torch.cumsum(players * mask, 0)
    sq = (total * total).sum(-1, keepdim=True)
    ok = sq > 0
    norm = torch.sqrt(torch.where(ok, sq, torch.ones_like(sq)))
    value = total @ F.normalize(anchors, dim=-1, eps=1e-8).T / norm
    return torch.where(ok, value, torch.zeros_like(value))
  raise ValueError(f"unknown utility {utility!r}")


def mc_shapley(sim: torch.Tensor, perms: torch.Tensor, *, utility: str, tau: float,
               antithetic: bool, valid: torch.Tensor, players: Optional[torch.Tensor] = None,
               anchors: Optional[torch.Tensor] = None) -> torch.Tensor:
  """Monte Carlo Shapley values [k, k] of the games of ``sim``: each player's marginal gain
  when it joins after its predecessors, averaged over the permutations (and their reverses)."""
  mask = valid.to(sim.dtype)[:, None]
  shift = torch.where(mask > 0, sim, -torch.inf).max(dim=0).values.detach()
  shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
  orders = [o for perm in perms for o in ((perm, perm.flip(0)) if antithetic else (perm,))]
  phi = torch.zeros_like(sim)
  for order in orders:
    values = _coalition_values(utility, sim[order], mask[order], tau, shift,
                               None if players is None else players[order], anchors)
    gains = torch.diff(values, dim=0, prepend=torch.zeros_like(values[:1]))
    phi = phi.index_add(0, order, gains)
  return phi / len(orders)


def contrastive_loss(scores: torch.Tensor, tau: float, same_group: torch.Tensor,
                     valid: torch.Tensor) -> torch.Tensor:
  """Cross-entropy over players (axis 0) for each anchor, the paired player as the target;
  same-group players and padding are not negatives, padding anchors do not count."""
  k = scores.shape[0]
  eye = torch.eye(k, dtype=torch.bool, device=scores.device)
  left_out = ((same_group[:, None] == same_group[None, :]) | ~valid[:, None]) & ~eye
  logits = (scores / tau).masked_fill(left_out, -torch.inf)
  nll = F.cross_entropy(logits.T, torch.arange(k, device=scores.device), reduction="none")
  weights_ = valid.to(nll.dtype)
  return (nll * weights_).sum() / weights_.sum().clamp_min(1.0)


def alignment_loss(out: Mapping[str, torch.Tensor], batch: Batch, align: AlignmentConfig,
                   sampler: PermutationSampler) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
  """L_align = lambda_ct (L_c->t + L_t->c) + lambda_ci (L_c->i + L_i->c) and each term."""
  t, c, u = out["text_vec"], out["context_vec"], out.get("image_vec")
  directions = {}
  if align.lambda_ct > 0:
    directions.update(c2t=(c, t, align.lambda_ct), t2c=(t, c, align.lambda_ct))
  if align.lambda_ci > 0 and u is not None:
    directions.update(c2i=(c, u, align.lambda_ci), i2c=(u, c, align.lambda_ci))
  valid, groups = batch["valid"], batch["image_group"]
  total, terms = torch.zeros((), device=t.device), {}
  for name, (players, anchors, weight) in directions.items():
    scores = cosine_similarity(players, anchors)
    if align.kind == "shapley":
      perms = sampler(name, align.num_permutations, len(players)).to(players.device)
      scores = mc_shapley(scores, perms, utility=align.utility, tau=align.tau_u,
                          antithetic=align.antithetic, valid=valid, players=players,
                          anchors=anchors)
    terms[name] = contrastive_loss(scores, align.tau_c, groups, valid)
    total = total + weight * terms[name]
  return total, terms


# ----------------------------------------------------------------------------- training


def warmup_linear_decay(total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
  """Learning-rate factor at step ``count``: linear warm-up from 0, then linear decay to 0."""
  warmup = int(round(warmup_ratio * total_steps))

  def factor(count: int) -> float:
    if count < warmup:
      return count / max(warmup, 1)
    return max(0.0, 1.0 - (count - warmup) / max(total_steps - warmup, 1))
  return factor


def param_groups(model: nn.Module, learning_rates: Mapping[str, float],
                 weight_decay: float) -> list[dict[str, Any]]:
  """AdamW groups: encoder / crf / new learning rates, no decay on biases and LayerNorms."""
  layer_norm_weights = {f"{name}.weight" for name, module in model.named_modules()
                        if isinstance(module, nn.LayerNorm)}
  groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
  for name, param in model.named_parameters():
    top = name.split(".", 1)[0]
    group = "encoder" if top in ENCODER_MODULES else "crf" if top == "crf" else "new"
    decay = not (name.endswith(".bias") or name in layer_norm_weights)
    groups.setdefault((group, decay), []).append(param)
  return [{"params": params, "lr": learning_rates[group],
           "weight_decay": weight_decay if decay else 0.0}
          for (group, decay), params in groups.items()]


class TorchTrainer:
  """Model, AdamW, schedule and alignment settings; ``step(batch)`` is one training step.

  Args:
    model: a ``ShapCATorch``.
    align: the alignment loss settings, or None for no alignment (``align.kind="none"``).
    learning_rates: peak rates of the groups ``encoder``, ``new`` and ``crf``.
    total_steps, warmup_ratio, weight_decay, grad_clip_norm: as in ``shapca_jax.optim``.
    sampler: draws the Monte Carlo permutations (default ``randperm_sampler()``).
    autocast_dtype: e.g. ``torch.bfloat16`` to run the forward pass under ``torch.autocast``.
  """

  def __init__(self, model: ShapCATorch, *, align: Optional[AlignmentConfig],
               learning_rates: Mapping[str, float], total_steps: int, warmup_ratio: float = 0.1,
               weight_decay: float = 0.01, grad_clip_norm: float = 1.0,
               sampler: Optional[PermutationSampler] = None,
               autocast_dtype: Optional[torch.dtype] = None):
    self.model, self.align = model, align
    self.grad_clip_norm = grad_clip_norm
    self.sampler = sampler or randperm_sampler()
    self.autocast_dtype = autocast_dtype
    self.optimizer = torch.optim.AdamW(param_groups(model, learning_rates, weight_decay),
                                       betas=(0.9, 0.999), eps=1e-8)
    self.scheduler = torch.optim.lr_scheduler.LambdaLR(
        self.optimizer, warmup_linear_decay(total_steps, warmup_ratio))

  def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Task loss (mean CRF negative log-likelihood of the valid rows) plus L_align."""
    device_type = batch["input_ids"].device.type
    with torch.autocast(device_type, dtype=self.autocast_dtype or torch.bfloat16,
                        enabled=self.autocast_dtype is not None):
      out = self.model(batch)
    # The losses stay float32, as in the JAX step (its vectors and emissions are float32).
    valid = batch["valid"].float()
    task = -(out["log_likelihood"] * valid).sum() / valid.sum().clamp_min(1.0)
    align_loss, terms = torch.zeros_like(task), {}
    if self.align is not None:
      align_loss, terms = alignment_loss(out, batch, self.align, self.sampler)
    return task + align_loss, {"task_loss": task, "align_loss": align_loss, **terms}

  def apply_gradients(self) -> torch.Tensor:
    """Clips the ``.grad`` of the model, takes the AdamW step, advances the schedule; returns
    the gradient norm before clipping."""
    grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip_norm)
    self.optimizer.step()
    self.scheduler.step()
    return grad_norm

  def step(self, batch: Batch) -> dict[str, torch.Tensor]:
    """Forward, backward, optimizer update; metrics as detached tensors."""
    self.model.train()
    self.optimizer.zero_grad(set_to_none=True)
    loss, terms = self.loss(batch)
    loss.backward()
    grad_norm = self.apply_gradients()
    return {"loss": loss.detach(), "grad_norm": grad_norm,
            **{k: v.detach() for k, v in terms.items()}}


# ----------------------------------------------------------------------------- Flax params


def _linear_or_norm(name: str, module: nn.Module) -> FlaxLayout:
  path = tuple(name.split("."))
  if isinstance(module, nn.Linear):
    layout = {f"{name}.weight": (path + ("kernel",), np.transpose)}
  elif isinstance(module, nn.LayerNorm):
    layout = {f"{name}.weight": (path + ("scale",), np.asarray)}
  else:
    return {}
  if module.bias is not None:
    layout[f"{name}.bias"] = (path + ("bias",), np.asarray)
  return layout


def _encoder_layout(top: str, config: BertConfig | VisionConfig, names: set[str]) -> FlaxLayout:
  """The rules of ``shapca_jax.models.weights`` (Hugging Face name -> Flax path)."""
  layout = {}
  for rule in weights.hf_rules(config):
    prefix = f"{top}." if f"{top}.{rule.name}" in names else f"{top}.vision_model."
    layout[prefix + rule.name] = ((top,) + rule.path, rule.transform.to_flax)
  return layout


def flax_layout(model: ShapCATorch, text_config: BertConfig,
                vision_config: Optional[VisionConfig] = None) -> FlaxLayout:
  """Where each parameter of ``model`` lives in the Flax params of ``ShapCA``, and how its
  array is laid out there (e.g. Linear weights [out, in] are Flax kernels [in, out])."""
  names = {name for name, _ in model.named_parameters()}
  layout = _encoder_layout("text_encoder", text_config, names)
  if vision_config is not None:
    layout |= _encoder_layout("image_encoder", vision_config, names)
  for name, module in model.named_modules():
    if name and name.split(".", 1)[0] not in ENCODER_MODULES + ("crf",):
      layout |= _linear_or_norm(name, module)
  layout |= {f"crf.{ours}": (("crf", flax), np.asarray) for ours, flax in _CRF_NAMES.items()}
  missing, unknown = sorted(names - set(layout)), sorted(set(layout) - names)
  if missing or unknown:
    raise ValueError(f"Flax layout out of sync with the PyTorch model: unmapped parameters "
                     f"{missing}, mapped names that do not exist {unknown}")
  return layout


def _leaf(params: Mapping[str, Any], path: tuple[str, ...]) -> np.ndarray:
  node = params
  for key in path:
    if not isinstance(node, Mapping) or key not in node:
      raise KeyError(f"Flax params have no entry {'/'.join(path)}")
    node = node[key]
  return np.asarray(node, np.float32)


def _paths(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
  return [p for key, value in tree.items()
          for p in (_paths(value, prefix + (key,)) if isinstance(value, Mapping)
                    else [prefix + (key,)])]


def _from_flax(name: str, value: np.ndarray, shape: tuple[int, ...],
               to_flax: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
  """Inverts ``to_flax`` (a transpose / reshape) by sending the flat torch indices through it."""
  index = to_flax(np.arange(math.prod(shape)).reshape(shape))
  if index.shape != value.shape:
    raise ValueError(f"{name}: the Flax array of shape {value.shape} does not fit the torch "
                     f"tensor of shape {shape} (expected Flax shape {index.shape})")
  out = np.empty(math.prod(shape), value.dtype)
  out[index.ravel()] = value.ravel()
  return out.reshape(shape)


def load_flax_params(model: ShapCATorch, params: Mapping[str, Any], text_config: BertConfig,
                     vision_config: Optional[VisionConfig] = None) -> None:
  """Copies the Flax ``ShapCA`` params into ``model``; every tensor must find its value."""
  layout = flax_layout(model, text_config, vision_config)
  unused = sorted("/".join(p) for p in set(_paths(params)) - {path for path, _ in layout.values()})
  if unused:
    raise ValueError(f"Flax params without a place in the PyTorch model: {unused}; build "
                     "ShapCATorch with the same arguments as the ShapCA they came from")
  with torch.no_grad():
    for name, param in model.named_parameters():
      path, to_flax = layout[name]
      value = _from_flax(name, _leaf(params, path), tuple(param.shape), to_flax)
      param.copy_(torch.from_numpy(value))
