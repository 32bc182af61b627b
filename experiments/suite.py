"""Runs a named experiment suite (experiments/suites.py) and reports it.

  python experiments/suite.py run ablation-t17 [--rows blip2-none,text-only] [--seeds 0]
  python experiments/suite.py report ablation-t17
  python experiments/suite.py list

`run` trains each (row, seed) in turn (the machine's cores go to one run at a time), one
workdir per run under --workroot. A run whose line is already in docs/results/<suite>.jsonl
is skipped; a killed run resumes from its checkpoint when the suite is started again. Each
finished run appends one line to that file (its scores, speed, peak memory, dev curve and the
commit that made it) and keeps its test predictions beside it, under docs/results/<suite>/,
so that `report` can compute bootstrap intervals without the models.
"""

import argparse
import gzip
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
from typing import Any, Optional

import suites as suites_lib

EXPERIMENTS = pathlib.Path(__file__).resolve().parent
REPO_ROOT = EXPERIMENTS.parent
RESULTS_DIR = REPO_ROOT / "docs" / "results"
SCORE_KEYS = ("precision", "recall", "f1")


class SuiteError(Exception):
  """A user error: unknown suite, row or seed; a failed run."""


def results_file(results_dir: pathlib.Path, suite: str) -> pathlib.Path:
  return results_dir / f"{suite}.jsonl"


def predictions_file(results_dir: pathlib.Path, suite: str, row: str, seed: int) -> pathlib.Path:
  return results_dir / suite / f"{row}.seed{seed}.test.jsonl.gz"


def read_lines(results_dir: pathlib.Path, suite: str) -> list[dict[str, Any]]:
  path = results_file(results_dir, suite)
  if not path.exists():
    return []
  lines = []
  for number, text in enumerate(path.read_text().splitlines(), 1):
    try:
      lines.append(json.loads(text))
    except json.JSONDecodeError as e:
      raise SuiteError(f"{path}:{number}: not a JSON line ({e.msg})") from None
  return lines


