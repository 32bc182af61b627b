"""`python -m shapca_jax.data inspect` and the statistics behind it, against the raw files."""

import ast
import collections
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from seqeval.metrics.sequence_labeling import get_entities

from shapca_jax.data import readers, summary
from shapca_jax.data.__main__ import main

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_inspect_command_on_the_embedded_data(minilm_dir):
  # Exactly what `make run` calls, from the repository root.
  result = subprocess.run(
      [sys.executable, "-m", "shapca_jax.data", "inspect", "twitter2017", "--data_dir", "data"],
      cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr
  report = json.loads(result.stdout)  # one JSON object, nothing else on stdout
  raw = {}
  for split in ("train", "valid", "test"):
    blocks = (REPO / "data" / "twitter2017" / f"{split}.txt").read_text().strip().split("\n\n")
    raw[split] = [[line.split("\t") for line in b.split("\n")[1:]] for b in blocks]
  counts = {s: (v["examples"], v["entities"]) for s, v in report["splits"].items()}
  assert counts == {"train": (3373, 6049), "valid": (723, 1324), "test": (723, 1351)}
  for split, tweets in raw.items():
    entities = collections.Counter(kind for t in tweets
                                   for kind, _, _ in get_entities([tag for _, tag in t]))
    assert report["splits"][split]["labels"]["entity_types"] == dict(sorted(entities.items()))
    blip2 = report["splits"][split]["contexts"]["blip2"]
    assert (blip2["coverage"], blip2["missing"]) == (1.0, 0)
  assert report["context_sources"] == ["blip2"]
  assert report["tokenizer"] == str(minilm_dir)
  # Token lengths: percentiles of the transformers tokenizer's piece counts.
  transformers = pytest.importorskip("transformers")
  hf = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
  lengths = [sum(len(hf.tokenize(word) or ["[UNK]"]) for word, _ in tweet) for tweet in raw["test"]]
  got = report["splits"]["test"]["text_tokens"]
  np.testing.assert_allclose([got[k] for k in ("p50", "p90", "p95", "p99", "max")],
                             np.percentile(lengths, [50, 90, 95, 99, 100]), atol=0.05)


def test_mnre_relation_counts_are_the_raw_ones(shared_data_dir):
  for split, name in (("train", "train"), ("valid", "val"), ("test", "test")):
    lines = (shared_data_dir / "mnre" / f"ours_{name}.txt").read_text().splitlines()
    relations = collections.Counter(ast.literal_eval(line)["relation"] for line in lines)
    got = summary.split_summary(readers.read_split("mnre", split, shared_data_dir), "mre")
    assert got["labels"]["relations"] == dict(sorted(relations.items()))
    assert got["relation_instances"] == len(lines)
    assert got["relation_instances_not_none"] == len(lines) - relations["None"]


def test_jmere_quintuples_and_grid_conflicts(shared_data_dir):
  counts = []
  for split in ("train", "valid", "test"):
    got = summary.split_summary(readers.read_split("jmere", split, shared_data_dir), "jmere")
    counts.append((got["examples"], got["quintuples"]))
    assert sum(got["labels"]["relations"].values()) == got["quintuples"]
  assert counts == [(3618, 4503), (496, 624), (475, 640)]
  assert got["grid_conflict_examples"] == 2  # test items with nested spans


def test_inspect_reports_missing_contexts_or_stops_on_them(tmp_path, capsys):
  (tmp_path / "twitter2017" / "contexts").mkdir(parents=True)
  (tmp_path / "twitter2017" / "train.txt").write_text("IMGID:1\nA\tO\n\nIMGID:2\nB\tB-PER\n")
  (tmp_path / "twitter2017" / "contexts" / "blip2.txt").write_text("1.jpg :a dog\r\n")
  args = ["inspect", "twitter2017", "--data_dir", str(tmp_path)]
  assert main(args) == 0
  blip2 = json.loads(capsys.readouterr().out)["splits"]["train"]["contexts"]["blip2"]
  assert (blip2["missing"], blip2["coverage"], blip2["crlf_lines"]) == (1, 0.5, 1)
  assert main(args + ["--missing_context", "error"]) == 2
  assert "1 of 2 examples have no context" in capsys.readouterr().err


def test_inspect_names_a_missing_data_folder(tmp_path, capsys):
  (tmp_path / "twitter2017").mkdir()
  (tmp_path / "twitter2017" / "train.txt").write_text("IMGID:1\nA\tO\n")
  assert main(["inspect", "twitter2017", "--data_dir", str(tmp_path), "--contexts", "blip2"]) == 2
  expected = f"{tmp_path}/twitter2017/contexts/blip2.txt: cannot read the file"
  assert expected in capsys.readouterr().err
