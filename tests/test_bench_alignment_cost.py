"""experiments/bench_alignment_cost.py: the settings parser, and that each setting trains with
its own alignment (tiny BERT, one timed step, memory of one setting in this process)."""

import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "experiments"))
import bench_alignment_cost  # noqa: E402  (experiments/ is not a package)


def test_settings_parse_in_order():
  assert bench_alignment_cost.parse_settings("none, infonce,shapley:8,shapley:128") == {
      "none": {"kind": "none"}, "infonce": {"kind": "infonce"},
      "shapley:8": {"kind": "shapley", "num_permutations": 8},
      "shapley:128": {"kind": "shapley", "num_permutations": 128}}
  align = bench_alignment_cost.align_config({"kind": "shapley", "num_permutations": 8})
  assert (align.kind, align.num_permutations, align.antithetic) == ("shapley", 8, True)


@pytest.mark.parametrize("spec", ["shapley", "shapley:0", "shapley:x", "clip", "none,,infonce"])
def test_bad_settings_name_the_flag_and_the_token(spec):
  with pytest.raises(SystemExit, match=r"--align=.*is not none, infonce or shapley:M"):
    bench_alignment_cost.parse_settings(spec)


def test_each_setting_runs_its_own_alignment():
  args = bench_alignment_cost.make_parser().parse_args(
      ["--configs", "tiny", "--warmup", "0", "--iters", "2", "--alignment_iters", "3",
       "--no-memory"])
  settings = bench_alignment_cost.parse_settings("none,infonce,shapley:2")
  results = bench_alignment_cost.run(settings, args)
  rows = results["settings"]
  assert list(rows) == list(settings) and results["reference"] == "none"
  first = {name: row["first_step_metrics"] for name, row in rows.items()}
  # Same weights, batch and dropout draws: the task loss agrees, the alignment differs.
  assert len({round(m["task_loss"], 5) for m in first.values()}) == 1
  assert first["none"]["align_loss"] == 0 and "c2t" not in first["none"]
  aligned = [first[name]["c2t"] for name in ("infonce", "shapley:2")]
  assert all(np.isfinite(aligned)) and aligned[0] != aligned[1]
  assert rows["none"]["time_ratio"] == 1
  assert all(len(row["all_s"]) == 2 and row["median_s"] > 0 for row in rows.values())
  assert all(row["alignment_alone_min_s"] > 0 for row in rows.values())
  assert "| shapley:2 |" in bench_alignment_cost.table(results)


def test_memory_of_one_setting():
  args = bench_alignment_cost.make_parser().parse_args(["--configs", "tiny", "--warmup", "0"])
  memory = bench_alignment_cost._child("shapley:2", args)
  if memory["peak_rss_mib"] is None:
    pytest.skip("this kernel cannot reset the peak resident set (/proc/self/clear_refs)")
  assert memory["peak_rss_mib"] >= memory["rss_before_steps_mib"] > 0
