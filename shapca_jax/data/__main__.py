"""Command line of the data layer.

  python -m shapca_jax.data inspect DATASET --data_dir DIR [--contexts NAME[,NAME...]]
      [--tokenizer DIR] [--missing_context empty|error]

prints one JSON object with per-split counts, label counts, context coverage and token-length
percentiles (see `shapca_jax.data.summary`).
"""

import argparse
import json
import sys

from shapca_jax.data import readers, summary
from shapca_jax.data import errors
from shapca_jax.data.errors import DataFormatError


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m shapca_jax.data")
  commands = parser.add_subparsers(dest="command", required=True)
  inspect = commands.add_parser("inspect", help="print statistics of a data set as one JSON object")
  inspect.add_argument("dataset", choices=readers.DATASETS)
  inspect.add_argument("--data_dir", required=True,
                       help="folder holding the data set folders (e.g. data or ../shared/data)")
  inspect.add_argument("--contexts", default=None,
                       help="comma-separated context sources (names or .jsonl paths), or 'none'; "
                            "default: every built-in source present")
  inspect.add_argument("--tokenizer", default=None,
                       help="tokenizer checkpoint folder (default: installed all-MiniLM-L6-v2)")
  inspect.add_argument("--missing_context", choices=("empty", "error"), default="empty",
                       help="empty: count examples without context; error: stop at the first")
  return parser


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  sources = None
  if args.contexts is not None:
    sources = [] if args.contexts == "none" else args.contexts.split(",")
  try:
    result = summary.summarize(args.dataset, args.data_dir, sources=sources,
                               tokenizer_dir=args.tokenizer, missing_context=args.missing_context)
  except (DataFormatError, FileNotFoundError, ValueError) as err:
    print(f"error: {err}", file=sys.stderr)
    return errors.USAGE_EXIT_CODE
  print(json.dumps(result, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
