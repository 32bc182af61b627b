"""The assembled model per task: task losses against PyTorch (cross-entropy, pytorch-crf), heads
reading the encoder states they should, and predictions against NumPy argmax rules."""

import math

import jax
import numpy as np
import pytest

from shapca_jax import losses
from shapca_jax.data import labels, tokenization
from shapca_jax.data.labels import Quintuple, Span
from shapca_jax.models.bert import BertConfig
from shapca_jax.models.shapca import ShapCA

torch = pytest.importorskip("torch")
_erf = np.vectorize(math.erf)

B, L, W = 3, 16, 6
CONFIG = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=32, max_position_embeddings=L)
TASK_LABELS = {"mner": labels.MNER_LABELS, "mre": labels.MNRE_RELATIONS,
               "mjere": labels.GRID_LABELS}


def _gelu(x):
  return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def _batch():
  """[CLS] text(8) [SEP] context(5) [SEP] for every row, shorter texts padded with [PAD]."""
  rng = np.random.default_rng(0)
  num_words = np.array([6, 4, 2])
  positions = np.arange(L)
  batch = {
      "input_ids": rng.integers(5, CONFIG.vocab_size, (B, L)).astype(np.int32),
      "token_type_ids": np.tile((positions >= 10).astype(np.int32), (B, 1)),
      "attention_mask": np.tile((positions < 16).astype(np.int32), (B, 1)),
      "text_mask": np.tile((positions >= 1) & (positions < 9), (B, 1)),
      "context_mask": np.tile((positions >= 10) & (positions < 15), (B, 1)),
      "word_starts": np.array([[1, 2, 4, 5, 7, 8], [1, 3, 5, 6, 0, 0], [2, 6, 0, 0, 0, 0]],
                              np.int32),
      "num_words": num_words.astype(np.int32),
      "tags": rng.integers(0, len(labels.MNER_LABELS), (B, W)).astype(np.int32),
      "head_pos": np.array([1, 3, 6], np.int32),
      "tail_pos": np.array([4, 1, 8], np.int32),
      "relation": np.array([0, 9, 22], np.int32),
  }
  grids = [
      tokenization.encode_grid(6, [], [Quintuple(Span(0, 2, "per"), Span(4, 5, "org"),
                                                 "member_of")], width=W),
      tokenization.encode_grid(4, [Span(3, 4, "loc")], [], width=W),
      tokenization.encode_grid(2, [], [], width=W),
  ]
  batch["grid"] = np.stack(grids).astype(np.int32)
  return batch


@pytest.fixture(scope="module", params=["mner", "mre", "mjere"])
def run(request):
  """(task, params, batch, outputs of __call__, predictions, encoder states) of one model."""
  task = request.param
  model = ShapCA(CONFIG, TASK_LABELS[task], task=task, num_entity_types=4, pair_dim=8,
                 proj_dim=8, dropout_rate=0.0)
  batch = _batch()

  def forward(params):
    out = model.apply({"params": params}, batch)
    predicted = model.apply({"params": params}, batch, method=ShapCA.predict)
    states = model.apply({"params": params}, batch["input_ids"], batch["token_type_ids"],
                         batch["attention_mask"],
                         method=lambda m, *args: m.text_encoder(*args, deterministic=True))
    return out, predicted, states

  params = jax.jit(model.init)(jax.random.key(0), batch)["params"]
  outputs = jax.tree.map(np.array, jax.jit(forward)(params))
  return (task, jax.tree.map(np.array, params), batch, *outputs)


