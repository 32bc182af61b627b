"""VisionEncoder (CLIP vision tower, ViT) against transformers' PyTorch models.

Tiny random checkpoints are written by transformers itself (`save_pretrained`, safetensors),
loaded through `load_hf_encoder`, and both forwards run on the same pixels.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from shapca_jax.models import weights
from shapca_jax.models.vision import VisionConfig, VisionEncoder

TINY = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            patch_size=10)
TOL = 1e-4


def _save(model: torch.nn.Module, folder) -> str:
  torch.manual_seed(0)
  model.save_pretrained(folder)
  return str(folder)


def _pixels(batch: int, height: int, width: int) -> np.ndarray:
  return np.random.default_rng(0).normal(size=(batch, height, width, 3)).astype(np.float32)


def _ours(folder: str, pixels: np.ndarray):
  module, params, config = weights.load_hf_encoder(folder)
  states, pooled = jax.jit(module.apply)({"params": params}, jnp.asarray(pixels))
  return np.asarray(states), np.asarray(pooled), config


def _torch_out(model: torch.nn.Module, pixels: np.ndarray):
  with torch.no_grad():
    out = model.eval()(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
  return out.last_hidden_state.numpy(), out.pooler_output.numpy()


def _assert_close(ours, reference):
  assert ours.shape == reference.shape
  np.testing.assert_allclose(ours, reference, atol=TOL, rtol=0)


def test_clip_vision_model_matches_pytorch(tmp_path):
  torch.manual_seed(0)
  model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(image_size=30, **TINY))
  pixels = _pixels(3, 30, 30)
  states, pooled, config = _ours(_save(model, tmp_path), pixels)
  ref_states, ref_pooled = _torch_out(model, pixels)
  assert config.family == "clip" and config.hidden_act == "quick_gelu"
  _assert_close(states, ref_states)
  _assert_close(pooled, ref_pooled)


def test_full_clip_model_loads_its_vision_tower(tmp_path):
  torch.manual_seed(0)
  model = transformers.CLIPModel(transformers.CLIPConfig(
      vision_config=dict(image_size=30, **TINY),
      text_config=dict(hidden_size=16, intermediate_size=20, num_hidden_layers=1,
                       num_attention_heads=2, vocab_size=99, bos_token_id=0, eos_token_id=1),
      projection_dim=8))
  pixels = _pixels(2, 30, 30)
  states, pooled, _ = _ours(_save(model, tmp_path), pixels)
  ref_states, ref_pooled = _torch_out(model.vision_model, pixels)
  _assert_close(states, ref_states)
  _assert_close(pooled, ref_pooled)


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
  """A ViTModel with a pooler, non-square images and dropout in its config."""
  torch.manual_seed(0)
  model = transformers.ViTModel(transformers.ViTConfig(
      image_size=[30, 20], hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, **TINY))
  return model, _save(model, tmp_path_factory.mktemp("tiny_vit"))


def test_vit_model_with_pooler_and_non_square_images_matches_pytorch(tiny_vit):
  model, folder = tiny_vit
  pixels = _pixels(2, 30, 20)
  states, pooled, config = _ours(folder, pixels)
  ref_states, ref_pooled = _torch_out(model, pixels)
  assert config.use_pooler and states.shape == (2, 7, 32)
  _assert_close(states, ref_states)
  _assert_close(pooled, ref_pooled)


def test_vit_classifier_checkpoint_pools_the_class_state(tmp_path):
  torch.manual_seed(0)
  model = transformers.ViTForImageClassification(
      transformers.ViTConfig(image_size=30, qkv_bias=False, num_labels=3, **TINY))
  pixels = _pixels(2, 30, 30)
  states, pooled, config = _ours(_save(model, tmp_path), pixels)
  with torch.no_grad():
    ref = model.eval().vit(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
  assert not config.use_pooler
  _assert_close(states, ref.last_hidden_state.numpy())
  _assert_close(pooled, ref.last_hidden_state[:, 0].numpy())


@pytest.mark.parametrize("family,hf_config", [
    ("clip", transformers.CLIPVisionConfig), ("vit", transformers.ViTConfig)])
def test_default_configs_equal_transformers_defaults(family, hf_config):
  ours = getattr(VisionConfig, family)()
  reference = VisionConfig.from_hf_dict(family, hf_config().to_dict())
  assert ours == reference
  assert ours.layer_norm_eps == hf_config().layer_norm_eps


def test_wrong_image_size_is_rejected(tiny_vit):
  module, params, _ = weights.load_hf_encoder(tiny_vit[1])
  with pytest.raises(ValueError, match="image_size"):
    module.apply({"params": params}, jnp.zeros((1, 20, 30, 3)))


def test_bad_config_names_the_key():
  with pytest.raises(ValueError, match="patch_size"):
    VisionConfig.clip(image_size=30, patch_size=7)
  with pytest.raises(ValueError, match="hidden_act"):
    VisionConfig.vit(hidden_act="mish")


def test_bf16_compute_is_close_to_fp32(tiny_vit):
  module, params, config = weights.load_hf_encoder(tiny_vit[1])
  pixels = jnp.asarray(_pixels(2, 30, 20))
  states, pooled = jax.jit(module.apply)({"params": params}, pixels)
  states16, pooled16 = jax.jit(VisionEncoder(config, dtype=jnp.bfloat16).apply)(
      {"params": params}, pixels)
  assert states16.dtype == pooled16.dtype == jnp.bfloat16
  assert float(jnp.max(jnp.abs(states16.astype(jnp.float32) - states))) < 0.1
  assert float(jnp.max(jnp.abs(pooled16.astype(jnp.float32) - pooled))) < 0.1


def test_dropout_uses_the_dropout_rng(tiny_vit):
  module, params, config = weights.load_hf_encoder(tiny_vit[1])
  assert config.hidden_dropout > 0 and config.attention_dropout > 0
  apply = jax.jit(module.apply, static_argnames="deterministic")
  pixels = jnp.asarray(_pixels(1, 30, 20))
  run = lambda seed: apply({"params": params}, pixels, deterministic=False,
                           rngs={"dropout": jax.random.key(seed)})[0]
  np.testing.assert_array_equal(run(1), run(1))
  assert not np.allclose(run(1), run(2))
  assert not np.allclose(run(1), apply({"params": params}, pixels)[0])
