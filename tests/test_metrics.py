"""Tests for shapca_jax.metrics against seqeval (a test-only oracle), scikit-learn and
hand-counted cases."""

import random

import pytest
import seqeval.metrics
from sklearn.metrics import f1_score, precision_score, recall_score

from shapca_jax import metrics

TYPES = ("PER", "LOC", "ORG", "MISC")
ALL_TAGS = ("O",) + tuple(f"{p}-{t}" for t in TYPES for p in "BI")


def read_conll_tags(path):
  """Tag sequences of a CoNLL file with `IMGID:` header lines (read here, not by the library)."""
  sentences, current = [], []
  for line in path.read_text(encoding="utf-8").splitlines():
    if line.startswith("IMGID:"):
      continue
    if not line.strip():
      if current:
        sentences.append(current)
      current = []
      continue
    current.append(line.rsplit("\t", 1)[1])
  if current:
    sentences.append(current)
  return sentences


def perturb(sentences, rate, rng):
  """Replaces a fraction of tags by random ones, which creates stray I- tags and type changes."""
  return [[rng.choice(ALL_TAGS) if rng.random() < rate else tag for tag in tags]
          for tags in sentences]


def seqeval_scores(gold, pred):
  report = seqeval.metrics.classification_report(gold, pred, output_dict=True, zero_division=0)
  per_type = {name: row for name, row in report.items() if not name.endswith(" avg")}
  return report["micro avg"], per_type


def assert_equal_to_seqeval(gold, pred):
  ours = metrics.entity_f1(gold, pred)
  micro, per_type = seqeval_scores(gold, pred)
  assert ours["precision"] == pytest.approx(micro["precision"], abs=1e-12)
  assert ours["recall"] == pytest.approx(micro["recall"], abs=1e-12)
  assert ours["f1"] == pytest.approx(micro["f1-score"], abs=1e-12)
  assert ours["f1"] == pytest.approx(seqeval.metrics.f1_score(gold, pred), abs=1e-12)
  assert ours["num_gold"] == micro["support"]
  assert sorted(ours["per_type"]) == sorted(per_type)
  for name, row in per_type.items():
    assert ours["per_type"][name]["precision"] == pytest.approx(row["precision"], abs=1e-12)
    assert ours["per_type"][name]["recall"] == pytest.approx(row["recall"], abs=1e-12)
    assert ours["per_type"][name]["f1"] == pytest.approx(row["f1-score"], abs=1e-12)
    assert ours["per_type"][name]["num_gold"] == row["support"]
  return ours


def test_entity_f1_on_twitter2017_dev_with_perturbed_predictions(shared_data_dir):
  gold = read_conll_tags(shared_data_dir / "twitter2017" / "valid.txt")
  assert len(gold) == 723
  exact = metrics.entity_f1(gold, gold)
  assert exact["num_gold"] == 1324 and exact["f1"] == 1.0
  rng = random.Random(0)
  for rate in (0.02, 0.1, 0.3):
    ours = assert_equal_to_seqeval(gold, perturb(gold, rate, rng))
    assert 0.0 < ours["f1"] < 1.0


def test_entity_f1_on_twitter2015_dev_with_its_stray_i_tags(shared_data_dir):
  gold = read_conll_tags(shared_data_dir / "twitter2015" / "valid.txt")
  pred = perturb(gold, 0.05, random.Random(1))
  assert_equal_to_seqeval(gold, pred)
  assert_equal_to_seqeval(pred, gold)


@pytest.mark.parametrize("seed", range(5))
def test_entity_f1_on_random_tag_sequences(seed):
  rng = random.Random(seed)
  lengths = [rng.randint(0, 12) for _ in range(200)]
  gold = [[rng.choice(ALL_TAGS) for _ in range(n)] for n in lengths]
  pred = perturb(gold, 0.3, rng)
  assert_equal_to_seqeval(gold, pred)


def test_entity_f1_with_no_predictions_is_zero():
  scores = metrics.entity_f1([["B-PER", "O"]], [["O", "O"]])
  assert (scores["precision"], scores["recall"], scores["f1"]) == (0.0, 0.0, 0.0)
  assert scores["per_type"]["PER"]["num_gold"] == 1


