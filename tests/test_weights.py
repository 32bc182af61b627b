"""Checkpoint loading rules: strict key/shape checks, layouts, random init, new tokens.

Checkpoints are written by transformers (PyTorch) and edited with `safetensors.numpy`;
loaded parameters are compared with the PyTorch tensors themselves.
"""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import torch
import transformers
from safetensors.numpy import load_file, save_file

from shapca_jax.models import weights
from shapca_jax.models.bert import BertConfig
from shapca_jax.models.vision import VisionConfig

TINY_BERT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=37, max_position_embeddings=40)
TINY_VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                   num_attention_heads=4, image_size=30, patch_size=10)


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
  torch.manual_seed(0)
  folder = tmp_path_factory.mktemp("bert")
  transformers.BertModel(transformers.BertConfig(**TINY_BERT)).save_pretrained(folder)
  return folder


def _edited_copy(source, target, edit):
  """Copies a checkpoint folder, rewriting model.safetensors through `edit(dict) -> dict`."""
  shutil.copytree(source, target)
  tensors = edit(load_file(source / "model.safetensors"))
  save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
  return target


def test_missing_extra_and_misshaped_tensors_are_listed_in_one_error(bert_folder, tmp_path):
  def edit(tensors):
    del tensors["encoder.layer.1.attention.self.key.bias"]
    tensors["encoder.layer.0.adapter.weight"] = np.zeros((2, 2), np.float32)
    tensors["embeddings.token_type_embeddings.weight"] = np.zeros((3, 32), np.float32)
    return tensors

  folder = _edited_copy(bert_folder, tmp_path / "bad", edit)
  with pytest.raises(weights.CheckpointMismatchError) as info:
    weights.load_hf_encoder(folder)
  message = str(info.value)
  assert str(folder / "model.safetensors") in message
  assert "missing tensors (1):\n    encoder.layer.1.attention.self.key.bias" in message
  assert "unexpected tensors (1):\n    encoder.layer.0.adapter.weight" in message
  assert "embeddings.token_type_embeddings.weight: checkpoint (3, 32), expected (2, 32)" in message


def test_parameters_equal_the_pytorch_tensors_and_heads_are_ignored(tmp_path):
  """BertForPreTraining: `bert.` prefix, `cls.*` heads and the pooler are not loaded."""
  torch.manual_seed(0)
  model = transformers.BertForPreTraining(transformers.BertConfig(**TINY_BERT))
  model.save_pretrained(tmp_path)
  _, params, _ = weights.load_hf_encoder(tmp_path)
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  np.testing.assert_array_equal(params["embeddings"]["word_embeddings"]["embedding"],
                                state["bert.embeddings.word_embeddings.weight"])
  np.testing.assert_array_equal(params["layer_1"]["mlp"]["fc1"]["kernel"],
                                state["bert.encoder.layer.1.intermediate.dense.weight"].T)
  np.testing.assert_array_equal(params["layer_0"]["mlp_norm"]["scale"],
                                state["bert.encoder.layer.0.output.LayerNorm.weight"])
  assert "pooler" not in params


def test_legacy_gamma_beta_names_load(bert_folder, tmp_path):
  rename = lambda k: k.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
      "LayerNorm.bias", "LayerNorm.beta")
  folder = _edited_copy(bert_folder, tmp_path / "legacy",
                        lambda tensors: {rename(k): v for k, v in tensors.items()})
  _, params, _ = weights.load_hf_encoder(folder)
  _, reference, _ = weights.load_hf_encoder(bert_folder)
  jax.tree.map(np.testing.assert_array_equal, params, reference)


def test_sharded_and_bf16_checkpoints_load(tmp_path):
  torch.manual_seed(0)
  model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY_VISION))
  model.to(torch.bfloat16).save_pretrained(tmp_path, max_shard_size="20KB")
  assert (tmp_path / "model.safetensors.index.json").is_file()
  _, params, _ = weights.load_hf_encoder(tmp_path)
  conv = model.state_dict()["embeddings.patch_embedding.weight"].float().numpy()
  kernel = params["embeddings"]["patch_embedding"]["kernel"]
  assert kernel.dtype == jnp.float32
  np.testing.assert_array_equal(kernel, conv.transpose(2, 3, 1, 0))


