"""Tables and figures of one suite's recorded runs (`python experiments/suite.py report SUITE`).

Per row: mean and sample standard deviation of dev and test F1 over its seeds. Per comparison
(row, reference): the paired test-F1 difference, mean over the seeds both rows ran, with a 95 %
percentile bootstrap interval. Each bootstrap replicate resamples the test examples with
replacement once and applies that resample to every run of both rows (paired by example and by
seed), recomputing each run's micro F1 from its per-example counts; the interval therefore
covers test-set sampling, pooled over the seeds, and the seed-to-seed spread shows in the std.
Per interaction ((a, b), (c, d)): the difference of differences (a - b) - (c - d), bootstrapped
the same way over the seeds all four rows ran.

A ``dev_only`` suite (one that chooses a setting) shows dev F1 and dev differences only, and
the test F1 of its ``chosen`` row once one is named.

Rows whose runs recorded the alignment diagnostics (``results.json["alignment"]``) get them in
a table of their own: the mean over the log steps of the last epoch, then over the seeds that
have them.
"""

import collections
from collections.abc import Sequence
import pathlib
from typing import Any

import numpy as np

import suite as suite_lib
import suites as suites_lib


def f1_from_counts(counts: np.ndarray) -> np.ndarray:
  """Micro F1 from [..., 3] summed (num_correct, num_pred, num_gold); 0 where undefined."""
  correct, pred, gold = counts[..., 0], counts[..., 1], counts[..., 2]
  with np.errstate(divide="ignore", invalid="ignore"):
    f1 = np.where(pred + gold > 0, 2 * correct / (pred + gold), 0.0)
  return f1


def contrast_bootstrap(terms: Sequence[tuple[float, np.ndarray]], resamples: int,
                       seed: int = 0) -> dict[str, float]:
  """A weighted sum of rows' mean-over-seeds F1 (e.g. row - reference) and its 95 % interval.

  Args:
    terms: (weight, counts) per row; counts are [seeds, examples, 3] per-example counts, the
      same seeds and examples in the same order for every row, so that each replicate's
      resample pairs them by example and by seed.
    resamples: bootstrap replicates.
  """
  shapes = {counts.shape for _, counts in terms}
  if len(shapes) != 1:
    raise ValueError(f"unpaired counts: {sorted(shapes)}")
  n = terms[0][1].shape[1]
  weights = np.random.default_rng(seed).multinomial(n, np.full(n, 1 / n), size=resamples)
  def mean_f1(counts):  # [B, seeds]
    return f1_from_counts(np.einsum("bn,snk->bsk", weights, counts)).mean(axis=1)
  replicates = sum(w * mean_f1(counts) for w, counts in terms)
  point = sum(w * f1_from_counts(counts.sum(1)).mean() for w, counts in terms)
  low, high = np.percentile(replicates, [2.5, 97.5])
  return {"difference": float(point), "low": float(low), "high": float(high)}


def _by_row(lines: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, Any]]]:
  rows = collections.defaultdict(dict)
  for line in lines:
    rows[line["row"]][line["seed"]] = line  # a rerun's later line wins
  return rows


def _mean_std(values: list[float]) -> str:
  values = 100 * np.asarray(values)
  std = f" ± {values.std(ddof=1):.2f}" if len(values) > 1 else ""
  return f"{values.mean():.2f}{std}"


def _test_cell(suite: suites_lib.Suite, row: str, lines: list[dict[str, Any]]) -> str:
  if suite.dev_only and row != suite.chosen:
    return "not shown"
  return _mean_std([l["test"]["f1"] for l in lines])


def _comparisons(suite: suites_lib.Suite, rows: dict[str, dict[int, dict[str, Any]]],
                 results_dir: pathlib.Path, resamples: int) -> list[str]:
  """The comparison table: the dev difference of each (row, reference) pair over the seeds
  both ran, and, unless the suite is dev-only, the paired test difference with its interval."""
  if suite.dev_only:
    out = ["", "Dev-F1 differences (points of F1), seeds both rows ran:", "",
           "| row | reference | seeds | dev difference |", "|---|---|---|---|"]
  else:
    out = ["", "Paired test-F1 differences (points of F1), 95 % bootstrap interval over test "
           f"examples ({resamples} resamples), seeds both rows ran:", "",
           "| row | reference | seeds | difference | 95 % interval | dev difference |",
           "|---|---|---|---|---|---|"]
  for name, reference in suite.comparisons:
    out.append(_contrast_row(f"| {name} | {reference} |", ((name, 1.0), (reference, -1.0)),
                             suite, rows, results_dir, resamples))
  return out


