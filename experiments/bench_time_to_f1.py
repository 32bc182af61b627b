"""Time to a dev F1: our main job against the transformers token-classification recipe.

Runs, one after the other in fresh processes, on the same inputs (Twitter-2017, BLIP-2
contexts, MiniLM, batch 16) and for the same number of epochs, ours (``train_twitter17.py``,
the main config) and then the recipe (``baselines/hf_token_classification.py``). It reads
each one's dev evaluations (one per epoch, with the seconds since its start) and prints
steps/s in the training loop, seconds per epoch, total wall time, and the wall time each
first reached the target dev F1 (default: the recipe's best dev F1).

  python experiments/bench_time_to_f1.py --epochs 3 --workdir workdirs/time_to_f1
  python experiments/bench_time_to_f1.py --epochs 1 --skip_runs  # re-read finished runs

Extra ``--ours KEY=VALUE`` flags pass on as ``--config.KEY=VALUE`` to our job.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

EXPERIMENTS = pathlib.Path(__file__).resolve().parent
REPO_ROOT = EXPERIMENTS.parent


def dev_curve(workdir: pathlib.Path) -> list[tuple[float, float, int]]:
  """(seconds since the start, dev F1, step) of every dev evaluation in ``metrics.jsonl``."""
  curve = []
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    if "dev" in record:
      curve.append((record["seconds"], record["dev"]["f1"], record["step"]))
  return curve


def time_to(curve, target: float):
  """Seconds to the first evaluation with dev F1 >= ``target``, or None."""
  return next((seconds for seconds, f1, _ in curve if f1 >= target - 1e-12), None)


def launch(command: list[str], log: pathlib.Path) -> float:
  began = time.time()
  env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
  with log.open("w") as out:
    subprocess.run(command, check=True, stdout=out, stderr=subprocess.STDOUT, env=env)
  return time.time() - began


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--epochs", type=int, default=3)
  parser.add_argument("--workdir", default="workdirs/time_to_f1")
  parser.add_argument("--target_f1", type=float, default=None,
                      help="default: the recipe's best dev F1")
  parser.add_argument("--ours", action="append", default=[], help="KEY=VALUE config overrides")
  parser.add_argument("--skip_runs", action="store_true", help="only read finished workdirs")
  args = parser.parse_args()
  root = pathlib.Path(args.workdir)
  root.mkdir(parents=True, exist_ok=True)
  dirs = {"recipe": root / "hf_recipe", "ours": root / "shapca"}
  commands = {
      "ours": [sys.executable, str(EXPERIMENTS / "train_twitter17.py"),
               "--workdir", str(dirs["ours"]), f"--config.num_epochs={args.epochs}",
               "--config.progress_bar=False", *[f"--config.{o}" for o in args.ours]],
      "recipe": [sys.executable, str(EXPERIMENTS / "baselines" / "hf_token_classification.py"),
                 "--workdir", str(dirs["recipe"]), "--epochs", str(args.epochs)],
  }
  process_seconds = {}
  if not args.skip_runs:
    for name, command in commands.items():
      load = os.getloadavg()[0]
      process_seconds[name] = launch(command, root / f"{name}.log")
      print(f"{name}: {process_seconds[name]:.0f} s (load average before {load:.1f}, after "
            f"{os.getloadavg()[0]:.1f})", flush=True)
  results = {n: json.loads((d / "results.json").read_text()) for n, d in dirs.items()}
  curves = {n: dev_curve(d) for n, d in dirs.items()}
  target = args.target_f1 if args.target_f1 is not None else max(f for _, f, _ in curves["recipe"])
  rows = []
  print(f"\ntarget dev F1 {target:.4f}\n"
        "| run | loop steps/s | s/epoch | dev F1 per epoch | best dev / test F1 | "
        "s to target | wall s |\n|---|---|---|---|---|---|---|")
  for name in ("recipe", "ours"):
    r, curve = results[name], curves[name]
    steps_per_epoch = r["steps"] / args.epochs
    reached = time_to(curve, target)
    row = {"run": name, "steps_per_second": r["steps_per_second"],
           "seconds_per_epoch": steps_per_epoch / r["steps_per_second"],
           "dev_f1_per_epoch": [round(f, 4) for _, f, _ in curve],
           "seconds_at_each_dev": [s for s, _, _ in curve],
           "best_dev_f1": r["dev"]["f1"], "test_f1": r["test"]["f1"],
           "seconds_to_target": reached, "wall_seconds": r["wall_seconds"],
           "process_seconds": process_seconds.get(name)}
    rows.append(row)
    print(f"| {name} | {row['steps_per_second']:.2f} | {row['seconds_per_epoch']:.0f} | "
          f"{', '.join(f'{f:.4f}' for f in row['dev_f1_per_epoch'])} | "
          f"{row['best_dev_f1']:.4f} / {row['test_f1']:.4f} | "
          f"{'not reached' if reached is None else f'{reached:.0f}'} | "
          f"{row['wall_seconds']:.0f} |")
  (root / "time_to_f1.json").write_text(json.dumps(
      {"epochs": args.epochs, "target_dev_f1": target, "rows": rows,
       "load_average": os.getloadavg()}, indent=2))


if __name__ == "__main__":
  main()
