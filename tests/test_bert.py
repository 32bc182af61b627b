"""BertEncoder against transformers' PyTorch BertModel (real MiniLM-L6 and tiny random BERTs)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from shapca_jax.models import weights
from shapca_jax.models.bert import BertConfig, BertEncoder

TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=37, max_position_embeddings=40, type_vocab_size=3)


def _real_tweets(shared_data_dir, count: int) -> list[str]:
  """The first `count` tweets of the Twitter-2017 test split, words joined by spaces."""
  tweets, words = [], []
  for line in (shared_data_dir / "twitter2017" / "test.txt").read_text().splitlines():
    if line.startswith("IMGID:"):
      continue
    if line.strip():
      words.append(line.split("\t")[0])
    elif words:
      tweets.append(" ".join(words))
      words = []
    if len(tweets) == count:
      break
  return tweets


def _torch_hidden(model, batch) -> np.ndarray:
  with torch.no_grad():
    out = model.eval()(**{k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()})
  return out.last_hidden_state.numpy()


def _ours(module, params, batch) -> np.ndarray:
  return np.asarray(jax.jit(module.apply)({"params": params}, batch["input_ids"],
                                          batch["token_type_ids"], batch["attention_mask"]))


def test_real_minilm_matches_pytorch_on_real_tweets(minilm_dir, shared_data_dir):
  tweets = _real_tweets(shared_data_dir, 6)
  tokenizer = weights.load_tokenizer(minilm_dir)
  batch = dict(tokenizer(tweets, padding=True, return_tensors="np"))
  assert batch["attention_mask"].min() == 0  # the batch really is padded
  module, params, config = weights.load_hf_encoder(minilm_dir)
  ours = _ours(module, params, batch)
  reference = _torch_hidden(transformers.BertModel.from_pretrained(minilm_dir), batch)
  assert (config.hidden_size, config.num_hidden_layers) == (384, 6)
  max_diff = float(np.abs(ours - reference).max())
  print(f"MiniLM-L6 last hidden state max |diff| vs PyTorch: {max_diff:.2e}")
  assert max_diff <= 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A BertFor* checkpoint (`bert.` prefix plus a classifier head) and what we load from it."""
  torch.manual_seed(0)
  model = transformers.BertForTokenClassification(
      transformers.BertConfig(hidden_act="gelu_new", num_labels=5, **TINY))
  folder = tmp_path_factory.mktemp("tiny_bert")
  model.save_pretrained(folder)
  module, params, config = weights.load_hf_encoder(folder)
  return model, module, params, config


def test_tiny_token_classifier_checkpoint_matches_pytorch(tiny):
  model, module, params, _ = tiny
  rng = np.random.default_rng(0)
  batch = {"input_ids": rng.integers(0, 99, (3, 12)),
           "token_type_ids": rng.integers(0, 3, (3, 12)),
           "attention_mask": (np.arange(12)[None] < np.array([[12], [7], [3]])).astype(np.int64)}
  reference = _torch_hidden(model.bert, batch)
  np.testing.assert_allclose(_ours(module, params, batch), reference, atol=1e-4, rtol=0)


def test_default_config_equals_transformers_default():
  assert BertConfig() == BertConfig.from_hf_dict(transformers.BertConfig().to_dict())


def test_unsupported_config_is_rejected_naming_the_key():
  with pytest.raises(ValueError, match="position_embedding_type"):
    BertConfig.from_hf_dict({"position_embedding_type": "relative_key"})
  with pytest.raises(ValueError, match="num_attention_heads"):
    BertConfig(hidden_size=30, num_attention_heads=4)


def test_too_long_input_is_rejected(tiny):
  _, module, params, _ = tiny
  with pytest.raises(ValueError, match="max_position_embeddings"):
    module.apply({"params": params}, jnp.zeros((1, 41), jnp.int32))


def test_bf16_compute_runs_close_to_fp32_with_fp32_params(tiny):
  _, module, params, config = tiny
  ids = jax.random.randint(jax.random.key(1), (2, 16), 0, 99)
  fp32 = jax.jit(module.apply)({"params": params}, ids)
  bf16 = jax.jit(BertEncoder(config, dtype=jnp.bfloat16).apply)({"params": params}, ids)
  assert bf16.dtype == jnp.bfloat16
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  # LayerNorm outputs have unit scale; bf16 keeps ~3 significant digits.
  assert float(jnp.max(jnp.abs(bf16.astype(jnp.float32) - fp32))) < 0.1


def test_dropout_is_random_per_rng_and_off_when_deterministic(tiny):
  _, module, params, config = tiny
  assert config.hidden_dropout_prob > 0 and config.attention_probs_dropout_prob > 0
  apply = jax.jit(module.apply, static_argnames="deterministic")
  ids = jax.random.randint(jax.random.key(1), (2, 8), 0, 99)
  run = lambda seed: apply({"params": params}, ids, deterministic=False,
                           rngs={"dropout": jax.random.key(seed)})
  np.testing.assert_array_equal(run(1), run(1))
  assert not np.allclose(run(1), run(2))
  assert not np.allclose(run(1), apply({"params": params}, ids))


def test_attention_mask_hides_padding(tiny):
  """Real tokens' states must not depend on what sits in padded positions."""
  _, module, params, _ = tiny
  ids = jnp.array([[5, 6, 7, 0, 0], [5, 6, 7, 9, 9]])
  mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]])
  out = jax.jit(module.apply)({"params": params}, ids, None, mask)
  np.testing.assert_allclose(out[0, :3], out[1, :3], atol=1e-6)