def test_task_loss_matches_pytorch(run):
  task, params, batch, out, _, _ = run
  scores = torch.from_numpy(out["emissions" if task == "mner" else "logits"])
  if task == "mner":
    torchcrf = pytest.importorskip("torchcrf")
    crf = torchcrf.CRF(len(labels.MNER_LABELS), batch_first=True)
    with torch.no_grad():
      for name, value in (("transitions", "transitions"), ("start_transitions", "start"),
                          ("end_transitions", "end")):
        getattr(crf, name).copy_(torch.from_numpy(params["crf"][value]))
    mask = torch.from_numpy(np.arange(W)[None] < batch["num_words"][:, None])
    expected = -crf(scores, torch.from_numpy(batch["tags"]).long(), mask, reduction="none")
    units = np.ones(B)
  elif task == "mre":
    expected = torch.nn.functional.cross_entropy(
        scores, torch.from_numpy(batch["relation"]).long(), reduction="none")
    units = np.ones(B)
  else:
    grid = torch.from_numpy(batch["grid"]).long()
    cells = torch.nn.functional.cross_entropy(scores.permute(0, 3, 1, 2), grid, ignore_index=-1,
                                              reduction="none")
    expected = cells.sum((1, 2))
    units = (batch["grid"] != -1).sum((1, 2))
  np.testing.assert_allclose(out["task_loss"], expected.detach().numpy(), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out["task_units"], units)


def test_alignment_vectors_are_unit_norm(run):
  out = run[3]
  for name in ("text_vec", "context_vec"):
    assert out[name].shape == (B, 8)
    np.testing.assert_allclose(np.linalg.norm(out[name], axis=1), 1.0, rtol=1e-5)


def test_predictions_follow_the_scores(run):
  task, _, batch, out, predicted, _ = run
  if task == "mner":
    assert predicted.shape == (B, W)
    for b, n in enumerate(batch["num_words"]):
      assert np.all(predicted[b, n:] == -1) and np.all(predicted[b, :n] >= 0)
  elif task == "mre":
    np.testing.assert_array_equal(predicted, out["logits"].argmax(-1))
  else:
    for b, n in enumerate(batch["num_words"]):
      for i in range(W):
        for j in range(W):
          if not i <= j < n:
            assert predicted[b, i, j] == -1
          else:
            logits = out["logits"][b, i, j]
            allowed = logits[:5] if i == j else logits
            assert predicted[b, i, j] == allowed.argmax()


def test_heads_read_the_encoder_states_they_should(run):
  """Without images and dropout the head's input is the encoder's output itself."""
  task, params, batch, out, _, states = run
  rows = np.arange(B)
  if task == "mner":
    dense = params["tagger"]["emissions"]
    words = states[rows[:, None], batch["word_starts"]]
    np.testing.assert_allclose(out["emissions"], words @ dense["kernel"] + dense["bias"],
                               rtol=1e-4, atol=1e-4)
    return
  if task == "mjere":
    p = params["pair_scorer"]
    words = states[rows[:, None], batch["word_starts"]]
    ones = np.ones((B, W, 1))
    r = np.concatenate([_gelu(words @ p["row"]["kernel"] + p["row"]["bias"]), ones], -1)
    c = np.concatenate([_gelu(words @ p["col"]["kernel"] + p["col"]["bias"]), ones], -1)
    np.testing.assert_allclose(out["logits"], np.einsum("bia,akc,bjc->bijk", r, p["biaffine"], c),
                               rtol=1e-4, atol=1e-4)
    return
  kernel, bias = params["classifier"]["logits"]["kernel"], params["classifier"]["logits"]["bias"]
  pair = np.concatenate([states[rows, batch["head_pos"]], states[rows, batch["tail_pos"]]], 1)
  np.testing.assert_allclose(out["logits"], pair @ kernel + bias, rtol=1e-4, atol=1e-4)


def test_unknown_task_is_refused():
  model = ShapCA(CONFIG, labels.MNER_LABELS, task="ner")
  with pytest.raises(ValueError, match="task='ner'"):
    model.init(jax.random.key(0), _batch())


# What the model computed on `_batch()` before align.views existed (commit 3d98b1a, the same
# init key): each task's per-example task loss, and the c<->t alignment losses (lambda_ct = 1)
# of its vectors, InfoNCE and Shapley with permutation key 1.
BEFORE_VIEWS = {
    "mner": [15.208608627319336, 8.842609405517578, 4.26792049407959],
    "mre": [3.1625473499298096, 4.841740131378174, 3.5523624420166016],
    "mjere": [73.76859283447266, 33.74551773071289, 10.423948287963867],
}
BEFORE_VIEWS_ALIGN = {"infonce": 4.002583026885986, "shapley": 3.996443271636963}


