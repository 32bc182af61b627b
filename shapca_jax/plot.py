"""PNG figures: the Shapley credit heat map of a batch and the training curves of a run.

  python -m shapca_jax.plot phi --predictions out.jsonl [--batch 0] --out phi.png
  python -m shapca_jax.plot curves --run workdirs/twitter17 --out curves.png

``phi`` reads the output of ``python -m shapca_jax.predict --explain`` and draws one batch's
matrix phi[i, j] (rows: the contexts, i.e. the players; columns: the texts whose games they
play), with each example's own context boxed on the diagonal. ``curves`` reads a run's
``metrics.jsonl`` (training losses per logged step, dev scores per evaluation; a resumed run's
replayed steps replace the first ones) and draws the losses above the dev P/R/F1.

Figures are exactly ``--width`` x ``--height`` pixels. Only matplotlib's Agg canvas is used, so
no display is needed.
"""

import argparse
import json
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
import numpy as np

from shapca_jax.data import errors
from shapca_jax.data.errors import DataFormatError, read_lines, where

DPI = 100
METRICS_FILE = "metrics.jsonl"  # train.METRICS_LOG, without importing the training stack
LABEL_CHARS = 32
# Cells get their value written in them up to this many players.
ANNOTATE_MAX = 10
LOSS_KEYS = ("loss", "task_loss", "align_loss")
DEV_KEYS = ("f1", "precision", "recall")


def _figure(width: int, height: int) -> Figure:
  if width < 100 or height < 100:
    raise ValueError(f"figures need at least 100 x 100 pixels, got {width} x {height}")
  return Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")


def _save(fig: Figure, path: str | os.PathLike) -> pathlib.Path:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=DPI, format="png")
  return path


def short(text: str, limit: int = LABEL_CHARS) -> str:
  """``text`` on one line, cut to ``limit`` characters with an ellipsis."""
  text = " ".join(text.split())
  return text if len(text) <= limit else text[:limit - 1] + "…"


# ----------------------------------------------------------------------------- heat map


