"""PNG figures: real PNG files of the requested size, built from the right numbers."""

import json

import numpy as np
from PIL import Image
import pytest

from shapca_jax import plot
from shapca_jax.data.errors import DataFormatError


def _png(path):
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  with Image.open(path) as image:
    image.load()
    return image.format, image.size, np.asarray(image.convert("RGB"))


def _explained(phi: np.ndarray, ids, batch: int):
  """Prediction records whose explanations hold the columns of ``phi``."""
  return [{"id": anchor, "words": ["text", str(anchor)], "context": f"context {anchor}",
           "explanation": {"batch": batch, "own_context": phi[j, j],
                           "contexts": [{"id": p, "phi": phi[i, j]} for i, p in enumerate(ids)]}}
          for j, anchor in enumerate(ids)]


def test_phi_heat_map_is_a_png_of_the_stated_size(tmp_path):
  rng = np.random.default_rng(0)
  phi = rng.normal(size=(6, 6))
  ids = ["a", 7, "c", "d", "e", "f"]
  other = rng.normal(size=(3, 3))
  records = _explained(phi, ids, batch=1) + _explained(other, ["x", "y", "z"], batch=2)
  records = [records[i] for i in rng.permutation(len(records))]
  path = tmp_path / "predictions.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in records))

  got, players, anchors = plot.batch_phi(plot.read_jsonl(path), batch=1)
  np.testing.assert_array_equal(got, phi)  # rows and columns in the order of the players
  assert players[1] == "7: context 7" and anchors[1] == "7: text 7"

  out = tmp_path / "fig" / "phi.png"
  assert plot.main(["phi", "--predictions", str(path), "--batch", "1", "--out", str(out),
                    "--width", "640", "--height", "480"]) == 0
  fmt, size, pixels = _png(out)
  assert (fmt, size) == ("PNG", (640, 480))
  red = (pixels[..., 0] > 150) & (pixels[..., 2] < 100)
  blue = (pixels[..., 2] > 150) & (pixels[..., 0] < 100)
  assert red.any() and blue.any()  # both signs of phi are drawn

  assert plot.main(["phi", "--predictions", str(path), "--batch", "5", "--out", str(out)]) == 2


def test_heat_map_rejects_mismatched_labels(tmp_path):
  with pytest.raises(ValueError, match="3 player and 2 anchor labels"):
    plot.phi_heatmap(np.zeros((3, 3)), ["a", "b", "c"], ["a", "b"], tmp_path / "x.png")


def _metrics_log(path):
  lines = [{"step": s, "loss": 2.0 / s, "task_loss": 1.5 / s, "align_loss": 0.5 / s}
           for s in range(1, 9)]
  lines.insert(5, {"step": 4, "epoch": 1.0, "dev": {"precision": 0.2, "recall": 0.1, "f1": 0.13}})
  lines += [{"step": 7, "loss": 9.0, "task_loss": 8.0, "align_loss": 1.0},  # resumed run
            {"step": 8, "epoch": 2.0, "dev": {"precision": 0.4, "recall": 0.3, "f1": 0.34}}]
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps(r) + "\n" for r in lines))
  return path


def test_training_curves_are_a_png_of_the_stated_size(tmp_path):
  log = _metrics_log(tmp_path / "run" / "metrics.jsonl")
  train, dev = plot.read_metrics(log)
  assert sorted(train) == list(range(1, 9)) and train[7]["loss"] == 9.0
  assert dev == {4: {"precision": 0.2, "recall": 0.1, "f1": 0.13},
                 8: {"precision": 0.4, "recall": 0.3, "f1": 0.34}}
  out = tmp_path / "curves.png"
  assert plot.main(["curves", "--run", str(tmp_path / "run"), "--out", str(out),
                    "--width", "500", "--height", "400"]) == 0
  fmt, size, pixels = _png(out)
  assert (fmt, size) == ("PNG", (500, 400))
  assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10  # lines, not a blank canvas


def test_malformed_metrics_line_names_its_line(tmp_path):
  log = tmp_path / "metrics.jsonl"
  log.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": \n')
  with pytest.raises(DataFormatError, match="metrics.jsonl:2: not valid JSON"):
    plot.read_metrics(log)
  log.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lr": 0.1}\n')
  with pytest.raises(DataFormatError, match="metrics.jsonl:2: expected a training record"):
    plot.read_metrics(log)
