"""Inference from an exported model against the training run's own evaluation, brute-force CRF
posteriors and brute-force Shapley values; bad input, truncation and images."""

import dataclasses
import itertools
import json
import logging
import math
import pathlib

import jax
import numpy as np
import optax
import pytest
from PIL import Image

from shapca_jax import checkpoint, crf, export, metrics, predict, steps, train, wordpair
from shapca_jax.data import labels
from shapca_jax.data.errors import DataFormatError
from shapca_jax.data.pipeline import BatchPipeline
from shapca_jax.data.readers import Example
from shapca_jax.models.shapca import ShapCA
import test_export
import train_fixtures

TEST_TWEETS = 12


def _restored_state(config, workdir: pathlib.Path, data):
  """The best params of a run restored from its Orbax checkpoint, as training evaluates them."""
  model, _ = train.build_model(config, data.vocab_size)
  batch = data.test.batch(0)
  shapes = jax.eval_shape(lambda r: model.init(r, batch)["params"], jax.random.key(0))
  return steps.TrainState.create(apply_fn=model.apply, tx=optax.sgd(0.0),
                                 params=checkpoint.restore_best(workdir, shapes))


def _reference_tags(config, workdir: pathlib.Path):
  """Tags of the test split as the training code decodes them (eval_step on the run's own
  pipeline), that decoding's F1 and the examples."""
  data = train.build_data(config, workdir)
  state = _restored_state(config, workdir, data)
  eval_fn = jax.jit(steps.eval_step)
  tags = [list(np.asarray(labels.MNER_LABELS)[p.value[:p.num_words]])
          for p in train.predict_split(eval_fn, state, data.test)]
  return tags, train.evaluate(eval_fn, state, data.test)["f1"], list(data.test.examples)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, minilm_dir, embedded_data_dir):
  """A tiny trained run, its export, and predictions made with the run and encoder hidden."""
  root = tmp_path_factory.mktemp("predict")
  data_dir = train_fixtures.write_tiny_twitter(embedded_data_dir, root / "data", TEST_TWEETS)
  bert = train_fixtures.write_tiny_bert(root / "bert", minilm_dir)
  config = train_fixtures.tiny_config(data_dir, bert)
  config.num_epochs = 1
  results = train.train_and_evaluate(config, root / "run")
  reference, reference_f1, examples = _reference_tags(config, root / "run")
  export.export_run(root / "run", root / "model")

  lines = [json.dumps({"id": f"t{i}", "words": list(e.words), "context": e.context})
           for i, e in enumerate(examples)]
  (root / "test.jsonl").write_text("\n".join(lines) + "\n")
  hidden = [(root / name, root / f"hidden_{name}") for name in ("run", "bert")]
  for folder, away in hidden:
    folder.rename(away)
  try:
    code = predict.main(["--model", str(root / "model"), "--input", str(root / "test.jsonl"),
                         "--output", str(root / "out.jsonl"), "--explain",
                         "--batch_size", str(config.eval_batch_size)])
  finally:
    for folder, away in hidden:
      away.rename(folder)
  assert code == 0
  records = [json.loads(line) for line in (root / "out.jsonl").read_text().splitlines()]
  return dict(root=root, config=config, results=results, reference=reference,
              reference_f1=reference_f1, examples=examples, records=records,
              exported=export.load_model(root / "model"))


@pytest.fixture(scope="module")
def predictor(tiny_run):
  return predict.Predictor(tiny_run["exported"])


def _batch(exported, examples, batch_size):
  pipeline = BatchPipeline(examples, exported.encoder(), batch_size=batch_size,
                           buckets=exported.buckets)
  return [pipeline.batch(b) for b in range(pipeline.report.batches_per_epoch)]


def _encode(exported, batch):
  return exported.model.apply({"params": exported.params}, batch, deterministic=True,
                               method=ShapCA.encode)


def _is_bio(tags) -> bool:
  previous = "O"
  for tag in tags:
    if tag.startswith("I-") and previous[2:] != tag[2:]:
      return False
    previous = tag
  return True


# ----------------------------------------------------------------------------- tests


@pytest.mark.slow
def test_predictions_equal_the_runs_own_evaluation(tiny_run):
  records, examples = tiny_run["records"], tiny_run["examples"]
  assert [r["id"] for r in records] == [f"t{i}" for i in range(len(examples))]
  for i, record in enumerate(records):
    assert record["truncated_words"] == 0
    assert record["tags"] == tiny_run["reference"][i]
  gold = [list(e.tags) for e in examples]
  f1 = metrics.entity_f1(gold, [r["tags"] for r in records])["f1"]
  assert tiny_run["reference_f1"] == tiny_run["results"]["test"]["f1"]
  assert f1 == tiny_run["results"]["test"]["f1"]  # written by the run when it finished
  assert any(r["entities"] for r in records)


