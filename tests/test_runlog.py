"""The metrics log: rewinding it to the step a run resumes from."""

import json

from shapca_jax import runlog


def test_rewind_keeps_the_steps_up_to_the_resumed_one(tmp_path):
  path = tmp_path / "metrics.jsonl"
  records = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 2, "dev": {"f1": 0.1}},
             {"step": 3, "loss": 1.2}, {"step": 4, "loss": 1.1}]
  # A run killed while appending leaves half a line.
  path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 5, "lo')
  runlog.rewind(path, 2)
  assert [json.loads(line) for line in path.read_text().splitlines()] == records[:3]
  runlog.rewind(path, 0)  # a fresh start in a workdir without checkpoints
  assert path.read_text() == ""
  runlog.rewind(tmp_path / "absent.jsonl", 3)
  assert not (tmp_path / "absent.jsonl").exists()
