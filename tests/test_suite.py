"""The experiment-suite runner (experiments/suite.py) and its report (suite_report.py)."""

import dataclasses
import gzip
import itertools
import json
import pathlib
import sys
import textwrap

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "experiments"))
import suite as suite_lib  # noqa: E402  (experiments/ is not a package)
import suite_report  # noqa: E402
import suites as suites_lib  # noqa: E402

from shapca_jax import metrics  # noqa: E402


def _exact_bootstrap(terms):
  """Every ordered resample of the n examples, each equally likely: the exact bootstrap
  distribution of sum(weight * mean-over-seeds F1), from metrics.prf."""
  n = terms[0][1].shape[1]
  values = []
  for sample in itertools.product(range(n), repeat=n):
    def mean_f1(counts):
      return np.mean([metrics.prf(*counts[s, list(sample)].sum(0))["f1"]
                      for s in range(counts.shape[0])])
    values.append(sum(w * mean_f1(counts) for w, counts in terms))
  return np.array(values)


def _random_counts(rng, rows, seeds, examples):
  gold = rng.integers(1, 4, size=(seeds, examples))
  counts = []
  for _ in range(rows):
    pred = rng.integers(0, 4, size=(seeds, examples))
    correct = np.minimum(pred, gold) * rng.integers(0, 2, size=(seeds, examples))
    counts.append(np.stack([correct, pred, gold], -1))
  return counts


def _assert_matches_exact(got, terms):
  full = sum(w * np.mean([metrics.prf(*c[s].sum(0))["f1"] for s in range(c.shape[0])])
             for w, c in terms)
  assert got["difference"] == pytest.approx(full, abs=1e-12)
  low, high = np.percentile(_exact_bootstrap(terms), [2.5, 97.5])
  assert got["low"] == pytest.approx(low, abs=0.02)
  assert got["high"] == pytest.approx(high, abs=0.02)


def test_a_paired_difference_matches_the_exact_bootstrap_distribution():
  row, ref = _random_counts(np.random.default_rng(3), rows=2, seeds=2, examples=6)
  terms = [(1.0, row), (-1.0, ref)]
  _assert_matches_exact(suite_report.contrast_bootstrap(terms, resamples=40000), terms)


def test_a_difference_of_differences_matches_the_exact_bootstrap_distribution():
  a, b, c, d = _random_counts(np.random.default_rng(5), rows=4, seeds=2, examples=5)
  terms = [(1.0, a), (-1.0, b), (-1.0, c), (1.0, d)]
  _assert_matches_exact(suite_report.contrast_bootstrap(terms, resamples=40000), terms)


def test_unpaired_counts_are_refused():
  counts = np.zeros((2, 5, 3))
  with pytest.raises(ValueError, match="unpaired"):
    suite_report.contrast_bootstrap([(1.0, counts), (-1.0, counts[:, :4])], 10)


def test_a_row_against_itself_is_zero():
  counts = np.random.default_rng(0).integers(0, 3, size=(3, 50, 3))
  assert suite_report.contrast_bootstrap([(1.0, counts), (-1.0, counts)], 100) == {
      "difference": 0.0, "low": 0.0, "high": 0.0}


FAKE_TRAINER = textwrap.dedent("""
    # Stands in for experiments/train_<dataset>.py: writes what train_and_evaluate writes.
    import gzip, json, pathlib, sys
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
    workdir = pathlib.Path(args["workdir"])
    seed = args.get("config.seed", args.get("seed"))  # ours, or a baseline's plain flags
    with open(workdir.parent.parent / "calls.txt", "a") as f:
      f.write(f"{workdir.parent.name} {seed}\\n")
    if args.get("config.align.kind") == "crash":
      sys.exit(3)
    f1 = 0.5 + 0.1 * int(seed)
    (workdir / "metrics.jsonl").write_text(
        json.dumps({"step": 5, "epoch": 0.5, "dev": {"f1": f1 - 0.1}}) + "\\n" +
        json.dumps({"step": 10, "epoch": 1.0, "dev": {"f1": f1}}) + "\\n" +
        json.dumps({"step": 10, "epoch": 1.0, "dev": {"f1": f1}}) + "\\n")
    with gzip.open(workdir / "test_predictions.jsonl.gz", "wt") as f:
      for i in range(4):
        f.write(json.dumps({"index": i, "pred": [], "num_correct": i % 2, "num_pred": 1,
                            "num_gold": 1}) + "\\n")
    scores = {"precision": f1, "recall": f1, "f1": f1}
    test = {"precision": f1 + 0.2, "recall": f1 + 0.2, "f1": f1 + 0.2}
    (workdir / "results.json").write_text(json.dumps({
        "best_step": 10, "last_step": 10, "steps": 10, "dev": scores, "test": test,
        "steps_per_second": 2.0, "compile_seconds": 1.0, "wall_seconds": 3.0,
        "config": {"num_epochs": 1}}))
""")