def _brute_force_posterior(params, emissions, labels):
  """Every BIO-valid path of a short sentence, scored and normalised by enumeration."""
  n, k = emissions.shape
  paths, scores = [], []
  for path in itertools.product(range(k), repeat=n):
    if not _is_bio([labels[t] for t in path]):
      continue
    score = params["start"][path[0]] + params["end"][path[-1]] + sum(
        emissions[t, path[t]] for t in range(n))
    score += sum(params["transitions"][a, b] for a, b in zip(path, path[1:]))
    paths.append(path)
    scores.append(score)
  scores = np.asarray(scores, np.float64)
  probs = np.exp(scores - scores.max())
  probs /= probs.sum()
  marginals = np.zeros((n, k))
  for path, p in zip(paths, probs):
    marginals[np.arange(n), path] += p
  return paths[int(np.argmax(scores))], marginals


def _with_crf(exported, **updates):
  params = {**exported.params, "crf": {**exported.params["crf"], **updates}}
  return dataclasses.replace(exported, params=params)


@pytest.mark.slow
def test_tags_and_confidences_match_a_brute_force_crf(tiny_run):
  # Favouring PER makes the barely trained model tag entities, some of several words.
  labels = tiny_run["exported"].labels
  start = np.asarray(tiny_run["exported"].params["crf"]["start"]).copy()
  transitions = np.asarray(tiny_run["exported"].params["crf"]["transitions"]).copy()
  start[labels.index("B-PER")] += 1.0
  transitions[:, labels.index("I-PER")] += 1.0
  exported = _with_crf(tiny_run["exported"], start=start, transitions=transitions)
  examples = [Example("", tuple("Obama visits Paris today".split()), "q1", context="a flag"),
              Example("", ("RT", "@jack", ":", "NBA"), "q2", context="a ball")]
  records, _ = predict.Predictor(exported).predict(
      [predict.Query(i, e) for i, e in enumerate(examples)])
  batch = _batch(exported, examples, 2)[0]
  emissions = np.asarray(_encode(exported, batch)["emissions"], np.float64)
  crf_params = jax.tree.map(np.asarray, exported.params["crf"])
  for row, record in enumerate(records):
    best, marginals = _brute_force_posterior(crf_params, emissions[row, :4], exported.labels)
    assert record["tags"] == [exported.labels[t] for t in best]
    for entity in record["entities"]:
      span = range(entity["start"], entity["end"])
      expected = min(marginals[t, best[t]] for t in span)
      assert entity["confidence"] == pytest.approx(expected, abs=2e-5)
      assert entity["text"] == " ".join(examples[row].words[entity["start"]:entity["end"]])
  assert any(r["entities"] for r in records)


@pytest.mark.slow
def test_constrained_decoding_never_emits_invalid_bio(tiny_run):
  exported = tiny_run["exported"]
  labels = exported.labels
  # CRF scores that make every forbidden move the most attractive one.
  transitions = np.asarray(exported.params["crf"]["transitions"]).copy()
  start = np.asarray(exported.params["crf"]["start"]).copy()
  inside = [i for i, name in enumerate(labels) if name.startswith("I-")]
  for i in inside:
    start[i] += 30.0
    transitions[:, i] += 30.0
    transitions[i, i] -= 30.0
  hostile = _with_crf(exported, transitions=transitions, start=start)
  examples = tiny_run["examples"]
  records, _ = predict.Predictor(hostile, batch_size=8).predict(
      [predict.Query(i, e) for i, e in enumerate(examples)])
  assert all(_is_bio(r["tags"]) for r in records)

  # The same scores decoded without the constraints do produce invalid sequences.
  invalid = 0
  for batch in _batch(hostile, examples, 8):
    emissions = _encode(hostile, batch)["emissions"]
    free, _ = crf.crf_decode(hostile.params["crf"], emissions, batch["num_words"])
    for row in np.flatnonzero(batch["valid"]):
      n = int(batch["num_words"][row])
      invalid += not _is_bio([labels[t] for t in np.asarray(free)[row, :n]])
  assert invalid > 0


def _brute_force_shapley(sim: np.ndarray, tau: float) -> np.ndarray:
  """phi[i, j] of the softmax-expectation games (METHOD §4) by enumerating coalitions."""
  k = sim.shape[0]

  def value(coalition, j):
    if not coalition:
      return 0.0
    s = sim[list(coalition), j]
    w = np.exp((s - s.max()) / tau)
    return float(np.sum(w * s) / np.sum(w))

  phi = np.zeros_like(sim)
  for i, j in itertools.product(range(k), repeat=2):
    others = [p for p in range(k) if p != i]
    for size in range(k):
      weight = math.factorial(size) * math.factorial(k - size - 1) / math.factorial(k)
      for coalition in itertools.combinations(others, size):
        phi[i, j] += weight * (value(coalition + (i,), j) - value(coalition, j))
  return phi


