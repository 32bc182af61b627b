"""The PyTorch baseline (experiments/baselines/torch_shapca.py) against our JAX model.

transformers' BertModel / CLIPVisionModel, pytorch-crf and a Python loop over permutations
are an independent implementation of what ``ShapCA`` + ``steps.train_step`` compute: with the
same params, batch (from the real data layer) and permutations, and dropout off, the loss
terms and gradients must agree, and so must the second step, which runs after one AdamW update.
"""

import dataclasses
import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torchcrf

from shapca_jax import optim, shapley, steps
from shapca_jax.config import default_config
from shapca_jax.data import contexts, labels, readers, tokenization
from shapca_jax.data.pipeline import BatchPipeline
from shapca_jax.models import weights
from shapca_jax.models.shapca import ShapCA
from shapca_jax.models.vision import VisionConfig
import train_fixtures

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "experiments"))
from baselines import torch_shapca  # noqa: E402  (experiments/ is not a package)

TINY_CLIP = VisionConfig.clip(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, image_size=32, patch_size=16)
LEARNING_RATES = {"encoder": 3e-5, "new": 1e-3, "crf": 1e-2}
OPTIMIZER = dict(total_steps=4, warmup_ratio=0.0, weight_decay=0.01, grad_clip_norm=1.0)
# One parameter of each kind: text encoder, projections, tagger, CRF, fusion, image tower.
CHECKED = ("text_encoder.encoder.layer.0.attention.self.query.weight", "text_proj.hidden.weight",
           "context_proj.out.weight", "tagger.emissions.weight", "crf.transitions")
CHECKED_IMAGE = ("fusion.gate_q.weight", "image_proj.hidden.weight",
                 "image_encoder.embeddings.patch_embedding.weight")


def relative_error(ours, reference) -> float:
  ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
  return float(np.linalg.norm(ours - reference) / np.linalg.norm(reference))


@pytest.fixture(scope="module")
def bert(tmp_path_factory, minilm_dir):
  """Tiny random BERT (MiniLM's tokenizer) with dropout off: its folder, params and config."""
  folder = train_fixtures.write_tiny_bert(tmp_path_factory.mktemp("bert"), minilm_dir)
  _, params, config = weights.load_hf_encoder(
      folder, config_overrides={"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0})
  return folder, params, config


@pytest.fixture(scope="module")
def batches(bert, embedded_data_dir):
  """Two batches of 4 Twitter-2017 tweets with BLIP-2 contexts; the second has a padding row."""
  examples = readers.read_split("twitter2017", "train", embedded_data_dir)[:7]
  examples, _ = contexts.attach_contexts(examples, "twitter2017", "train", embedded_data_dir,
                                         "blip2")
  encoder = tokenization.Encoder(bert[0], "mner", "views")
  pipeline = BatchPipeline(examples, encoder, batch_size=4,
                           buckets=(tokenization.Bucket(64, 32),))
  out = [pipeline.batch(0), pipeline.batch(1)]
  assert out[1]["valid"].tolist() == [True, True, True, False]
  pixels = np.random.default_rng(0).normal(size=(2, 4, 32, 32, 3)).astype(np.float32)
  for batch, image in zip(out, pixels):
    batch["pixel_values"] = image
  return out


def _random_params(model, batch, text_params, seed=0):
  """Random params of ``model`` with the given text encoder, all perturbed: non-zero biases
  and non-unit LayerNorm scales everywhere, so that every one of them matters.

  (Shapes from ``jax.eval_shape``: ``model.init`` would cost a compilation.)
  """
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda key: model.init(key, batch), jax.random.key(0))["params"]

  def draw(path, leaf):
    shape = leaf.shape
    if path[-1].key == "scale":
      return 1.0 + 0.1 * rng.normal(size=shape).astype(np.float32)
    std = 1.0 / np.sqrt(np.prod(shape[:-1])) if len(shape) > 1 else 0.1
    return (std * rng.normal(size=shape)).astype(np.float32)

  params = jax.tree_util.tree_map_with_path(draw, shapes)
  text = jax.tree.map(lambda x: np.asarray(x) + 0.02 * rng.normal(size=x.shape).astype(np.float32),
                      text_params)
  return {**params, "text_encoder": text}


def _recording() -> optax.GradientTransformation:
  """Passes the gradients on unchanged and keeps them as its state."""
  return optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p),
                                      lambda g, state, params=None: (g, g))