@pytest.fixture
def fake_suite(tmp_path, monkeypatch):
  (tmp_path / "bin").mkdir()
  (tmp_path / "bin" / "train_twitter17.py").write_text(FAKE_TRAINER)
  monkeypatch.setattr(suite_lib, "EXPERIMENTS", tmp_path / "bin")
  suite = suites_lib.Suite("fake", "?", rows=(
      suites_lib.Row("a", {"num_epochs": 1}, (0, 1)),
      suites_lib.Row("b", {"align.kind": "crash"}, (0,))), comparisons=(("a", "a"),),
      interactions=((("a", "a"), ("a", "a")), (("a", "b"), ("a", "a"))))
  monkeypatch.setitem(suites_lib.SUITES, "fake", suite)
  return tmp_path


def _calls(root):
  return (root / "work" / "fake" / "calls.txt").read_text().split("\n")[:-1]


def test_suite_records_each_run_once_skips_recorded_ones_and_stops_on_a_failed_run(fake_suite):
  args = ["run", "fake", "--workroot", str(fake_suite / "work"),
          "--results_dir", str(fake_suite / "results")]
  with pytest.raises(suite_lib.SuiteError, match="run b seed 0 failed with exit code 3"):
    suite_lib.main(args)  # seed-major: a 0, b 0 (fails), a 1 never starts
  assert _calls(fake_suite) == ["a 0", "b 0"]
  suite_lib.main(args[:2] + ["--rows", "a"] + args[2:])
  lines = suite_lib.read_lines(fake_suite / "results", "fake")
  assert [(l["row"], l["seed"]) for l in lines] == [("a", 0), ("a", 1)]
  assert lines[1]["test"]["f1"] == pytest.approx(0.8)
  assert lines[1]["dev_curve"] == [[0.5, pytest.approx(0.5)], [1.0, pytest.approx(0.6)]]
  assert lines[0]["peak_rss_mb"] > 1 and lines[0]["overrides"] == {"num_epochs": 1}
  assert suite_lib.test_counts(fake_suite / "results", "fake", "a", 1)[:2] == [[0, 1, 1],
                                                                              [1, 1, 1]]
  suite_lib.main(args[:2] + ["--rows", "a"] + args[2:])  # both recorded: nothing runs
  assert _calls(fake_suite) == ["a 0", "b 0", "a 1"]


def test_a_row_declared_the_same_as_another_suites_row_reuses_its_runs(fake_suite, monkeypatch):
  args = ["--workroot", str(fake_suite / "work"), "--results_dir", str(fake_suite / "results")]
  suite_lib.main(["run", "fake", "--rows", "a", *args])
  monkeypatch.setitem(suites_lib.SUITES, "other", suites_lib.Suite("other", "?", rows=(
      suites_lib.Row("c", {"num_epochs": 1}, (1,), same_as="fake/a"),
      suites_lib.Row("d", {"num_epochs": 2}, (0,), same_as="fake/a"))))
  suite_lib.main(["run", "other", "--rows", "c", *args])
  assert _calls(fake_suite) == ["a 0", "a 1"]  # nothing trained for c
  [line] = suite_lib.read_lines(fake_suite / "results", "other")
  assert (line["row"], line["seed"], line["same_as"]) == ("c", 1, "fake/a")
  assert line["test"]["f1"] == pytest.approx(0.8)
  assert suite_lib.test_counts(fake_suite / "results", "other", "c", 1)[1] == [1, 1, 1]
  with pytest.raises(suite_lib.SuiteError, match="overrides differ"):
    suite_lib.main(["run", "other", "--rows", "d", *args])


def test_a_finished_but_unrecorded_run_is_recorded_without_training_again(fake_suite):
  args = ["--workroot", str(fake_suite / "work"), "--results_dir", str(fake_suite / "results")]
  suite_lib.main(["run", "fake", "--rows", "a", "--seeds", "0", *args])
  (fake_suite / "results" / "fake.jsonl").unlink()  # killed between results.json and the line
  suite_lib.main(["run", "fake", "--rows", "a", "--seeds", "0", *args])
  assert _calls(fake_suite) == ["a 0"]
  assert len(suite_lib.read_lines(fake_suite / "results", "fake")) == 1


