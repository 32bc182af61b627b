"""A context file written by experiments/generate_contexts.py trains through
experiments/train_mnre.py with `--config.contexts=<that file>`.

The MNRE subset holds every instance of the 12 real MNRE images (train, dev and test); the
chat-completions server of fake_chat_server.py describes them. What reached the model is read
back through the run's own data pipelines and compared, row by row, with the context the server
derives from each example's image bytes, tokenized by transformers' tokenizer.
"""

import ast
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

import fake_chat_server as fake
from shapca_jax import train
from shapca_jax.data.errors import DataFormatError
import train_fixtures

REPO = pathlib.Path(__file__).resolve().parents[1]
GENERATE = REPO / "experiments" / "generate_contexts.py"
TRAIN_MNRE = REPO / "experiments" / "train_mnre.py"
MNRE_SPLIT_FILES = {"train": "ours_train.txt", "valid": "ours_val.txt", "test": "ours_test.txt"}
# Tiny enough for seconds on a CPU; every example of the subset fits the one 64-token bucket.
TRAIN_FLAGS = {"batch_size": 2, "eval_batch_size": 8, "num_epochs": 1, "max_steps": 2,
               "max_length": 64, "proj_dim": 16, "pair_dim": 16, "fusion.num_heads": 2,
               "align.num_permutations": 4, "checkpoint_every_steps": 2, "progress_bar": False}


@pytest.fixture(scope="module")
def image_bytes(shared_data_dir):
  return {p.name: p.read_bytes() for p in (shared_data_dir / "mnre" / "images").glob("*/*.jpg")}


@pytest.fixture(scope="module")
def subset(tmp_path_factory, shared_data_dir, minilm_dir):
  """The MNRE subset of the real images and the tiny BERT."""
  root = tmp_path_factory.mktemp("contextgen_training")
  data_dir = train_fixtures.write_mnre_with_images(shared_data_dir, root / "data")
  encoder_dir = train_fixtures.write_tiny_bert(root / "bert", minilm_dir)
  return data_dir, encoder_dir


@pytest.fixture(scope="module")
def generated(subset, image_bytes, tmp_path_factory):
  """The contexts JSONL written by the command line's `main` from the fake server's answers."""
  spec = importlib.util.spec_from_file_location("generate_contexts", GENERATE)
  generate_contexts = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(generate_contexts)
  out = tmp_path_factory.mktemp("contexts") / "mnre_llava.jsonl"
  with pytest.MonkeyPatch.context() as monkeypatch:
    fake.isolate_env(monkeypatch)
    with fake.ChatServer(image_bytes, fake.PROMPT) as server:
      status = generate_contexts.main([
          "--images", str(subset[0] / "mnre" / "images"), "--out", str(out),
          "--base_url", server.url, "--model", fake.MODEL, "--api_key_env", fake.KEY_ENV,
          "--prompt", fake.PROMPT, "--timeout_s", "5", "--no_progress"])
  assert status == 0
  return out


def raw_instances(data_dir: pathlib.Path, split: str) -> list[dict]:
  lines = (data_dir / "mnre" / MNRE_SPLIT_FILES[split]).read_text().splitlines()
  return [ast.literal_eval(line) for line in lines]


def test_subset_uses_only_the_real_images_in_every_split(subset, image_bytes):
  for split in MNRE_SPLIT_FILES:
    instances = raw_instances(subset[0], split)
    assert instances and {i["img_id"] for i in instances} <= set(image_bytes)


def run_train_mnre(workdir: pathlib.Path, contexts: pathlib.Path, data_dir: pathlib.Path,
                   encoder_dir: pathlib.Path) -> subprocess.CompletedProcess:
  flags = {"contexts": contexts, "data_dir": data_dir, "text_encoder": encoder_dir, **TRAIN_FLAGS}
  python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
  env = {**os.environ, "PYTHONPATH": python_path}
  return subprocess.run(
      [sys.executable, str(TRAIN_MNRE), "--workdir", str(workdir),
       *(f"--config.{key}={value}" for key, value in flags.items())],
      env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_generated_contexts_train_through_train_mnre(subset, generated, image_bytes,
                                                     hf_tokenizer, tmp_path):
  data_dir, encoder_dir = subset
  workdir = tmp_path / "run"
  run = run_train_mnre(workdir, generated, data_dir, encoder_dir)
  assert run.returncode == 0, run.stderr[-3000:]

  summary = json.loads(run.stdout.strip().splitlines()[-1])
  results = json.loads((workdir / train.RESULTS_FILE).read_text())
  assert summary["test"]["f1"] == round(results["test"]["f1"], 4)
  assert results["config"]["contexts"] == str(generated)
  assert results["steps"] == 2
  assert results["test"]["num_gold"] == sum(
      i["relation"] != "None" for i in raw_instances(data_dir, "test"))

  # The run's own pipelines over the records it prepared: every row's context is the generated
  # one, whole.
  data = train.build_data(ml_collections.ConfigDict(results["config"]), workdir)
  for split in MNRE_SPLIT_FILES:
    pipeline = getattr(data, split)
    seen = []
    for index in range(pipeline.report.batches_per_epoch):
      batch = pipeline.batch(index)
      for row in np.flatnonzero(batch["valid"]):
        image_id = pipeline.examples[int(batch["example_index"][row])].image_id
        expected = hf_tokenizer(fake.expected_context(image_bytes[image_id]),
                                add_special_tokens=False)["input_ids"]
        context_ids = batch["input_ids"][row][batch["context_mask"][row]]
        assert context_ids.tolist() == expected, (split, image_id)
        seen.append(image_id)
    expected_ids = [i["img_id"] for i in raw_instances(data_dir, split)]
    if split == "train":  # batches drop the remainder: 5 instances, batches of 2
      assert len(seen) == 4 and set(seen) <= set(expected_ids)
    else:
      assert sorted(seen) == sorted(expected_ids)


def rewrite_jsonl(source: pathlib.Path, target: pathlib.Path, drop: str | None = None,
                  add: str | None = None) -> pathlib.Path:
  records = [json.loads(line) for line in source.read_text().splitlines()]
  records = [r for r in records if r["image_id"] != drop]
  if add:
    records.append({**records[0], "image_id": add})
  target.write_text("".join(json.dumps(r) + "\n" for r in records))
  return target


def tiny_mre_config(subset, contexts: pathlib.Path) -> ml_collections.ConfigDict:
  config = train_fixtures.tiny_config(*subset, task="mre")
  config.contexts = str(contexts)
  return config


def test_image_without_generated_context_names_the_file_and_the_image(subset, generated,
                                                                      tmp_path):
  instances = raw_instances(subset[0], "train")
  dropped = instances[0]["img_id"]
  without = sum(i["img_id"] == dropped for i in instances)
  broken = rewrite_jsonl(generated, tmp_path / "without_one.jsonl", drop=dropped)
  with pytest.raises(DataFormatError) as error:
    train.train_and_evaluate(tiny_mre_config(subset, broken), tmp_path / "run")
  message = str(error.value)
  assert str(broken) in message and f"(image {dropped})" in message
  assert f"{without} of {len(instances)} examples have no context" in message


def test_generated_id_of_no_image_names_the_file_and_the_id(subset, generated, tmp_path):
  broken = rewrite_jsonl(generated, tmp_path / "stranger.jsonl", add="not_an_mnre_image.jpg")
  with pytest.raises(DataFormatError) as error:
    train.train_and_evaluate(tiny_mre_config(subset, broken), tmp_path / "run")
  message = str(error.value)
  assert str(broken) in message and "'not_an_mnre_image'" in message
  assert "match no image of the data set" in message