def _jax_permutations(rng, step, directions, num, k) -> dict[str, torch.Tensor]:
  """The permutations ``steps.train_step`` draws at ``step`` for each alignment direction."""
  _, shapley_rng = steps.step_rngs(rng, step)
  keys = jax.random.split(shapley_rng, len(directions))
  return {d: torch.tensor(np.asarray(shapley.sample_permutations(key, num, k)), dtype=torch.long)
          for d, key in zip(directions, keys)}


def _flax_leaf(tree, path):
  for key in path:
    tree = tree[key]
  return np.asarray(tree)


def _models(bert, use_image, align_views="joint"):
  _, text_params, text_config = bert
  vision_config = TINY_CLIP if use_image else None
  kwargs = dict(vision_config=vision_config, proj_dim=16, dropout_rate=0.0, fusion_heads=2,
                align_views=align_views)
  model = ShapCA(text_config, labels.MNER_LABELS, **kwargs)
  torch_model = torch_shapca.ShapCATorch(text_config, labels.MNER_LABELS, **kwargs)
  return model, torch_model, text_params, text_config, vision_config


@pytest.mark.parametrize("use_image, align_views", [(False, "joint"), (True, "joint"),
                                                    (False, "separate")],
                         ids=["text_only", "with_image", "separate_views"])
def test_train_steps_match_jax(bert, batches, use_image, align_views):
  """The separate views: the twin encodes text-only and context-only rows in two calls, ours
  in one call of both."""
  model, torch_model, text_params, text_config, vision_config = _models(bert, use_image,
                                                                        align_views)
  feed = [dict(b) if use_image else {k: v for k, v in b.items() if k != "pixel_values"}
          for b in batches]
  params = _random_params(model, feed[0], text_params)
  torch_shapca.load_flax_params(torch_model, params, text_config, vision_config)
  layout = torch_shapca.flax_layout(torch_model, text_config, vision_config)

  config = default_config()
  config.align.num_permutations = 4
  tx = optax.chain(_recording(), optim.make_optimizer(params, learning_rates=LEARNING_RATES,
                                                      **OPTIMIZER))
  state = steps.create_train_state(model, params, tx)
  step_fn = jax.jit(functools.partial(steps.train_step, align=config.align))
  rng = jax.random.key(7)
  directions = torch_shapca.DIRECTIONS if use_image else torch_shapca.DIRECTIONS[:2]
  permutations = {}
  trainer = torch_shapca.TorchTrainer(
      torch_model, align=steps.alignment_config(config.align), learning_rates=LEARNING_RATES,
      sampler=lambda name, num, k: permutations[name], **OPTIMIZER)

  for step, batch in enumerate(feed):
    permutations.update(_jax_permutations(rng, step, directions, 4, 4))
    state, jax_metrics = step_fn(state, batch, rng)
    torch_metrics = trainer.step(torch_shapca.to_torch_batch(batch))
    assert set(torch_metrics) == set(jax_metrics)
    assert float(jax_metrics["task_loss"]) > 1 and all(
        float(jax_metrics[d]) > 0.1 for d in directions)
    for name, value in jax_metrics.items():
      assert float(torch_metrics[name]) == pytest.approx(float(value), rel=1e-4), (step, name)

    grads = state.opt_state[0]
    torch_params = dict(torch_model.named_parameters())
    # PyTorch clips .grad in place; optax's clip scales by the same factor (up to 1e-6).
    scale = min(1.0, OPTIMIZER["grad_clip_norm"] / float(jax_metrics["grad_norm"]))
    for name in CHECKED + (CHECKED_IMAGE if use_image else ()):
      path, to_flax = layout[name]
      ours = to_flax(torch_params[name].grad.numpy())
      assert relative_error(ours, scale * _flax_leaf(grads, path)) <= 1e-4, (step, name)

  for name in CHECKED:  # after two AdamW steps the weights still agree
    path, to_flax = layout[name]
    ours = to_flax(torch_params[name].detach().numpy())
    assert relative_error(ours, _flax_leaf(state.params, path)) <= 1e-5, name


