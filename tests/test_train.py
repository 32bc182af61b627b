"""End-to-end training on tiny data: train, evaluate, checkpoint, kill, resume, same numbers,
for MNER (Twitter-2017), MRE (MNRE) and MJERE (JMERE)."""

import ast
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import chex
import jax
import ml_collections
import numpy as np
import pytest
import safetensors.numpy
from tensorboard.backend.event_processing import event_accumulator

from shapca_jax import checkpoint
from shapca_jax import train
from shapca_jax.config import ConfigError
import train_fixtures

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, minilm_dir, embedded_data_dir):
  root = tmp_path_factory.mktemp("tiny")
  data_dir = train_fixtures.write_tiny_twitter(embedded_data_dir, root / "data", per_split=20)
  encoder = train_fixtures.write_tiny_bert(root / "bert", minilm_dir)
  return data_dir, encoder


@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory):
  config = train_fixtures.tiny_config(*tiny)
  workdir = tmp_path_factory.mktemp("uninterrupted")
  return config, workdir, train.train_and_evaluate(config, workdir)


def _losses(workdir: pathlib.Path) -> dict[int, float]:
  """Loss per step from the metrics log, which holds every step once, resumed or not."""
  records = [json.loads(line) for line in (workdir / train.METRICS_LOG).read_text().splitlines()]
  steps = [r["step"] for r in records if "loss" in r]
  assert len(steps) == len(set(steps)), f"steps logged twice: {steps}"
  return {r["step"]: r["loss"] for r in records if "loss" in r}


def _jsonl_scalars(workdir: pathlib.Path) -> dict[str, dict[int, float]]:
  """{key: {step: value}} of every number in the metrics log, nested keys joined with "/"; a
  resumed run's replayed steps overwrite the killed ones."""
  scalars = {}

  def visit(prefix, step, record):
    for key, value in record.items():
      if isinstance(value, dict):
        visit(f"{prefix}{key}/", step, value)
      elif key != "step":
        scalars.setdefault(f"{prefix}{key}", {})[step] = value

  for line in (workdir / train.METRICS_LOG).read_text().splitlines():
    record = json.loads(line)
    visit("", record["step"], record)
  return scalars


def _tensorboard_scalars(workdir: pathlib.Path) -> dict[str, dict[int, float]]:
  """{tag: {step: value}} as TensorBoard loads the run's event files."""
  loaded = event_accumulator.EventAccumulator(str(workdir),
                                              size_guidance={event_accumulator.SCALARS: 0})
  loaded.Reload()
  return {tag: {e.step: e.value for e in loaded.Scalars(tag)} for tag in loaded.Tags()["scalars"]}


def _assert_same_curves(got: dict, expected: dict):
  assert sorted(got) == sorted(expected)
  for tag, points in expected.items():
    assert sorted(got[tag]) == sorted(points), tag
    np.testing.assert_allclose([got[tag][s] for s in sorted(points)],
                               [points[s] for s in sorted(points)], rtol=1e-6, err_msg=tag)


def test_run_trains_evaluates_and_writes_results(uninterrupted):
  config, workdir, results = uninterrupted
  written = json.loads((workdir / train.RESULTS_FILE).read_text())
  assert written["test"]["f1"] == results["test"]["f1"]
  assert 0.0 <= results["test"]["f1"] <= 1.0
  assert results["test"]["num_gold"] > 0  # every gold entity of the 20 test tweets is counted
  assert results["steps"] == 10  # 20 tweets / batch 4 = 5 steps per epoch, 2 epochs
  losses = _losses(workdir)
  assert sorted(losses) == list(range(1, 11))
  assert all(np.isfinite(v) for v in losses.values())
  assert (workdir / "checkpoints" / "best").is_dir()
  # Two evaluations and checkpoint writes happened outside the timed steps.
  assert set(results["seconds_outside_steps"]) == {"checkpoint", "evaluation", "diagnostics"}
  assert all(t > 0 for t in results["seconds_outside_steps"].values())
  assert results["compile_seconds"] > 0
  # TensorBoard reads every number of the metrics log (float32 in the event file).
  expected = _jsonl_scalars(workdir)
  assert {"loss", "task_loss", "align_loss", "grad_norm", "learning_rate/encoder",
          "learning_rate/new", "learning_rate/crf", "epoch", "dev/f1"} <= set(expected)
  assert sorted(expected["dev/f1"]) == [5, 10]
  _assert_same_curves(_tensorboard_scalars(workdir), expected)