@pytest.mark.slow
def test_explanations_are_the_shapley_values_of_the_context_text_games(tiny_run):
  exported, records, config = tiny_run["exported"], tiny_run["records"], tiny_run["config"]
  assert config.align.utility == "softmax_expectation"
  vectors = {}
  for batch in _batch(exported, tiny_run["examples"], 4):
    out = jax.device_get(_encode(exported, batch))
    for row in np.flatnonzero(batch["valid"]):
      vectors[f"t{batch['example_index'][row]}"] = (out["context_vec"][row], out["text_vec"][row])
  batches = {}
  for record in records:
    batches.setdefault(record["explanation"]["batch"], []).append(record)
  assert sorted(len(b) for b in batches.values()) == [4, 8]  # 12 tweets, batches of 8
  for members in batches.values():
    ids = [p["id"] for p in members[0]["explanation"]["contexts"]]
    assert sorted(ids) == sorted(r["id"] for r in members)
    contexts = np.stack([vectors[i][0] for i in ids]).astype(np.float64)
    texts = np.stack([vectors[i][1] for i in ids]).astype(np.float64)
    expected = _brute_force_shapley(contexts @ texts.T, config.align.tau_u)
    for record in members:
      j = ids.index(record["id"])
      column = [p["phi"] for p in record["explanation"]["contexts"]]
      np.testing.assert_allclose(column, expected[:, j], atol=2e-5)
      assert record["explanation"]["own_context"] == pytest.approx(expected[j, j], abs=2e-5)
      assert record["explanation"]["own_rank"] == 1 + np.sum(expected[:, j] > expected[j, j] + 1e-5)


@pytest.mark.parametrize("line, message", [
    ('{"words": ["a", "b"]', "not valid JSON"),
    ('["a", "b"]', "expected a JSON object"),
    ('{"text": "a b", "words": ["a", "b"]}', "expected exactly one of 'words'"),
    ('{"words": ["a", ""]}', "'words' must be a list of non-empty strings"),
    ('{"text": "   "}', "the sentence has no words"),
    ('{"text": "a b", "contxt": "c"}', "unknown keys \\['contxt'\\] for a mner model"),
    ('{"text": "a b", "context": 3}', "'context' must be a string"),
    ('{"id": "x", "text": "a b"}', "id 'x' was already used on line 1"),
])
def test_bad_input_lines_name_their_line(tmp_path, line, message):
  path = tmp_path / "in.jsonl"
  path.write_text('{"id": "x", "text": "fine line"}\n\n' + line + "\n")
  with pytest.raises(DataFormatError, match=f"in.jsonl:3: {message}"):
    predict.read_queries(path)


def test_mre_lines_need_an_entity_pair_inside_the_sentence(tmp_path):
  path = tmp_path / "in.jsonl"
  path.write_text('{"text": "Obama met Merkel", "head": [0, 1], "tail": [2, 3]}\n'
                  '{"text": "a b", "head": [0, 3], "tail": [1, 2]}\n')
  with pytest.raises(DataFormatError, match="in.jsonl:2: 'head' must be a word span"):
    predict.read_queries(path, task="mre")
  path.write_text('{"text": "Obama met Merkel", "head": [0, 1]}\n')
  with pytest.raises(DataFormatError, match="in.jsonl:1: 'tail' must be a word span"):
    predict.read_queries(path, task="mre")
  with pytest.raises(DataFormatError, match="in.jsonl:1: unknown keys \\['head'\\] for a mner"):
    predict.read_queries(path, task="mner")


@pytest.mark.slow
def test_command_line_errors_and_missing_contexts(tiny_run, tmp_path, capsys, predictor):
  model = str(tiny_run["exported"].directory)
  path = tmp_path / "in.jsonl"
  path.write_text('{"text": "a b", "context": "c"}\n{"text": "no context here"}\n')
  assert predict.main(["--model", model, "--input", str(path)]) == 2
  assert "in.jsonl:2: no context" in capsys.readouterr().err
  queries = predict.read_queries(path)
  with pytest.raises(DataFormatError, match="in.jsonl:2: no context"):
    predictor.predict(queries)
  records, report = predict.Predictor(tiny_run["exported"], missing_context="empty").predict(
      queries)
  assert report["missing_context"] == 1 and len(records) == 2

  assert predict.main(["--model", model, "--text", "Obama visits Paris", "--context",
                       "a man in a suit"]) == 0
  record = json.loads(capsys.readouterr().out)
  assert record["words"] == ["Obama", "visits", "Paris"] and len(record["tags"]) == 3


