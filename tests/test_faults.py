"""Fault injection on a tiny run: SIGKILL inside and around its latest and best checkpoint
writes, a full disk, and a damaged latest step. Every rerun in the same workdir must end with
the numbers of an uninterrupted run, and the metrics log must hold every step once.

The runs are subprocesses (tests/fault_worker.py) sharing one JAX compilation cache, so only
the first one compiles.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import train_fixtures

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = REPO_ROOT / "tests" / "fault_worker.py"
STEPS = 6  # 12 tweets / batch 4 = 3 steps per epoch, 2 epochs; evaluations at 3 and 6
SAVE_EVERY = 2  # latest checkpoints at 2, 4, 6


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, minilm_dir, embedded_data_dir):
  """The config, the environment of the runs and an uninterrupted run's workdir."""
  root = tmp_path_factory.mktemp("faults")
  data_dir = train_fixtures.write_tiny_twitter(embedded_data_dir, root / "data", per_split=12)
  config = train_fixtures.tiny_config(data_dir,
                                      train_fixtures.write_tiny_bert(root / "bert", minilm_dir))
  config.checkpoint_every_steps = SAVE_EVERY
  config.align.kind = "none"  # the fault handling is the same; one cheaper step to compile
  env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "JAX_PLATFORMS": "cpu",
         "JAX_COMPILATION_CACHE_DIR": str(root / "jax_cache"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
         "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
  env.pop("SHAPCA_DEBUG", None)
  reference = root / "reference"
  result = _run(config, env, reference, "none")
  assert result.returncode == 0, result.stderr[-3000:]
  return config, env, reference


def _run(config, env, workdir: pathlib.Path, fault: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, str(WORKER), config.to_json(), str(workdir), fault],
                        env=env, capture_output=True, text=True, timeout=900)


def _log(workdir: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _latest_steps(workdir: pathlib.Path) -> list[int]:
  folder = workdir / "checkpoints" / "latest"
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def _cut_short(step_dir: pathlib.Path) -> None:
  """Truncates the largest array file of a checkpoint step to half its size."""
  biggest = max((p for p in (step_dir / "state").rglob("*") if p.is_file()),
                key=lambda p: p.stat().st_size)
  biggest.write_bytes(biggest.read_bytes()[:biggest.stat().st_size // 2])


def test_every_fault_then_a_rerun_ends_with_the_uninterrupted_numbers(tiny_run, tmp_path):
  config, env, reference_dir = tiny_run
  reference = json.loads((reference_dir / "results.json").read_text())
  # The final evaluation beats the first, so the run writes a best checkpoint at its last step.
  assert reference["best_step"] == STEPS
  workdir = tmp_path / "run"

  # SIGKILL inside the first best write (step 3): the rerun resumes from step 2.
  killed = _run(config, env, workdir, "best:3:write")
  assert killed.returncode == -9, killed.stderr[-3000:]

  # A full disk at the step-4 checkpoint: the run stops there with one line, step 2 kept.
  full = _run(config, env, workdir, "full:latest:4")
  assert full.returncode == 2, full.stderr[-3000:]
  last_line = full.stderr.strip().splitlines()[-1]
  assert last_line.startswith("error: could not write the checkpoint of step 4 to "
                              f"{workdir.resolve() / 'checkpoints' / 'latest'}")
  assert "No space left on device" in last_line
  assert "Traceback" not in full.stderr
  assert _latest_steps(workdir) == [2]

  # SIGKILL inside the latest write of step 4, 0.3 s after it began, and inside the best write
  # of the last step; each run resumes what the one before left.
  for fault in ("latest:4:write", "latest:4:0.3", f"best:{STEPS}:write"):
    killed = _run(config, env, workdir, fault)
    assert killed.returncode == -9, f"{fault}: {killed.stderr[-3000:]}"
  assert not (workdir / "results.json").exists()

  # A damaged newest latest step: the rerun warns, naming it, and resumes from the one before.
  kept = _latest_steps(workdir)
  assert len(kept) == 2, kept
  _cut_short(workdir / "checkpoints" / "latest" / str(kept[-1]))
  rerun = _run(config, env, workdir, "none")
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"latest checkpoint {workdir.resolve()}/checkpoints/latest/{kept[-1]} is unreadable" in (
      rerun.stderr)
  assert (f"resumed from step {kept[0]} (checkpoint "
          f"{workdir.resolve()}/checkpoints/latest/{kept[0]})") in rerun.stderr

  results = json.loads((workdir / "results.json").read_text())
  assert results["best_step"] == reference["best_step"]
  for split in ("dev", "test"):
    for key in ("precision", "recall", "f1"):
      assert results[split][key] == pytest.approx(reference[split][key], abs=1e-9), (split, key)
  # Every step and evaluation logged once, with the uninterrupted run's values.
  log, reference_log = _log(workdir), _log(reference_dir)
  assert [r["step"] for r in log] == [r["step"] for r in reference_log]
  assert [r["step"] for r in log if "dev" in r] == [3, STEPS]
  np.testing.assert_allclose([r.get("loss", 0.0) for r in log],
                             [r.get("loss", 0.0) for r in reference_log], rtol=1e-5)