def _diagnostics(workdir: pathlib.Path) -> dict[int, dict]:
  """The alignment diagnostics per step of the metrics log."""
  out = {}
  for line in (workdir / train.METRICS_LOG).read_text().splitlines():
    record = json.loads(line)
    if "align_grad_share" in record:
      out[record["step"]] = {k: v for k, v in record.items() if k.endswith(
          ("_top1", "_phi_margin", "_shapley_infonce_grad_cos", "align_grad_share"))}
  return out


def test_alignment_diagnostics_at_log_and_evaluation_steps_only(uninterrupted):
  _, workdir, results = uninterrupted
  logged = _diagnostics(workdir)
  # log_every_steps=2 and an evaluation after each epoch of 5 steps.
  assert sorted(logged) == [2, 4, 5, 6, 8, 10]
  assert set(logged[2]) == {"align_grad_share", "c2t_top1", "t2c_top1", "c2t_phi_margin",
                            "t2c_phi_margin", "c2t_shapley_infonce_grad_cos",
                            "t2c_shapley_infonce_grad_cos"}
  for values in logged.values():
    assert 0 < values["align_grad_share"] < 1
    assert all(0 <= values[f"{d}_top1"] <= 1 for d in ("c2t", "t2c"))
  summary = results["alignment"]
  assert summary["last_step"] == logged[10]
  assert summary["last_epoch_log_steps"] == 3
  for key, value in summary["last_epoch_mean"].items():
    np.testing.assert_allclose(value, np.mean([logged[s][key] for s in (6, 8, 10)]))
  assert summary["at_evaluations"] == {"5": logged[5], "10": logged[10]}


def test_compile_per_bucket_runs_the_shapes_it_was_given_and_refuses_others():
  chex.clear_trace_counter()
  step = jax.jit(chex.assert_max_traces(
      lambda total, batch, scale: total + scale * batch["x"].sum(), n=2))
  batches = [{"x": np.ones((4, 2), np.float32)}, {"x": np.ones((4, 8), np.float32)}]
  compiled = train.compile_per_bucket(step, np.float32(0), batches, np.float32(2))
  total, expected = np.float32(0), 0.0
  rng = np.random.default_rng(0)
  for width in (2, 8, 8, 2, 8):  # more calls than traces: chex fails on a third trace
    x = rng.normal(size=(4, width)).astype(np.float32)
    total = compiled(total, {"x": x}, np.float32(2))
    expected += 2 * x.sum(dtype=np.float64)
  np.testing.assert_allclose(float(total), expected, rtol=1e-5)
  with pytest.raises(RuntimeError, match=r"a batch of \{x: float32\[4, 3\]\}, only for "
                                         r"\{x: float32\[4, 2\]\}, \{x: float32\[4, 8\]\}"):
    compiled(total, {"x": np.ones((4, 3), np.float32)}, np.float32(2))
  with pytest.raises(RuntimeError, match=r"\{x: int32\[4, 2\]\}"):
    compiled(total, {"x": np.ones((4, 2), np.int32)}, np.float32(2))


def test_warm_up_calls_each_shape_once_and_leaves_the_donated_state_as_it_was():
  calls = []

  def record(state, batch):
    jax.debug.callback(lambda width: calls.append(int(width)), batch["x"].shape[1])
    return jax.tree.map(lambda x: x + batch["x"].sum(), state)

  step = jax.jit(record, donate_argnums=0)
  state = {"w": jax.numpy.arange(3.0), "b": jax.numpy.ones(())}
  batches = [{"x": np.ones((4, 2), np.float32)}, {"x": np.ones((4, 8), np.float32)}]
  compiled = train.compile_per_bucket(step, state, batches)
  assert calls == []  # compiling runs nothing
  train.warm_up(compiled, state, batches)
  jax.effects_barrier()
  assert calls == [2, 8]  # each executable ran once
  np.testing.assert_array_equal(state["w"], [0.0, 1.0, 2.0])  # still readable: not donated
  np.testing.assert_array_equal(compiled(state, batches[0])["b"], 9.0)


