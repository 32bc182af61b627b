"""What every experiment entry point does around `train_and_evaluate`: start the JAX
distributed runtime when launched as several processes, train, print a one-line summary."""

import json
import os

from absl import logging as absl_logging
import jax

from shapca_jax.train import train_and_evaluate


def maybe_initialize_distributed() -> None:
  """`jax.distributed.initialize()` when launched as one of several processes, else nothing.

  TPU pods and SLURM / Open MPI launches are detected by JAX itself; other multi-node GPU
  launches set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID.
  """
  launched = any(os.environ.get(k) for k in (
      "JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"))
  if launched:
    jax.distributed.initialize()


def run(config, workdir: str) -> dict:
  # Orbax reports every checkpoint step at INFO; the progress bar already tells the story.
  absl_logging.set_verbosity(absl_logging.WARNING)
  maybe_initialize_distributed()
  results = train_and_evaluate(config, workdir)
  summary = {split: {k: round(results[split][k], 4) for k in ("precision", "recall", "f1")}
             for split in ("dev", "test")}
  if "entity" in results["test"]:  # JMERE: entity scores beside the quintuple scores
    summary["test_entity_f1"] = round(results["test"]["entity"]["f1"], 4)
  print(json.dumps({"workdir": workdir, "best_step": results["best_step"], **summary,
                    "steps_per_second": results["steps_per_second"],
                    "wall_seconds": round(results["wall_seconds"], 1)}))
  return results
