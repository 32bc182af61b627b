"""Event files read back by TensorBoard's own loader: the tags, steps and values written, and one
point per step after a resume."""

import time

import numpy as np
from tensorboard.backend.event_processing import event_accumulator

from shapca_jax import summary_writer


def _scalars(logdir) -> dict[str, dict[int, float]]:
  """{tag: {step: value}} as TensorBoard loads the event files of ``logdir``."""
  loaded = event_accumulator.EventAccumulator(
      str(logdir), size_guidance={event_accumulator.SCALARS: 0})  # 0: keep every point
  loaded.Reload()
  return {tag: {e.step: e.value for e in loaded.Scalars(tag)} for tag in loaded.Tags()["scalars"]}


def test_nested_records_read_back_under_slash_joined_tags(tmp_path):
  rng = np.random.default_rng(0)
  records = {step: {"loss": float(rng.normal()), "c2t": np.float32(rng.normal()),
                    "learning_rate": {"encoder": 3e-5 * step, "new": 1e-3 * step},
                    "note": "not a number"}
             for step in (1, 2, 5)}
  with summary_writer.SummaryWriter(tmp_path) as writer:
    for step, record in records.items():
      writer.scalars(step, record)
    writer.scalars(5, {"epoch": 1.0, "dev": {"f1": 0.25, "precision": 0.5}})

  got = _scalars(tmp_path)
  assert set(got) == {"loss", "c2t", "learning_rate/encoder", "learning_rate/new", "epoch",
                      "dev/f1", "dev/precision"}
  for step, record in records.items():  # event files hold float32
    np.testing.assert_allclose(got["loss"][step], record["loss"], rtol=1e-6)
    np.testing.assert_allclose(got["c2t"][step], record["c2t"], rtol=1e-6)
    np.testing.assert_allclose(got["learning_rate/encoder"][step], 3e-5 * step, rtol=1e-6)
  assert sorted(got["loss"]) == [1, 2, 5]
  assert got["dev/f1"] == {5: 0.25} and got["epoch"] == {5: 1.0}


def test_a_resume_replaces_the_steps_after_its_checkpoint(tmp_path):
  with summary_writer.SummaryWriter(tmp_path) as killed:
    for step in range(1, 8):
      killed.scalars(step, {"loss": float(step)})
    killed.scalars(6, {"dev": {"f1": 0.6}})
  with summary_writer.SummaryWriter(tmp_path) as writer:
    writer.resumed(4)
    for step in range(5, 9):
      writer.scalars(step, {"loss": 10.0 * step})

  got = _scalars(tmp_path)
  assert got["loss"] == {1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0, 5: 50.0, 6: 60.0, 7: 70.0, 8: 80.0}
  assert not got.get("dev/f1")  # the killed run's evaluation after step 4 is gone


def test_a_disabled_writer_writes_no_file(tmp_path):
  with summary_writer.SummaryWriter(tmp_path / "run", enabled=False) as writer:
    writer.resumed(3)
    writer.scalars(1, {"loss": 1.0})
  assert not (tmp_path / "run").exists()


def _wait_for(logdir, tag: str, steps: int) -> dict[int, float]:
  deadline = time.monotonic() + 10
  while len(got := _scalars(logdir).get(tag, {})) < steps and time.monotonic() < deadline:
    time.sleep(0.05)
  return got


def test_a_watching_tensorboard_sees_the_points_before_the_run_ends(tmp_path):
  with summary_writer.SummaryWriter(tmp_path) as writer:
    for step in (1, 2, 3):
      writer.scalars(step, {"loss": float(step)})
    assert _wait_for(tmp_path, "loss", 3) == {1: 1.0, 2: 2.0, 3: 3.0}