def commit() -> str:
  """The checkout's commit, with "+dirty" when library or experiment files differ from it."""
  head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT,
                        capture_output=True, text=True).stdout.strip() or "unknown"
  dirty = subprocess.run(["git", "status", "--porcelain", "--", "shapca_jax", "experiments"],
                         cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
  return head + ("+dirty" if dirty else "")


def flags(row: suites_lib.Row, overrides: Optional[dict[str, Any]] = None) -> list[str]:
  """The command-line flags of ``overrides`` (default: the row's) for the row's script."""
  prefix = "--" if row.script else "--config."
  return [f"{prefix}{key}={value}"
          for key, value in sorted((row.overrides if overrides is None else overrides).items())]


def dev_curve(workdir: pathlib.Path) -> list[list[float]]:
  """[epoch, dev F1] per evaluation, each step once (a resumed run logs replayed ones again)."""
  curve = {}
  for text in (workdir / "metrics.jsonl").read_text().splitlines():
    record = json.loads(text)
    if "dev" in record:
      curve[record["step"]] = [record["epoch"], record["dev"]["f1"]]
  return [curve[step] for step in sorted(curve)]


def result_line(suite: suites_lib.Suite, row: suites_lib.Row, seed: int, workdir: pathlib.Path,
                peak_rss_mb: Optional[float], made_by: str) -> dict[str, Any]:
  results = json.loads((workdir / "results.json").read_text())
  line = {
      "suite": suite.name, "row": row.name, "dataset": row.dataset, "seed": seed,
      "overrides": row.overrides, "commit": made_by,
      "epochs": results["config"]["num_epochs"],
      "best_step": results["best_step"], "last_step": results.get("last_step", results["steps"]),
      "steps": results["steps"],
      **{split: {k: results[split][k] for k in SCORE_KEYS} for split in ("dev", "test")},
      "steps_per_second": results["steps_per_second"],
      "compile_seconds": results.get("compile_seconds"),
      "wall_seconds": round(results["wall_seconds"], 1),
      "peak_rss_mb": peak_rss_mb,
      "dev_curve": dev_curve(workdir),
  }
  if "alignment" in results:
    line["alignment"] = results["alignment"]
  return line


def run_one(row: suites_lib.Row, seed: int, workdir: pathlib.Path) -> Optional[float]:
  """Trains one (row, seed) in a child process; returns its peak resident memory in MiB."""
  workdir.mkdir(parents=True, exist_ok=True)
  script = row.script or suites_lib.SCRIPTS[row.dataset]
  command = [sys.executable, str(EXPERIMENTS / script), f"--workdir={workdir}",
             *flags(row, {**row.overrides, "seed": seed}),
             *([] if row.script else ["--config.progress_bar=False"])]
  with (workdir / "suite.log").open("a") as log:
    log.write(f"$ {' '.join(command)}\n")
    log.flush()
    # From the checkout, where a row's relative paths (a data_dir override) point.
    child = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(child.pid, 0)
  code = os.waitstatus_to_exitcode(status)
  if code != 0:
    raise SuiteError(f"run {row.name} seed {seed} failed with exit code {code}; its log: "
                     f"{workdir / 'suite.log'}")
  return round(usage.ru_maxrss / 1024, 1)  # Linux reports KiB


def recorded_elsewhere(row: suites_lib.Row, seed: int,
                       results_dir: pathlib.Path) -> Optional[dict[str, Any]]:
  """The line of ``row.same_as`` for ``seed``, if that run is recorded."""
  if not row.same_as:
    return None
  suite_name, row_name = row.same_as.split("/")
  source = suites_lib.SUITES[suite_name].row(row_name)
  if (source.dataset, source.overrides, source.script) != (row.dataset, row.overrides,
                                                            row.script):
    raise SuiteError(f"row {row.name} is declared the same as {row.same_as}, but their datasets, "
                     f"scripts or overrides differ: {row.overrides} vs {source.overrides}")
  lines = [l for l in read_lines(results_dir, suite_name)
           if l["row"] == row_name and l["seed"] == seed]
  return lines[-1] if lines else None


def run(suite: suites_lib.Suite, rows: list[suites_lib.Row], seeds: Optional[set[int]],
        workroot: pathlib.Path, results_dir: pathlib.Path) -> None:
  # Seed-major order: every row's first seed before any row's second, so a suite stopped
  # part-way leaves comparable rows.
  rank = {row.name: i for i, row in enumerate(rows)}
  todo = sorted(((row, seed) for row in rows for seed in row.seeds
                 if seeds is None or seed in seeds),
                key=lambda item: (item[0].seeds.index(item[1]), rank[item[0].name]))
  done = {(line["row"], line["seed"]) for line in read_lines(results_dir, suite.name)}
  pending = [(row, seed) for row, seed in todo if (row.name, seed) not in done]
  print(f"[{suite.name}] {len(todo) - len(pending)} of {len(todo)} runs already recorded",
        flush=True)
  walls = []
  for number, (row, seed) in enumerate(pending, 1):
    eta = (f", about {sum(walls) / len(walls) * (len(pending) - number + 1) / 60:.0f} min left"
           if walls else "")
    print(f"[{suite.name}] run {number}/{len(pending)}: {row.name} seed {seed}{eta}", flush=True)
    began = time.time()
    target = predictions_file(results_dir, suite.name, row.name, seed)
    target.parent.mkdir(parents=True, exist_ok=True)
    line = recorded_elsewhere(row, seed, results_dir)
    if line is not None:
      source_suite, source_row = row.same_as.split("/")
      shutil.copyfile(predictions_file(results_dir, source_suite, source_row, seed), target)
      line = {**line, "suite": suite.name, "row": row.name, "same_as": row.same_as}
    else:
      workdir = workroot / suite.name / row.name / f"seed{seed}"
      peak = None
      if not (workdir / "results.json").exists():  # else finished before it was recorded
        peak = run_one(row, seed, workdir)
      line = result_line(suite, row, seed, workdir, peak, commit())
      shutil.copyfile(workdir / "test_predictions.jsonl.gz", target)
    with results_file(results_dir, suite.name).open("a") as f:
      f.write(json.dumps(line) + "\n")
    if "same_as" not in line:  # a reused run says nothing about the time a run takes
      walls.append(time.time() - began)
    print(f"[{suite.name}] {row.name} seed {seed}: dev F1 {line['dev']['f1']:.4f}, test F1 "
          f"{line['test']['f1']:.4f}, best step {line['best_step']}, "
          f"{(time.time() - began) / 60:.1f} min", flush=True)


def test_counts(results_dir: pathlib.Path, suite: str, row: str, seed: int) -> list[list[int]]:
  """[num_correct, num_pred, num_gold] of each test example of one run."""
  with gzip.open(predictions_file(results_dir, suite, row, seed), "rt") as f:
    return [[r["num_correct"], r["num_pred"], r["num_gold"]] for r in map(json.loads, f)]


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  run_parser = sub.add_parser("run", help="train the suite's missing runs, one after another")
  run_parser.add_argument("suite")
  run_parser.add_argument("--rows", default="", help="comma-separated row names (default all)")
  run_parser.add_argument("--seeds", default="", help="comma-separated seeds (default each "
                          "row's own)")
  run_parser.add_argument("--workroot", default=str(REPO_ROOT / "workdirs" / "suites"))
  report_parser = sub.add_parser("report", help="tables and figures into docs/results/")
  report_parser.add_argument("suite")
  report_parser.add_argument("--resamples", type=int, default=2000)
  sub.add_parser("list", help="the suites, their rows and seeds")
  for p in (run_parser, report_parser):
    p.add_argument("--results_dir", default=str(RESULTS_DIR))
  args = parser.parse_args(argv)

  if args.command == "list":
    for suite in suites_lib.SUITES.values():
      print(f"{suite.name}: {suite.question}")
      for row in suite.rows:
        print(f"  {row.name} ({row.dataset}, seeds {list(row.seeds)}): {' '.join(flags(row))}")
    return 0
  if args.suite not in suites_lib.SUITES:
    raise SuiteError(f"unknown suite {args.suite!r}; known: {sorted(suites_lib.SUITES)}")
  suite = suites_lib.SUITES[args.suite]
  results_dir = pathlib.Path(args.results_dir)
  if args.command == "report":
    import suite_report  # matplotlib only where figures are drawn
    written = suite_report.write_report(suite, results_dir, args.resamples)
    print("\n".join(str(p) for p in written))
    return 0
  rows = [suite.row(name) for name in args.rows.split(",")] if args.rows else list(suite.rows)
  seeds = {int(s) for s in args.seeds.split(",")} if args.seeds else None
  run(suite, rows, seeds, pathlib.Path(args.workroot), results_dir)
  return 0


if __name__ == "__main__":
  try:
    sys.exit(main(sys.argv[1:]))
  except (SuiteError, KeyError) as e:
    print(f"suite.py: {e.args[0] if e.args else e}", file=sys.stderr)
    sys.exit(2)
