"""The transformers token-classification baseline: first-piece labels, and a short run on a
tiny random BERT that writes the results fields ours writes."""

import gzip
import json
import pathlib
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("seqeval")

from shapca_jax.data import labels, readers  # noqa: E402
import train_fixtures  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "experiments"))
from baselines import hf_token_classification as recipe  # noqa: E402


def test_labels_sit_on_the_first_piece_of_each_text_word(hf_tokenizer):
  example = readers.Example(source="x", words=("Ann", "Leeeeeeroy", "joined", "\ufe0f"),
                            tags=("B-PER", "I-PER", "O", "O"), image_id="1.jpg",
                            context="a man joined")
  [feature] = recipe.encode([example], hf_tokenizer, max_length=64)
  pieces = hf_tokenizer.convert_ids_to_tokens(feature["input_ids"])
  first_sep = pieces.index("[SEP]")
  labelled = [i for i, label in enumerate(feature["labels"]) if label != recipe.IGNORE]
  # Every labelled position is a word start of the text, and every text word start is labelled.
  text_starts = [i for i in range(1, first_sep) if not pieces[i].startswith("##")]
  assert labelled == text_starts
  assert [feature["labels"][i] for i in labelled] == [
      labels.MNER_LABEL_IDS[t] for t in ("B-PER", "I-PER", "O")]
  assert feature["first_piece"] == text_starts + [-1]  # U+FE0F has no piece
  assert pieces[first_sep + 1:-1] == ["a", "man", "joined"]


def test_a_short_run_writes_the_results_fields(tmp_path, minilm_dir, embedded_data_dir):
  data_dir = train_fixtures.write_tiny_twitter(embedded_data_dir, tmp_path / "data", per_split=20)
  encoder = train_fixtures.write_tiny_bert(tmp_path / "bert", minilm_dir)
  results = recipe.main(["--workdir", str(tmp_path / "run"), "--text_encoder", str(encoder),
                         "--data_dir", str(data_dir), "--batch_size", "4", "--epochs", "2",
                         "--max_steps", "7", "--log_every", "2"])
  written = json.loads((tmp_path / "run" / "results.json").read_text())
  assert written["test"] == results["test"]
  for split in ("dev", "test"):
    assert set(results[split]) == {"precision", "recall", "f1"}
    assert all(0.0 <= v <= 1.0 for v in results[split].values())
  assert results["steps"] == 7 and results["best_step"] in (5, 7)  # 5 steps per epoch
  assert results["steps_per_second"] > 0 and results["wall_seconds"] > 0
  assert 0.0 <= results["padded_token_fraction"] < 1.0
  records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
  assert [r["step"] for r in records if "loss" in r] == [2, 4, 6]
  dev = [r for r in records if "dev" in r]
  assert [r["step"] for r in dev] == [5, 7]
  assert dev[0]["seconds"] <= dev[1]["seconds"]
  assert results["dev"] == max((r["dev"] for r in dev), key=lambda d: d["f1"])


def test_evaluation_steps_follow_the_protocol():
  assert recipe.evaluation_steps(210, 2, 1470) == {105 * i for i in range(1, 15)}
  assert recipe.evaluation_steps(5, 1, 7) == {5, 7}


def test_a_protocol_run_stops_early_and_keeps_test_counts(tmp_path, minilm_dir,
                                                         embedded_data_dir):
  data_dir = train_fixtures.write_tiny_twitter(embedded_data_dir, tmp_path / "data", per_split=20)
  encoder = train_fixtures.write_tiny_bert(tmp_path / "bert", minilm_dir)
  results = recipe.main(["--workdir", str(tmp_path / "run"), "--text_encoder", str(encoder),
                         "--data_dir", str(data_dir), "--batch_size", "4", "--epochs", "4",
                         "--stop_after_epochs", "2", "--evals_per_epoch", "2", "--seed", "3"])
  assert (results["steps"], results["last_step"], results["config"]["num_epochs"]) == (20, 10, 4)
  records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
  assert [r["epoch"] for r in records if "dev" in r] == [0.4, 1.0, 1.4, 2.0]  # steps 2, 5, 7, 10
  with gzip.open(tmp_path / "run" / "test_predictions.jsonl.gz", "rt") as f:
    rows = [json.loads(line) for line in f]
  assert [r["index"] for r in rows] == list(range(20))
  test = readers.read_split("twitter2017", "test", data_dir)
  for r, example in zip(rows, test):  # our span reader as the oracle of seqeval's entities
    gold, pred = (set(labels.bio_spans(tags)) for tags in (example.tags, r["pred"]))
    assert (r["num_correct"], r["num_pred"], r["num_gold"]) == (len(gold & pred), len(pred),
                                                               len(gold))
  assert sum(r["num_gold"] for r in rows) > 0
  correct, pred, gold = (sum(r[k] for r in rows) for k in ("num_correct", "num_pred", "num_gold"))
  f1 = 2 * correct / (pred + gold) if pred + gold else 0.0
  assert f1 == pytest.approx(results["test"]["f1"])