ONE_LAYER = dict(num_hidden_layers=1)


@pytest.mark.parametrize("config,hf_model", [
    (BertConfig(**{**TINY_BERT, **ONE_LAYER}),
     lambda: transformers.BertModel(transformers.BertConfig(**{**TINY_BERT, **ONE_LAYER}))),
    (VisionConfig.clip(**{**TINY_VISION, **ONE_LAYER}),
     lambda: transformers.CLIPVisionModel(
         transformers.CLIPVisionConfig(**{**TINY_VISION, **ONE_LAYER}))),
])
def test_random_init_has_the_tree_of_a_real_checkpoint(config, hf_model, tmp_path):
  hf_model().save_pretrained(tmp_path)
  _, loaded, _ = weights.load_hf_encoder(tmp_path)
  _, params = weights.init_encoder(config, jax.random.key(0))
  shapes = lambda tree: jax.tree.map(lambda x: x.shape, tree)
  assert shapes(params) == shapes(loaded)
  kernel = params["layer_0"]["mlp"]["fc1"]["kernel"]
  assert 0.015 < float(jnp.std(kernel)) < 0.025  # N(0, initializer_range=0.02)


def test_folder_problems_are_named(bert_folder, tmp_path):
  with pytest.raises(FileNotFoundError, match="checkpoint folder not found"):
    weights.load_hf_encoder(tmp_path / "nowhere")
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="config.json"):
    weights.load_hf_encoder(empty)
  (empty / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
  with pytest.raises(ValueError, match="model_type='gpt2'"):
    weights.load_hf_encoder(empty)
  (empty / "config.json").write_text((bert_folder / "config.json").read_text())
  (empty / "pytorch_model.bin").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match="only pytorch_model.bin"):
    weights.load_hf_encoder(empty)
  (empty / "model.safetensors").write_bytes(b"not a safetensors file")
  with pytest.raises(ValueError, match="model.safetensors: cannot read"):
    weights.load_hf_encoder(empty)


def test_config_overrides(bert_folder):
  _, _, config = weights.load_hf_encoder(
      bert_folder, config_overrides={"attention_probs_dropout_prob": 0.0})
  assert config.attention_probs_dropout_prob == 0.0
  with pytest.raises(ValueError, match="dropout_rate"):
    weights.load_hf_encoder(bert_folder, config_overrides={"dropout_rate": 0.0})


def test_add_token_embeddings_keeps_old_rows_and_starts_new_ones_at_the_mean(bert_folder):
  module, params, config = weights.load_hf_encoder(bert_folder)
  old = np.asarray(params["embeddings"]["word_embeddings"]["embedding"])
  grown = weights.add_token_embeddings(params, 4, jax.random.key(0))
  table = np.asarray(grown["embeddings"]["word_embeddings"]["embedding"])
  assert table.shape == (old.shape[0] + 4, old.shape[1])
  np.testing.assert_array_equal(table[:-4], old)
  new = table[-4:]
  spread = old.std(axis=0)
  assert np.all(np.abs(new - old.mean(axis=0)) < 0.1 * spread)
  assert len({row.tobytes() for row in new}) == 4  # distinct tokens
  assert grown["layer_0"] is params["layer_0"]
  bigger = weights.build_encoder(
      BertConfig(**{**config.__dict__, "vocab_size": config.vocab_size + 4}))
  out = jax.jit(bigger.apply)({"params": grown}, jnp.array([[1, 99, 100, 101, 102, 2]]))
  assert out.shape == (1, 6, 32) and bool(jnp.all(jnp.isfinite(out)))


def test_load_tokenizer_matches_the_raw_tokenizer_file(minilm_dir):
  text = "RT @user : Kevin Durant signs with the Golden State Warriors"
  ours = weights.load_tokenizer(minilm_dir)(text)["input_ids"]
  raw = tokenizers.Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
  raw.no_padding()  # the file pads to 128; the transformers wrapper pads only on request
  raw = raw.encode(text).ids
  assert ours == raw and ours[0] == 101 and ours[-1] == 102