def _contrast_row(label: str, signs: Sequence[tuple[str, float]], suite: suites_lib.Suite,
                  rows: dict[str, dict[int, dict[str, Any]]], results_dir: pathlib.Path,
                  resamples: int) -> str:
  """``label`` then, over the seeds every row of ``signs`` ran, their count, the signed sum of
  the rows' test F1 with its bootstrap interval (unless the suite is dev-only) and of dev F1."""
  seeds = sorted(set.intersection(*(set(rows.get(r, {})) for r, _ in signs)))
  if not seeds:
    return f"{label} 0 |" + " |" * (1 if suite.dev_only else 3)
  dev = np.mean([sum(w * rows[r][s]["dev"]["f1"] for r, w in signs) for s in seeds])
  test = ""
  if not suite.dev_only:
    terms = [(w, np.array([suite_lib.test_counts(results_dir, suite.name, r, s) for s in seeds]))
             for r, w in signs]
    b = contrast_bootstrap(terms, resamples)
    test = f" {100 * b['difference']:+.2f} | [{100 * b['low']:+.2f}, {100 * b['high']:+.2f}] |"
  return f"{label} {len(seeds)} |{test} {100 * dev:+.2f} |"


def _interactions(suite: suites_lib.Suite, rows: dict[str, dict[int, dict[str, Any]]],
                  results_dir: pathlib.Path, resamples: int) -> list[str]:
  """Differences of paired differences, (a - b) - (c - d): whether a gain depends on a setting
  (say, what PGIM contexts add with alignment against what they add without). One bootstrap
  resample applies to all four rows."""
  out = ["", "Differences of differences (points of F1): (a − b) − (c − d), 95 % bootstrap "
         f"interval over test examples ({resamples} resamples), seeds all four rows ran:", "",
         "| a − b | c − d | seeds | difference | 95 % interval | dev difference |",
         "|---|---|---|---|---|---|"]
  for (a, b), (c, d) in suite.interactions:
    out.append(_contrast_row(f"| {a} − {b} | {c} − {d} |",
                             ((a, 1.0), (b, -1.0), (c, -1.0), (d, 1.0)),
                             suite, rows, results_dir, resamples))
  return out


# The diagnostics that say whether the alignment game is still being played (docs/alignment.md).
DIAGNOSTICS = ("c2t_top1", "t2c_top1", "c2t_phi_margin", "c2t_shapley_infonce_grad_cos",
               "align_grad_share")


def _alignment(suite: suites_lib.Suite, rows: dict[str, dict[int, dict[str, Any]]]) -> list[str]:
  """The alignment diagnostics of the last epoch per row, where its runs recorded them."""
  measured = {row.name: [line["alignment"]["last_epoch_mean"]
                         for _, line in sorted(rows.get(row.name, {}).items())
                         if line.get("alignment")] for row in suite.rows}
  if not any(measured.values()):
    return []
  out = ["", "Alignment diagnostics over the last epoch (mean of its log steps, then of the "
         "seeds that recorded them; [definitions](../alignment.md#diagnostics)):", "",
         "| row | seeds | " + " | ".join(f"`{key}`" for key in DIAGNOSTICS) + " |",
         "|---|---|" + "---|" * len(DIAGNOSTICS)]
  for name, summaries in measured.items():
    if summaries:
      cells = [f"{np.mean([s[key] for s in summaries]):.3f}" if all(key in s for s in summaries)
               else "" for key in DIAGNOSTICS]
      out.append(f"| {name} | {len(summaries)} of {len(rows[name])} | " + " | ".join(cells) + " |")
  return out