def test_adamw_groups_and_schedule_match_optax(bert, batches):
  model, torch_model, text_params, text_config, _ = _models(bert, use_image=False)
  params = first_params = _random_params(model, batches[0], text_params)
  torch_shapca.load_flax_params(torch_model, params, text_config)
  layout = torch_shapca.flax_layout(torch_model, text_config)
  # Steps 0 and 1 warm up; a large weight decay shows on every tensor it applies to.
  settings = dict(OPTIMIZER, total_steps=6, warmup_ratio=0.34, weight_decay=0.5)
  tx = optim.make_optimizer(params, learning_rates=LEARNING_RATES, **settings)
  trainer = torch_shapca.TorchTrainer(torch_model, align=None, learning_rates=LEARNING_RATES,
                                      **settings)
  named = dict(torch_model.named_parameters())
  opt_state = tx.init(params)
  update = jax.jit(tx.update)
  generator = torch.Generator().manual_seed(0)
  for step in range(4):
    scale = 0.01 if step == 2 else 1.0  # one step under the clipping norm
    grads = {name: scale * torch.randn(p.shape, generator=generator) for name, p in named.items()}
    flat = {layout[name][0]: layout[name][1](g.numpy()) for name, g in grads.items()}
    jax_grads = jax.tree_util.tree_map_with_path(
        lambda path, _: flat[tuple(k.key for k in path)], params)
    updates, opt_state = update(jax_grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    for name, p in named.items():
      p.grad = grads[name].clone()
    trainer.apply_gradients()

  for name, p in named.items():
    path, to_flax = layout[name]
    expected = _flax_leaf(params, path)
    moved = np.abs(expected - _flax_leaf(first_params, path)).max()
    # Weights round to float32 every step; Adam's m can cancel: allow both, nothing more.
    np.testing.assert_allclose(to_flax(p.detach().numpy()), expected, rtol=2e-6,
                               atol=1e-4 * moved, err_msg=name)


@pytest.mark.parametrize("seed", [0, 1])
def test_in_file_crf_equals_pytorch_crf(seed):
  generator = torch.Generator().manual_seed(seed)
  theirs, ours = torchcrf.CRF(5, batch_first=True), torch_shapca.LinearChainCRF(5)
  ours.load_state_dict(theirs.state_dict())
  emissions = torch.randn(3, 7, 5, generator=generator, requires_grad=True)
  tags = torch.randint(0, 5, (3, 7), generator=generator)
  mask = torch.arange(7)[None] < torch.tensor([7, 4, 1])[:, None]
  results = []
  for crf in (theirs, ours):
    emissions.grad = None
    log_likelihood = crf(emissions, tags, mask, reduction="none")
    log_likelihood.sum().backward()
    results.append((log_likelihood.detach(), emissions.grad.clone(), crf.transitions.grad))
  for a, b in zip(*results):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_load_flax_params_names_what_does_not_fit(bert, batches):
  model, torch_model, text_params, text_config, _ = _models(bert, use_image=False)
  params = _random_params(model, batches[0], text_params)
  with pytest.raises(ValueError, match="image_proj"):
    torch_shapca.load_flax_params(torch_model, {**params, "image_proj": params["text_proj"]},
                                  text_config)
  hidden = dataclasses.replace(text_config, hidden_size=64)
  with pytest.raises(ValueError, match="text_encoder.embeddings.word_embeddings.weight"):
    torch_shapca.load_flax_params(
        torch_shapca.ShapCATorch(hidden, labels.MNER_LABELS, proj_dim=16), params, hidden)