def test_joint_views_reproduce_the_model_before_the_switch(run):
  task, _, _, out, _, _ = run
  np.testing.assert_allclose(out["task_loss"], BEFORE_VIEWS[task], rtol=1e-5)
  for kind, expected in BEFORE_VIEWS_ALIGN.items():
    total, _ = losses.alignment_loss(out["text_vec"], out["context_vec"], None,
                                     jax.random.key(1),
                                     losses.AlignmentConfig(kind=kind, lambda_ct=1.0))
    np.testing.assert_allclose(total, expected, rtol=1e-5, err_msg=kind)


def _views_batch():
  """`_batch()` plus the text-only and context-only rows of the separate views, made of the
  same pieces as each joint row (texts 8, 6, 3 pieces; contexts 5, 3, 1)."""
  batch = _batch()
  texts, contexts = (8, 6, 3), (5, 3, 1)
  positions = np.arange(L)
  ids = np.zeros((B, 2, L), np.int32)
  attention = np.zeros((B, 2, L), np.int32)
  pooled = np.zeros((B, 2, L), bool)
  for b, lengths in enumerate(zip(texts, contexts)):
    joint = batch["input_ids"][b]
    batch["attention_mask"][b] = positions < lengths[0] + lengths[1] + 3
    batch["text_mask"][b] = (positions >= 1) & (positions < 1 + lengths[0])
    start = lengths[0] + 2
    batch["context_mask"][b] = (positions >= start) & (positions < start + lengths[1])
    batch["token_type_ids"][b] = (positions >= start - 1) & batch["attention_mask"][b]
    for view, pieces in enumerate((joint[1:1 + lengths[0]], joint[start:start + lengths[1]])):
      ids[b, view, :len(pieces) + 2] = [2, *pieces, 3]
      attention[b, view] = positions < len(pieces) + 2
      pooled[b, view] = (positions >= 1) & (positions < 1 + len(pieces))
  batch |= {"views_input_ids": ids, "views_attention_mask": attention, "views_mask": pooled}
  return batch


def _with_new_pieces(batch, row, view):
  """`batch` with row `row`'s text (view 0) or context (view 1) pieces replaced, in the
  joint input and in its view."""
  batch = {k: v.copy() for k, v in batch.items()}
  mask = batch["text_mask" if view == 0 else "context_mask"][row]
  batch["input_ids"][row, mask] = (batch["input_ids"][row, mask] + 7) % 35 + 5
  batch["views_input_ids"][row, view, batch["views_mask"][row, view]] = (
      batch["input_ids"][row, mask])
  return batch


def test_separate_views_keep_text_and_context_vectors_apart():
  """With separate views a context never reaches a text vector nor a text a context vector,
  bit for bit, in its own row or any other; with joint views it does (the shortcut)."""
  batch = _views_batch()
  vectors = {}
  for views in ("joint", "separate"):
    model = ShapCA(CONFIG, labels.MNER_LABELS, proj_dim=8, dropout_rate=0.0, align_views=views)
    params = jax.jit(model.init)(jax.random.key(0), batch)["params"]
    apply = jax.jit(lambda b, model=model, params=params: model.apply({"params": params}, b))
    vectors[views] = [jax.tree.map(np.asarray, apply(b)) for b in (
        batch, _with_new_pieces(batch, 0, view=1), _with_new_pieces(batch, 1, view=0))]
  base, new_context, new_text = vectors["separate"]
  np.testing.assert_array_equal(new_context["text_vec"], base["text_vec"])
  np.testing.assert_array_equal(new_context["context_vec"][1:], base["context_vec"][1:])
  assert not np.allclose(new_context["context_vec"][0], base["context_vec"][0])
  np.testing.assert_array_equal(new_text["context_vec"], base["context_vec"])
  np.testing.assert_array_equal(new_text["text_vec"][[0, 2]], base["text_vec"][[0, 2]])
  assert not np.allclose(new_text["text_vec"][1], base["text_vec"][1])
  # The task path reads the joint pass in both: same emissions for the same joint input.
  np.testing.assert_array_equal(base["emissions"], vectors["joint"][0]["emissions"])
  joint, joint_new_context, _ = vectors["joint"]
  assert not np.allclose(joint_new_context["text_vec"][0], joint["text_vec"][0])