def tables(suite: suites_lib.Suite, results_dir: pathlib.Path, resamples: int) -> str:
  rows = _by_row(suite_lib.read_lines(results_dir, suite.name))
  out = [f"# Suite `{suite.name}`", "", suite.question, "",
         f"Made by `python experiments/suite.py run {suite.name}` then "
         f"`python experiments/suite.py report {suite.name}`; protocol: "
         "[PROTOCOL.md](PROTOCOL.md). F1 in %, mean ± sample std over seeds.", ""]
  if suite.dev_only:
    out += ["Test F1 is not shown for this suite, which chooses on dev; "
            + (f"the chosen row is `{suite.chosen}`." if suite.chosen else "no row is chosen yet."),
            ""]
  out += ["| row | overrides | seeds | dev F1 | test F1 | best / last epoch | steps/s | peak RSS MiB |",
          "|---|---|---|---|---|---|---|---|"]
  for row in suite.rows:
    runs = rows.get(row.name, {})
    if not runs:
      out.append(f"| {row.name} | `{' '.join(suite_lib.flags(row))}` | 0 of "
                 f"{len(row.seeds)} | | | | | |")
      continue
    lines = [runs[s] for s in sorted(runs)]
    best_epochs = ", ".join(f"{l['best_step'] * l['epochs'] / l['steps']:.1f} / "
                            f"{l['last_step'] * l['epochs'] / l['steps']:.1f}" for l in lines)
    rss = [l["peak_rss_mb"] for l in lines if l.get("peak_rss_mb")]
    out.append(
        f"| {row.name} | `{' '.join(suite_lib.flags(row))}` | {len(lines)} of "
        f"{len(row.seeds)} | {_mean_std([l['dev']['f1'] for l in lines])} | "
        f"{_test_cell(suite, row.name, lines)} | {best_epochs} | "
        f"{np.mean([l['steps_per_second'] for l in lines]):.2f} | "
        f"{f'{max(rss):.0f}' if rss else ''} |")
  if suite.comparisons:
    out += _comparisons(suite, rows, results_dir, resamples)
  if suite.interactions and not suite.dev_only:
    out += _interactions(suite, rows, results_dir, resamples)
  out += _alignment(suite, rows)
  return "\n".join(out) + "\n"


def figures(suite: suites_lib.Suite, results_dir: pathlib.Path) -> list[pathlib.Path]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = _by_row(suite_lib.read_lines(results_dir, suite.name))
  names = [r.name for r in suite.rows if rows.get(r.name)]
  if not names:
    return []
  split = "dev" if suite.dev_only else "test"
  fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(names), 3.2))
  for i, name in enumerate(names):
    f1 = 100 * np.array([line[split]["f1"] for line in rows[name].values()])
    ax.bar(i, f1.mean(), yerr=f1.std(ddof=1) if len(f1) > 1 else 0, capsize=4, color="C0")
    ax.plot(np.full(len(f1), i), f1, "k.", markersize=4)
  ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
  low = min(100 * min(l[split]["f1"] for l in rows[n].values()) for n in names)
  ax.set_ylim(max(0, low - 3), None)
  ax.set_ylabel(f"{split} F1 (%)")
  ax.set_title(f"{suite.name}: {split} F1 of the dev-selected checkpoint")
  fig.tight_layout()
  bars = results_dir / f"{suite.name}_{split}_f1.png"
  fig.savefig(bars, dpi=120)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(6, 3.5))
  for i, name in enumerate(names):
    for j, line in enumerate(rows[name].values()):
      curve = np.array(line["dev_curve"])
      ax.plot(curve[:, 0], 100 * curve[:, 1], color=f"C{i}", alpha=0.8,
              label=name if j == 0 else None)
  ax.set_xlabel("epoch")
  ax.set_ylabel("dev F1 (%)")
  ax.legend(fontsize=8)
  ax.set_title(f"{suite.name}: dev F1 per evaluation (one line per seed)")
  fig.tight_layout()
  curves = results_dir / f"{suite.name}_dev_curves.png"
  fig.savefig(curves, dpi=120)
  plt.close(fig)
  return [bars, curves]


def write_report(suite: suites_lib.Suite, results_dir: pathlib.Path,
                 resamples: int) -> list[pathlib.Path]:
  drawn = figures(suite, results_dir)
  page = results_dir / f"{suite.name}.md"
  page.write_text(tables(suite, results_dir, resamples)
                  + "".join(f"\n![{path.stem}]({path.name})\n" for path in drawn))
  return [page, *drawn]