def test_report_writes_tables_and_figures(fake_suite):
  args = ["--results_dir", str(fake_suite / "results")]
  suite_lib.main(["run", "fake", "--rows", "a", "--workroot", str(fake_suite / "work"), *args])
  suite_lib.main(["report", "fake", "--resamples", "50", *args])
  page = (fake_suite / "results" / "fake.md").read_text()
  assert "| a | `--config.num_epochs=1` | 2 of 2 | 55.00 ± 7.07 | 75.00 ± 7.07 |" in page
  assert "| a | a | 2 | +0.00 | [+0.00, +0.00] | +0.00 |" in page
  assert "| a − a | a − a | 2 | +0.00 | [+0.00, +0.00] | +0.00 |" in page
  assert "| a − b | a − a | 0 | | | |" in page
  assert "| b |" in page and "0 of 1" in page
  for name in ("fake_test_f1.png", "fake_dev_curves.png"):
    assert (fake_suite / "results" / name).stat().st_size > 1000


def test_a_dev_only_suite_shows_test_f1_of_its_chosen_row_only(fake_suite, monkeypatch):
  args = ["--results_dir", str(fake_suite / "results")]
  suite_lib.main(["run", "fake", "--rows", "a", "--workroot", str(fake_suite / "work"), *args])
  fake = suites_lib.SUITES["fake"]
  for chosen, test_cell in (("", "not shown"), ("a", "75.00 ± 7.07")):
    monkeypatch.setitem(suites_lib.SUITES, "fake",
                        dataclasses.replace(fake, dev_only=True, chosen=chosen))
    suite_lib.main(["report", "fake", "--resamples", "50", *args])
    page = (fake_suite / "results" / "fake.md").read_text()
    assert f"| a | `--config.num_epochs=1` | 2 of 2 | 55.00 ± 7.07 | {test_cell} |" in page
    assert "| a | a | 2 | +0.00 |" in page and "interval" not in page
    assert (fake_suite / "results" / "fake_dev_f1.png").stat().st_size > 1000


def test_a_baseline_row_runs_its_script_with_plain_flags(fake_suite, monkeypatch):
  (fake_suite / "bin" / "baseline.py").write_text(FAKE_TRAINER)
  monkeypatch.setitem(suites_lib.SUITES, "fake", suites_lib.Suite("fake", "?", rows=(
      suites_lib.Row("r", {"epochs": 2}, (1,), script="baseline.py"),)))
  suite_lib.main(["run", "fake", "--workroot", str(fake_suite / "work"),
                  "--results_dir", str(fake_suite / "results")])
  assert _calls(fake_suite) == ["r 1"]
  [command] = [l for l in (fake_suite / "work" / "fake" / "r" / "seed1" / "suite.log")
               .read_text().splitlines() if l.startswith("$ ")]
  assert command.split()[2:] == [str(fake_suite / "bin" / "baseline.py"),
                                 f"--workdir={fake_suite / 'work' / 'fake' / 'r' / 'seed1'}",
                                 "--epochs=2", "--seed=1"]
  [line] = suite_lib.read_lines(fake_suite / "results", "fake")
  assert line["test"]["f1"] == pytest.approx(0.8)


def test_unknown_suite_or_row_is_one_line_error(fake_suite, capsys):
  with pytest.raises(suite_lib.SuiteError, match="unknown suite 'nope'"):
    suite_lib.main(["run", "nope"])
  with pytest.raises(KeyError, match="no row 'z'"):
    suite_lib.main(["run", "fake", "--rows", "z"])


def test_every_suite_row_is_a_valid_config():
  from baselines import hf_token_classification as recipe
  from shapca_jax.config import default_config, validate_config
  for suite in suites_lib.SUITES.values():
    for row in suite.rows:
      if row.script:
        assert row.script == suites_lib.RECIPE
        recipe.arguments().parse_args(["--workdir=x", *suite_lib.flags(row)])  # exits if unknown
        continue
      config = default_config()
      config.data_dir = "x"
      for key, value in row.overrides.items():
        node = config
        *path, leaf = key.split(".")
        for part in path:
          node = node[part]
        node[leaf] = value
      validate_config(config)
      assert row.dataset in suites_lib.SCRIPTS
    for name, reference in suite.comparisons:
      suite.row(name), suite.row(reference)


def test_the_report_averages_the_last_epoch_diagnostics_over_the_seeds_that_have_them():
  suite = suites_lib.Suite("fake", "?", rows=(suites_lib.Row("a", {}, (0, 1, 2)),
                                              suites_lib.Row("b", {}, (0,))))
  def line(top1):
    return {"alignment": {"last_epoch_mean": {key: top1 for key in suite_report.DIAGNOSTICS}}}
  rows = {"a": {0: line(0.5), 1: {}, 2: line(0.75)}, "b": {0: {}}}
  table = suite_report._alignment(suite, rows)  # pylint: disable=protected-access
  assert table[-1] == "| a | 2 of 3 | " + " | ".join(["0.625"] * 5) + " |"
  assert not any(l.startswith("| b |") for l in table)
  assert suite_report._alignment(suite, {"a": {0: {}}}) == []  # pylint: disable=protected-access