def phi_heatmap(phi: np.ndarray, player_labels: Sequence[str], anchor_labels: Sequence[str],
                path: str | os.PathLike, *, width: int = 1000, height: int = 800,
                title: str = "Shapley credit of each context in each text's game") -> pathlib.Path:
  """Writes phi [players, anchors] as a PNG heat map; the diagonal (paired cells) is boxed."""
  phi = np.asarray(phi, np.float64)
  if phi.ndim != 2 or phi.shape != (len(player_labels), len(anchor_labels)):
    raise ValueError(f"phi has shape {phi.shape}, but there are {len(player_labels)} player "
                     f"and {len(anchor_labels)} anchor labels")
  fig = _figure(width, height)
  ax = fig.subplots()
  limit = float(np.max(np.abs(phi))) or 1.0
  image = ax.imshow(phi, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
  fig.colorbar(image, ax=ax, label="φ (Shapley value)")
  ax.set_xticks(range(phi.shape[1]), [short(s) for s in anchor_labels], rotation=60,
                ha="right", fontsize=7)
  ax.set_yticks(range(phi.shape[0]), [short(s) for s in player_labels], fontsize=7)
  ax.set_xlabel("anchor: the text whose game is played")
  ax.set_ylabel("player: context")
  ax.set_title(title, fontsize=10)
  for d in range(min(phi.shape)):
    ax.add_patch(Rectangle((d - 0.5, d - 0.5), 1, 1, fill=False, edgecolor="black", lw=1.5))
  if max(phi.shape) <= ANNOTATE_MAX:
    decimals = 2 if limit >= 0.1 else 3
    for (i, j), value in np.ndenumerate(phi):
      ax.text(j, i, f"{value:.{decimals}f}", ha="center", va="center", fontsize=7,
              color="white" if abs(value) > 0.6 * limit else "black")
  return _save(fig, path)


def read_jsonl(path: str | os.PathLike) -> list[tuple[int, dict[str, Any]]]:
  """(line number, object) of every non-blank line; a bad line is an error naming it."""
  records = []
  for number, line in enumerate(read_lines(path), start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as err:
      raise DataFormatError(f"{where(path, number)}: not valid JSON ({err.msg})") from err
    if not isinstance(record, dict):
      raise DataFormatError(f"{where(path, number)}: expected a JSON object")
    records.append((number, record))
  return records


def batch_phi(predictions: Sequence[tuple[int, dict[str, Any]]], batch: int,
              source: str = "predictions") -> tuple[np.ndarray, list[str], list[str]]:
  """phi [players, anchors] of one explained batch and the labels of its rows and columns.

  Players and anchors are the batch's examples in the order of their explanations; labels are
  ``id: context`` (players) and ``id: text`` (anchors).
  """
  members = []
  for number, record in predictions:
    explanation = record.get("explanation")
    if explanation is None:
      raise DataFormatError(f"{where(source, number)}: no 'explanation'; run predict with "
                            "--explain")
    if explanation["batch"] == batch:
      members.append((number, record))
  if not members:
    batches = sorted({r["explanation"]["batch"] for _, r in predictions})
    raise ValueError(f"{source} has no batch {batch}; it has batches {batches}")
  order = [c["id"] for c in members[0][1]["explanation"]["contexts"]]
  by_id = {record["id"]: record for _, record in members}
  if sorted(map(str, order)) != sorted(map(str, by_id)):
    raise DataFormatError(f"{where(source, members[0][0])}: the players of batch {batch} are "
                          f"not its examples")
  phi = np.zeros((len(order), len(order)))
  for j, anchor in enumerate(order):
    number, record = next((n, r) for n, r in members if r["id"] == anchor)
    players = [c["id"] for c in record["explanation"]["contexts"]]
    if players != order:
      raise DataFormatError(f"{where(source, number)}: players differ from the batch's")
    phi[:, j] = [c["phi"] for c in record["explanation"]["contexts"]]
  players = [f"{i}: {by_id[i]['context'] or ''}" for i in order]
  anchors = [f"{i}: {' '.join(by_id[i]['words'])}" for i in order]
  return phi, players, anchors


# ----------------------------------------------------------------------------- curves


def read_metrics(path: str | os.PathLike) -> tuple[dict[int, dict], dict[int, dict]]:
  """Training values by step and dev scores by step from a run's ``metrics.jsonl``."""
  train, dev = {}, {}
  for number, record in read_jsonl(path):
    if not isinstance(record.get("step"), int):
      raise DataFormatError(f"{where(path, number)}: expected an integer 'step'")
    if "dev" in record:
      dev[record["step"]] = record["dev"]
    elif "loss" in record:
      train[record["step"]] = record
    else:
      raise DataFormatError(f"{where(path, number)}: expected a training record ('loss') or "
                            "an evaluation ('dev')")
  if not train:
    raise DataFormatError(f"{path}: no training records")
  return train, dev


def training_curves(path: str | os.PathLike, out: str | os.PathLike, *, width: int = 900,
                    height: int = 700) -> pathlib.Path:
  """Writes the losses (top) and dev P/R/F1 (bottom) of ``metrics.jsonl`` at ``path``."""
  train, dev = read_metrics(path)
  fig = _figure(width, height)
  top, bottom = fig.subplots(2, 1, sharex=True)
  steps = sorted(train)
  for key in LOSS_KEYS:
    values = np.array([train[s].get(key, np.nan) for s in steps], np.float64)
    if np.any(values > 0):  # e.g. align_loss is all zeros without alignment
      top.plot(steps, values, label=key, lw=1)
  top.set_ylabel("training loss")
  top.set_yscale("log")
  top.legend(fontsize=8)
  top.set_title(f"{pathlib.Path(path).parent.name or path}", fontsize=10)
  dev_steps = sorted(dev)
  for key in DEV_KEYS:
    bottom.plot(dev_steps, [dev[s][key] for s in dev_steps], marker="o", label=f"dev {key}")
  bottom.set_xlabel("step")
  bottom.set_ylabel("dev score")
  bottom.set_ylim(0, 1)
  bottom.legend(fontsize=8)
  return _save(fig, out)


# ----------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m shapca_jax.plot", description=__doc__.split(
      "\n\n")[0])
  commands = parser.add_subparsers(dest="command", required=True)
  phi = commands.add_parser("phi", help="heat map of one explained batch")
  phi.add_argument("--predictions", required=True, help="output of predict --explain")
  phi.add_argument("--batch", type=int, default=0, help="which batch (explanation.batch)")
  curves = commands.add_parser("curves", help="training loss and dev scores of a run")
  curves.add_argument("--run", required=True, help="a run's workdir or its metrics.jsonl")
  for command, (width, height) in ((phi, (1000, 800)), (curves, (900, 700))):
    command.add_argument("--out", required=True, help="PNG file to write")
    command.add_argument("--width", type=int, default=width, help="pixels")
    command.add_argument("--height", type=int, default=height, help="pixels")
  return parser


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  size = dict(width=args.width, height=args.height)
  try:
    if args.command == "phi":
      phi, players, anchors = batch_phi(read_jsonl(args.predictions), args.batch,
                                        args.predictions)
      out = phi_heatmap(phi, players, anchors, args.out, **size)
    else:
      metrics = pathlib.Path(args.run)
      if metrics.is_dir():
        metrics = metrics / METRICS_FILE
      out = training_curves(metrics, args.out, **size)
  except (DataFormatError, ValueError) as err:
    print(f"error: {err}", file=sys.stderr)
    return errors.USAGE_EXIT_CODE
  print(out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
