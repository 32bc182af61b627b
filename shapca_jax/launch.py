"""What every experiment entry point does around `train_and_evaluate`: start the JAX
distributed runtime when launched as several processes, train, print a one-line summary, and
end an expected user error with one line on stderr and exit code 2."""

import difflib
import json
import logging
import os
import re
import sys
from collections.abc import Sequence

from absl import logging as absl_logging
import jax

from shapca_jax import checkpoint
from shapca_jax.config import ConfigError, default_config, flat_keys
from shapca_jax.data.errors import USAGE_EXIT_CODE, DataFormatError
from shapca_jax.train import train_and_evaluate

# Errors a user causes (bad files, a bad config, a workdir of another run, a missing folder, a
# full disk): their message says what to fix, so a traceback would only bury it.
USER_ERRORS = (DataFormatError, ConfigError, checkpoint.IncompatibleCheckpointError,
               checkpoint.UnreadableCheckpointError, checkpoint.CheckpointWriteError,
               FileNotFoundError)
DEBUG_ENV = "SHAPCA_DEBUG"  # set to 1 (or pass --debug) for tracebacks of user errors too


def debug_requested(flag: bool = False) -> bool:
  return flag or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def exit_with_error(message: str) -> None:
  """Ends the process with ``error: <message>`` on one line of stderr and exit code 2."""
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
  sys.exit(USAGE_EXIT_CODE)


_OVERRIDE = re.compile(r"^--?config\.([^=]+)")


def unknown_override(argv: Sequence[str]) -> str | None:
  """The message for the first ``--config.KEY`` of ``argv`` whose KEY is not in the config
  schema (``config.default_config``), naming the closest known key; None if all are known.

  ml_collections would report it as three chained tracebacks ending in ``AttributeError``.
  """
  known = flat_keys(default_config())
  for arg in argv[1:]:
    if arg == "--":
      break
    match = _OVERRIDE.match(arg)
    if match and match.group(1) not in known:
      key = match.group(1)
      closest = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.0)[0]
      return f"unknown config key {key!r} (in {arg!r}); the closest known key is {closest!r}"
  return None


class _OneLineOrbaxErrors(logging.Filter):
  """Drops the tracebacks Orbax logs with a failed background write (three per failure, each
  dozens of lines); its one-line messages stay, and ``CheckpointWriteError`` says the rest."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.exc_info and f"{os.sep}orbax{os.sep}" in record.pathname:
      record.exc_info, record.exc_text = None, None
    return True


_ORBAX_FILTER = _OneLineOrbaxErrors()


# Launchers JAX detects by itself: each sets the process count and index its own way.
CLUSTER_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES")
# A plain multi-process launch: JAX reads the coordinator's address from the environment but
# not the process count and index, which launch.py passes on from these two.
COORDINATOR_ENV, PROCESS_ENV = "JAX_COORDINATOR_ADDRESS", ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def distributed_args(environ: dict[str, str]) -> dict[str, int] | None:
  """`jax.distributed.initialize` keyword arguments for the launch ``environ`` describes, or
  None when it is one process. A plain launch (``JAX_COORDINATOR_ADDRESS`` outside SLURM, Open
  MPI and TPU pods) must set ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``; a missing or bad one
  is a ``ConfigError`` naming it."""
  cluster = any(environ.get(k) for k in CLUSTER_ENV)
  if not cluster and not environ.get(COORDINATOR_ENV):
    return None
  values = {}
  for name in PROCESS_ENV:
    text = environ.get(name, "")
    if not text:
      if cluster:
        continue
      raise ConfigError(f"{COORDINATOR_ENV} is set, so {name} must be too")
    try:
      values[name] = int(text)
    except ValueError:
      raise ConfigError(f"{name}={text!r} must be an integer") from None
  count, index = values.get(PROCESS_ENV[0]), values.get(PROCESS_ENV[1])
  if count is not None and count < 1:
    raise ConfigError(f"{PROCESS_ENV[0]}={count} must be >= 1")
  if index is not None and (index < 0 or (count is not None and index >= count)):
    raise ConfigError(f"{PROCESS_ENV[1]}={index} must be >= 0 and < {PROCESS_ENV[0]}={count}")
  return {"num_processes": count, "process_id": index}


def maybe_initialize_distributed() -> None:
  """`jax.distributed.initialize()` when launched as one of several processes, else nothing.

  TPU pods and SLURM / Open MPI launches are detected by JAX itself; other multi-node GPU
  launches set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID.
  """
  args = distributed_args(dict(os.environ))
  if args is not None:
    jax.distributed.initialize(**args)


def run(config, workdir: str, debug: bool = False) -> dict:
  """Trains and prints the summary; a ``USER_ERRORS`` error exits with one line (code 2)
  unless ``debug`` or the environment variable ``SHAPCA_DEBUG`` asks for its traceback."""
  debug = debug_requested(debug)
  # Orbax reports every checkpoint step at INFO; the progress bar already tells the story.
  absl_logging.set_verbosity(absl_logging.WARNING)
  if not debug:
    logging.getLogger("absl").addFilter(_ORBAX_FILTER)  # Orbax logs through absl
  try:
    maybe_initialize_distributed()
    results = train_and_evaluate(config, workdir)
  except USER_ERRORS as err:
    if debug:
      raise
    exit_with_error(str(err))
  summary = {split: {k: round(results[split][k], 4) for k in ("precision", "recall", "f1")}
             for split in ("dev", "test")}
  if "entity" in results["test"]:  # JMERE: entity scores beside the quintuple scores
    summary["test_entity_f1"] = round(results["test"]["entity"]["f1"], 4)
  print(json.dumps({"workdir": workdir, "best_step": results["best_step"], **summary,
                    "steps_per_second": results["steps_per_second"],
                    "wall_seconds": round(results["wall_seconds"], 1)}))
  return results