def test_run_killed_on_four_devices_resumes_on_one_to_the_same_numbers(tiny, uninterrupted,
                                                                       tmp_path):
  # The killed run splits batches and params over data 2 x fsdp 2 devices: its checkpoints
  # restore onto the single device of this process (the mesh may change on resume).
  config, reference_dir, reference = uninterrupted
  on_four = ml_collections.ConfigDict(config.to_dict())
  on_four.mesh.data, on_four.mesh.fsdp = 2, 2
  workdir = tmp_path / "killed"
  script = (
      "import json, sys\n"
      "import ml_collections\n"
      "from shapca_jax import train\n"
      "config = ml_collections.ConfigDict(json.loads(sys.argv[1]))\n"
      "train.train_and_evaluate(config, sys.argv[2])\n")
  env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  proc = subprocess.Popen([sys.executable, "-c", script, on_four.to_json(), str(workdir)], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  checkpoint_6 = workdir / "checkpoints" / "latest" / "6"
  deadline = time.time() + 300
  while not checkpoint_6.is_dir() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  _, stderr = proc.communicate()
  assert checkpoint_6.is_dir(), f"the run never reached step 6: {stderr.decode()[-2000:]}"
  assert not (workdir / train.RESULTS_FILE).exists(), "the run finished before it was killed"

  resumed = train.train_and_evaluate(config, workdir)
  assert resumed["best_step"] == reference["best_step"]
  for split in ("dev", "test"):
    for key in ("precision", "recall", "f1"):
      assert resumed[split][key] == pytest.approx(reference[split][key], abs=1e-9)
  ref_losses, losses = _losses(reference_dir), _losses(workdir)
  assert sorted(losses) == sorted(ref_losses)
  np.testing.assert_allclose([losses[s] for s in sorted(losses)],
                             [ref_losses[s] for s in sorted(ref_losses)], rtol=1e-5)
  # Two event files, one point per step: the resume dropped what the killed run wrote after
  # its checkpoint.
  assert len(list(workdir.glob("events.out.tfevents.*"))) == 2
  _assert_same_curves(_tensorboard_scalars(workdir), _jsonl_scalars(workdir))


def test_bad_config_fails_before_any_work(tiny, tmp_path):
  config = train_fixtures.tiny_config(*tiny)
  config.learning_rate.encoder = -1.0
  with pytest.raises(ConfigError, match="learning_rate.encoder"):
    train.train_and_evaluate(config, tmp_path / "bad")
  assert not (tmp_path / "bad").exists()


# ----------------------------------------------------------------------------- MRE and MJERE


@pytest.fixture(scope="module")
def tiny_relations(tiny, tmp_path_factory, shared_data_dir):
  """Tiny MNRE + JMERE subsets and the tiny BERT of ``tiny``."""
  root = tmp_path_factory.mktemp("tiny_relations")
  return train_fixtures.write_tiny_relations(shared_data_dir, root / "data", per_split=16), tiny[1]


def _relation_config(tiny_relations, task):
  config = train_fixtures.tiny_config(*tiny_relations, task=task)
  config.num_epochs = 1
  config.checkpoint_every_steps = 2
  return config


def _gold_counts(data_dir: pathlib.Path, task: str, split_file: str) -> int:
  """Gold items of a raw split file, read here: non-None MNRE instances or JMERE quintuples."""
  if task == "mre":
    lines = (data_dir / "mnre" / f"ours_{split_file}.txt").read_text().splitlines()
    return sum(ast.literal_eval(line)["relation"] != "None" for line in lines)
  samples = json.loads((data_dir / "jmere" / f"{split_file}.json").read_text())
  return sum(len(group) for s in samples for group in s["label_list"])


class _Interrupted(Exception):
  pass


def _interrupted_then_resumed(config, workdir: pathlib.Path, monkeypatch) -> dict:
  """A run that dies right after its step-2 checkpoint, then is started again in ``workdir``."""
  save_latest = checkpoint.TrainCheckpointer.save_latest

  def save_then_die(self, step, *args, **kwargs):
    save_latest(self, step, *args, **kwargs)
    if step == 2:
      raise _Interrupted

  with monkeypatch.context() as patch:
    patch.setattr(checkpoint.TrainCheckpointer, "save_latest", save_then_die)
    with pytest.raises(_Interrupted):
      train.train_and_evaluate(config, workdir)
  assert not (workdir / train.RESULTS_FILE).exists()
  assert sorted(_losses(workdir)) == [1, 2]
  return train.train_and_evaluate(config, workdir)


def _check_results(results: dict, workdir: pathlib.Path, data_dir: pathlib.Path, task: str):
  assert results["task"] == task
  assert results["dev"]["num_gold"] == _gold_counts(data_dir, task, "val")
  assert results["test"]["num_gold"] == _gold_counts(data_dir, task, "test")
  assert 0.0 <= results["test"]["f1"] <= 1.0
  assert results["steps"] >= 3
  assert sorted(_losses(workdir)) == list(range(1, results["steps"] + 1))
  assert all(np.isfinite(v) for v in _losses(workdir).values())


@pytest.mark.slow
def test_mre_trains_evaluates_and_resumes(tiny_relations, tmp_path, monkeypatch):
  # Resumed numbers equal uninterrupted ones for MNER and MJERE; the loop is the same here.
  config = _relation_config(tiny_relations, "mre")
  results = _interrupted_then_resumed(config, tmp_path / "run", monkeypatch)
  _check_results(results, tmp_path / "run", tiny_relations[0], "mre")


@pytest.mark.slow
def test_mjere_trains_evaluates_and_resumes_to_the_same_numbers(tiny_relations, tmp_path,
                                                                 monkeypatch):
  config = _relation_config(tiny_relations, "mjere")
  reference = train.train_and_evaluate(config, tmp_path / "reference")
  _check_results(reference, tmp_path / "reference", tiny_relations[0], "mjere")
  assert set(reference["test"]["entity"]) >= {"precision", "recall", "f1", "per_type"}
  # The gold grids of these short sentences decode to (nearly) every gold quintuple.
  assert reference["gold_grid_ceiling"]["test"]["f1"] > 0.8

  resumed = _interrupted_then_resumed(config, tmp_path / "interrupted", monkeypatch)
  assert resumed["best_step"] == reference["best_step"]
  for split in ("dev", "test"):
    assert resumed[split] == reference[split]
  reference_losses, losses = _losses(tmp_path / "reference"), _losses(tmp_path / "interrupted")
  assert sorted(losses) == sorted(reference_losses)
  np.testing.assert_allclose([losses[s] for s in sorted(losses)],
                             [reference_losses[s] for s in sorted(losses)], rtol=1e-5)


def test_mre_markers_get_new_embedding_rows(tiny_relations):
  config = _relation_config(tiny_relations, "mre")
  encoder_dir = pathlib.Path(config.text_encoder)
  vocab_size = train_fixtures.TINY_BERT["vocab_size"] + 4
  model, pretrained = train.build_model(config, vocab_size)
  table = np.asarray(pretrained["text_encoder"]["embeddings"]["word_embeddings"]["embedding"])
  stored = safetensors.numpy.load_file(encoder_dir / "model.safetensors")
  old = next(v for k, v in stored.items() if k.endswith("word_embeddings.weight"))
  assert model.text_config.vocab_size == vocab_size and table.shape == (vocab_size, old.shape[1])
  np.testing.assert_array_equal(table[:len(old)], old)
  new = table[len(old):]
  assert np.all(np.isfinite(new)) and len({row.tobytes() for row in new}) == 4
  with pytest.raises(ValueError, match="entity markers"):
    train.build_model(config, vocab_size - 4)


@pytest.mark.parametrize("steps_per_epoch,evals_per_epoch,total_steps", [
    (5, 1, 10), (5, 2, 10), (210, 2, 2100), (7, 3, 17), (4, 4, 9), (3, 5, 6)])
def test_eval_steps_are_evenly_spaced_points_of_each_epoch_and_the_last_step(
    steps_per_epoch, evals_per_epoch, total_steps):
  expected = set()
  for step in range(1, total_steps + 1):  # brute force: the step ends a 1/evals fraction
    into_epoch = (step - 1) % steps_per_epoch + 1
    if any(into_epoch == round(steps_per_epoch * i / evals_per_epoch)
           for i in range(1, evals_per_epoch + 1)) or step == total_steps:
      expected.add(step)
  assert train.eval_steps(steps_per_epoch, evals_per_epoch, total_steps) == sorted(expected)


def test_test_predictions_file_rescores_to_the_reported_test_scores(uninterrupted, tiny):
  import gzip
  import seqeval.metrics
  from shapca_jax.data import readers
  _, workdir, results = uninterrupted
  data_dir, _ = tiny
  records = [json.loads(line) for line in
             gzip.open(workdir / train.TEST_PREDICTIONS_FILE, "rt").read().splitlines()]
  gold = [list(e.tags) for e in readers.read_conll(data_dir / "twitter2017" / "test.txt")]
  assert [r["index"] for r in records] == list(range(len(gold)))
  pred = [r["pred"] + ["O"] * (len(g) - len(r["pred"])) for r, g in zip(records, gold)]
  assert results["test"]["f1"] == pytest.approx(seqeval.metrics.f1_score(gold, pred), abs=1e-9)
  for key in ("num_correct", "num_pred", "num_gold"):
    assert sum(r[key] for r in records) == results["test"][key]


def test_early_stop_ends_after_patience_evaluations_without_a_new_best(tiny, tmp_path):
  config = train_fixtures.tiny_config(*tiny)
  config.num_epochs, config.evals_per_epoch, config.early_stop_patience = 4, 2, 1
  config.learning_rate.encoder = config.learning_rate.new = config.learning_rate.crf = 1e-12
  results = train.train_and_evaluate(config, tmp_path)  # a frozen model never improves
  dev_steps = [json.loads(line)["step"] for line in
               (tmp_path / train.METRICS_LOG).read_text().splitlines() if "dev" in line]
  assert dev_steps == [2, 5]  # 5 steps per epoch: evaluations at 2 (the best) and 5, then stop
  assert results["best_step"] == 2 and results["last_step"] == 5 and results["steps"] == 20
  again = train.train_and_evaluate(config, tmp_path)  # a rerun trains no further
  assert again["last_step"] == 5 and again["test"]["f1"] == results["test"]["f1"]


def test_stop_after_epochs_trains_part_of_the_schedule_and_resumes_to_a_later_stop(tiny,
                                                                                   tmp_path):
  config = train_fixtures.tiny_config(*tiny)
  config.num_epochs = 4
  train.train_and_evaluate(config, tmp_path / "whole")  # the oracle: the whole schedule
  whole = _losses(tmp_path / "whole")
  config.stop_after_epochs = 2
  part = train.train_and_evaluate(config, tmp_path / "part")
  assert part["last_step"] == 10 and part["steps"] == 20
  assert _losses(tmp_path / "part") == {s: whole[s] for s in range(1, 11)}
  config.stop_after_epochs = 3  # a stopping key: the run resumes instead of refusing
  more = train.train_and_evaluate(config, tmp_path / "part")
  assert more["last_step"] == 15
  assert _losses(tmp_path / "part") == {s: whole[s] for s in range(1, 16)}


@pytest.mark.slow
@pytest.mark.parametrize("task", ["mner", "mre", "mjere"])
def test_separate_views_train_and_evaluate(task, request, tmp_path):
  if task == "mner":
    config = train_fixtures.tiny_config(*request.getfixturevalue("tiny"))
    config.num_epochs = 1
  else:
    config = _relation_config(request.getfixturevalue("tiny_relations"), task)
  config.align.views = "separate"
  results = train.train_and_evaluate(config, tmp_path / "run")
  assert results["config"]["align"]["views"] == "separate"
  assert 0.0 <= results["test"]["f1"] <= 1.0 and 0.0 <= results["dev"]["f1"] <= 1.0
  assert all(np.isfinite(v) for v in _losses(tmp_path / "run").values())
  last = results["alignment"]["last_step"]
  assert 0 < last["align_grad_share"] < 1 and 0 <= last["c2t_top1"] <= 1