@pytest.mark.slow
def test_over_long_text_is_truncated_and_reported(predictor, caplog):
  words = ("the",) * 80  # one word piece each
  query = predict.Query("long", Example("", words, "long.jsonl:7", context="a caption"))
  with caplog.at_level(logging.WARNING):
    (record,), report = predictor.predict([query])
  kept = len(words) - record["truncated_words"]
  assert 0 < kept < len(words)
  assert None not in record["tags"][:kept] and record["tags"][kept:] == [None] * (80 - kept)
  assert report["text_truncated"] == 1
  assert any("long.jsonl:7" in r.getMessage() and "nothing is predicted" in r.getMessage()
             for r in caplog.records)


@pytest.mark.slow
def test_images_are_read_and_a_missing_one_names_its_line(tmp_path, minilm_dir):
  bert = train_fixtures.write_tiny_bert(tmp_path / "bert", minilm_dir)
  clip = test_export.write_tiny_clip(tmp_path / "clip")
  config = train_fixtures.tiny_config(tmp_path / "data", bert)
  config.use_image, config.image_encoder, config.image_dir = True, str(clip), str(tmp_path)
  config.max_image_pixels = 2500  # the run's limit holds in predict too
  test_export.write_finished_run(tmp_path / "run", config)
  export.export_run(tmp_path / "run", tmp_path / "model")
  Image.new("RGB", (48, 40), (200, 30, 30)).save(tmp_path / "red.png")
  Image.new("RGB", (60, 60), (30, 30, 200)).save(tmp_path / "big.png")
  path = tmp_path / "in.jsonl"
  path.write_text('{"text": "red car", "context": "a red car", "image": "red.png"}\n'
                  '{"text": "blue sky", "context": "the sky", "image": "gone.png"}\n'
                  '{"text": "big sea", "context": "the sea", "image": "big.png"}\n')
  queries = predict.read_queries(path)
  exported = export.load_model(tmp_path / "model")
  with pytest.raises(DataFormatError, match="in.jsonl:2: image file .*gone.png not found"):
    predict.Predictor(exported).predict(queries)
  with pytest.raises(DataFormatError, match=r"big\.png: 60 x 60 = 3,600 pixels is over the "
                                            r"limit of 2,500 \(config\.max_image_pixels\)"):
    predict.Predictor(exported).predict([queries[0], queries[2]])
  records, report = predict.Predictor(exported, missing_image="blank").predict(queries)
  assert report["blank_images"] == 2 and [len(r["tags"]) for r in records] == [2, 2, 2]


@pytest.fixture(scope="module")
def tiny_relations(tmp_path_factory, shared_data_dir, minilm_dir):
  root = tmp_path_factory.mktemp("relations")
  return (train_fixtures.write_tiny_relations(shared_data_dir, root / "data", per_split=6),
          train_fixtures.write_tiny_bert(root / "bert", minilm_dir))


def _span_tuples(items):
  return [((e["start"], e["end"]), e["type"]) for e in items]


@pytest.mark.slow
@pytest.mark.parametrize("task", ["mre", "mjere"])
def test_relation_predictions_equal_the_training_evaluation(tiny_relations, task, tmp_path):
  config = train_fixtures.tiny_config(*tiny_relations, task=task)
  test_export.write_finished_run(tmp_path / "run", config)
  data = train.build_data(config, tmp_path / "run")
  state = _restored_state(config, tmp_path / "run", data)
  reference = train.predict_split(jax.jit(steps.eval_step), state, data.test)
  export.export_run(tmp_path / "run", tmp_path / "model")

  examples = list(data.test.examples)
  lines = []
  for e in examples:
    line = {"words": list(e.words), "context": e.context}
    if task == "mre":
      line |= {"head": [e.head.start, e.head.end], "tail": [e.tail.start, e.tail.end]}
    lines.append(line)
  (tmp_path / "in.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
  assert predict.main(["--model", str(tmp_path / "model"), "--input", str(tmp_path / "in.jsonl"),
                       "--output", str(tmp_path / "out.jsonl")]) == 0
  records = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
  assert len(records) == len(examples)
  if task == "mre":
    assert [r["relation"] for r in records] == [labels.MNRE_RELATIONS[p.value] for p in reference]
    for r in records:
      assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
      assert r["confidence"] == max(r["probabilities"].values())
    return
  vocab = train.JmereScorer.fit(data.train.examples).vocab
  for record, p in zip(records, reference):
    decoded = wordpair.decode_grid(p.value[:p.num_words, :p.num_words], vocab)
    assert _span_tuples(record["entities"]) == decoded.entities
    assert [(*_span_tuples([q["head"]])[0], *_span_tuples([q["tail"]])[0], q["relation"])
            for q in record["quintuples"]] == decoded.quintuples
  assert any(r["quintuples"] for r in records)
