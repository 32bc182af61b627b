"""The run's metrics log (``metrics.jsonl``): one JSON record per line, each with its ``step``."""

import json
import pathlib


def rewind(path: pathlib.Path, step: int) -> None:
  """Keeps the records of steps up to ``step`` (the step a run resumes from; 0 for a fresh
  start), so that a resumed run logs every later step once. A line cut short by a killed
  write is dropped with them."""
  if not path.exists():
    return
  kept = []
  for line in path.read_text().splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    if record["step"] <= step:
      kept.append(line + "\n")
  path.write_text("".join(kept))