@pytest.mark.parametrize("bad", ["B", "X-PER", "I-", "per", ""])
def test_entity_f1_rejects_malformed_tags_naming_the_position(bad):
  with pytest.raises(ValueError, match=r"predicted sentence 1, word 2"):
    metrics.entity_f1([["O"], ["O", "O", "O"]], [["O"], ["O", "O", bad]])


def test_entity_f1_rejects_misaligned_sentences():
  with pytest.raises(ValueError, match="sentence 0"):
    metrics.entity_f1([["O", "O"]], [["O"]])


@pytest.mark.parametrize("seed", range(5))
def test_relation_f1_equals_sklearn_micro_over_non_none_labels(seed):
  rng = random.Random(seed)
  names = ["None"] + [f"/per/per/r{i}" for i in range(22)]
  gold = [rng.choice(names[:6]) for _ in range(500)]
  pred = [g if rng.random() < 0.5 else rng.choice(names[:8]) for g in gold]
  ours = metrics.relation_f1(gold, pred)
  positive = names[1:]
  kwargs = dict(labels=positive, average="micro", zero_division=0)
  assert ours["precision"] == pytest.approx(precision_score(gold, pred, **kwargs), abs=1e-12)
  assert ours["recall"] == pytest.approx(recall_score(gold, pred, **kwargs), abs=1e-12)
  assert ours["f1"] == pytest.approx(f1_score(gold, pred, **kwargs), abs=1e-12)
  ids = {name: i for i, name in enumerate(names)}
  by_id = metrics.relation_f1([ids[g] for g in gold], [ids[p] for p in pred], negative_label=0)
  assert by_id == ours


def test_relation_f1_counts_none_only_as_miss_or_false_alarm():
  scores = metrics.relation_f1(["a", "None", "b", "None"], ["None", "a", "b", "None"])
  assert (scores["num_correct"], scores["num_pred"], scores["num_gold"]) == (1, 2, 2)
  assert scores["f1"] == 0.5


def test_jmere_f1_hand_case():
  q = lambda h, ht, t, tt, r: (h, ht, t, tt, r)  # noqa: E731
  gold_q = [
      [q((0, 1), "per", (3, 5), "org", "member_of"), q((0, 1), "per", (6, 7), "per", "peer")],
      [q((2, 3), "loc", (0, 1), "loc", "contain")],
      [],
  ]
  pred_q = [
      # One exact match; one with the wrong tail end; a duplicate counts once.
      [q((0, 1), "per", (3, 5), "org", "member_of"), q((0, 1), "per", (6, 8), "per", "peer"),
       q((0, 1), "per", (3, 5), "org", "member_of")],
      # Direction flipped: a miss and a false alarm.
      [q((0, 1), "loc", (2, 3), "loc", "contain")],
      [q((1, 2), "misc", (4, 5), "loc", "held_on")],
  ]
  gold_e = [[((0, 1), "per"), ((3, 5), "org"), ((6, 7), "per")], [((2, 3), "loc"), ((0, 1), "loc")], []]
  pred_e = [[((0, 1), "per"), ((3, 5), "org"), ((6, 8), "per")], [((2, 3), "loc"), ((0, 1), "loc")],
            [((1, 2), "misc"), ((4, 5), "loc")]]
  scores = metrics.jmere_f1(gold_e, pred_e, gold_q, pred_q)
  quintuple = scores["quintuple"]
  assert (quintuple["num_correct"], quintuple["num_pred"], quintuple["num_gold"]) == (1, 4, 3)
  assert quintuple["precision"] == 0.25 and quintuple["recall"] == pytest.approx(1 / 3)
  assert quintuple["f1"] == pytest.approx(2 / 7)
  entity = scores["entity"]
  assert (entity["num_correct"], entity["num_pred"], entity["num_gold"]) == (4, 7, 5)
  assert entity["per_type"]["per"] == metrics.prf(1, 2, 2)
  assert entity["per_type"]["loc"] == metrics.prf(2, 3, 2)
  assert entity["per_type"]["misc"] == metrics.prf(0, 1, 0)
  assert "per_type" not in quintuple


def test_set_f1_rejects_misaligned_examples():
  with pytest.raises(ValueError, match="2 examples but pred has 1"):
    metrics.set_f1([[], []], [[]])
