"""The Twitter-2017 ablation table (METHOD §7) with the bundled MiniLM encoder on a CPU.

  python experiments/ablations_twitter17.py --workdir workdirs/ablations --seeds 0,1 \
      --data_dir ../shared/data

Runs each row for each seed as its own `train_twitter17.py` process (a killed sweep resumes:
finished runs are read back from their results.json, unfinished ones resume from their latest
checkpoint), then prints a markdown table of dev-selected test P/R/F1 (mean ± std over seeds)
and writes it with every run's numbers to `<workdir>/table.json`.

PGIM contexts are not embedded in `data/`, so `--data_dir` must hold them for row (d).
"""

import json
import pathlib
import statistics
import subprocess
import sys

from absl import app
from absl import flags

ROWS = {
    "a_text_only": ["--config.use_context=False", "--config.align.kind=none"],
    "b_blip2_no_align": ["--config.align.kind=none"],
    "c_blip2_shapley": [],
    "d_pgim_shapley": ["--config.contexts=pgim"],
    "e_blip2_infonce": ["--config.align.kind=infonce"],
}

_WORKDIR = flags.DEFINE_string("workdir", "workdirs/ablations", "One sub-folder per run.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1"], "Seeds of every row.")
_ROWS = flags.DEFINE_list("rows", list(ROWS), "Which rows to run.")
_DATA_DIR = flags.DEFINE_string("data_dir", "../shared/data", "Folder with twitter2017/.")
_EXTRA = flags.DEFINE_list("extra", [], "More --config.KEY=VALUE flags for every run.")

ENTRY = pathlib.Path(__file__).parent / "train_twitter17.py"


def run_one(row: str, seed: str, workdir: pathlib.Path) -> dict:
  results = workdir / "results.json"
  if not results.exists():
    cmd = [sys.executable, str(ENTRY), f"--workdir={workdir}", f"--config.seed={seed}",
           f"--config.data_dir={_DATA_DIR.value}", "--config.progress_bar=False",
           *ROWS[row], *[f"--config.{e}" for e in _EXTRA.value]]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
  return json.loads(results.read_text())


def _mean_std(values: list[float]) -> str:
  mean = statistics.mean(values) * 100
  std = statistics.stdev(values) * 100 if len(values) > 1 else float("nan")
  return f"{mean:.2f} ± {std:.2f}" if len(values) > 1 else f"{mean:.2f}"


def main(argv):
  del argv
  root = pathlib.Path(_WORKDIR.value)
  table = {}
  for row in _ROWS.value:
    runs = {seed: run_one(row, seed, root / f"{row}_seed{seed}") for seed in _SEEDS.value}
    table[row] = {
        "runs": {seed: {"test": {k: r["test"][k] for k in ("precision", "recall", "f1")},
                        "dev_f1": r["dev"]["f1"], "best_step": r["best_step"],
                        "steps_per_second": r["steps_per_second"],
                        "wall_seconds": r["wall_seconds"]} for seed, r in runs.items()},
        "test_f1": _mean_std([r["test"]["f1"] for r in runs.values()]),
        "test_precision": _mean_std([r["test"]["precision"] for r in runs.values()]),
        "test_recall": _mean_std([r["test"]["recall"] for r in runs.values()]),
        "dev_f1": _mean_std([r["dev"]["f1"] for r in runs.values()]),
    }
  (root / "table.json").write_text(json.dumps(table, indent=2))
  print("| row | test P | test R | test F1 | dev F1 |\n|---|---|---|---|---|")
  for row, t in table.items():
    print(f"| {row} | {t['test_precision']} | {t['test_recall']} | {t['test_f1']} | {t['dev_f1']} |")


if __name__ == "__main__":
  app.run(main)
