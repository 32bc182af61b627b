"""A training run that meets one fault in its checkpoint writes, for tests/test_faults.py:

  python tests/fault_worker.py CONFIG_JSON WORKDIR FAULT

FAULT is one of
  none                   no fault;
  KIND:STEP:write        SIGKILL inside the first file write of the KIND (latest or best)
                         checkpoint of STEP;
  KIND:STEP:SECONDS      SIGKILL that many seconds after that checkpoint's save began;
  full:KIND:STEP         every file write of that checkpoint fails with ENOSPC (a full disk).
The run goes through `launch.run`, as the experiment scripts do.
"""

import errno
import json
import os
import signal
import sys
import threading

from etils import epath
import ml_collections

from shapca_jax import checkpoint
from shapca_jax import launch


def _kill():
  os.kill(os.getpid(), signal.SIGKILL)


def _fail_writes(kind: str, step: int, action):
  """Runs ``action`` instead of every text write under the checkpoint's temporary folder (the
  JSON items; the arrays go through tensorstore, which Python cannot intercept)."""
  marker = f"{os.sep}checkpoints{os.sep}{kind}{os.sep}{step}.orbax-checkpoint-tmp"
  write_text = epath.Path.write_text

  def write(self, *args, **kwargs):
    if marker in str(self):
      action()
    return write_text(self, *args, **kwargs)

  epath.Path.write_text = write


def _kill_after(kind: str, step: int, seconds: float):
  name = {"latest": "save_latest", "best": "save_best"}[kind]
  save = getattr(checkpoint.TrainCheckpointer, name)

  def timed(self, at_step, *args, **kwargs):
    if at_step == step:
      threading.Timer(seconds, _kill).start()
    return save(self, at_step, *args, **kwargs)

  setattr(checkpoint.TrainCheckpointer, name, timed)


def _disk_full():
  raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def main(config_json: str, workdir: str, fault: str):
  parts = fault.split(":")
  if parts[0] == "full":
    _fail_writes(parts[1], int(parts[2]), _disk_full)
  elif fault != "none":
    kind, step, when = parts
    if when == "write":
      _fail_writes(kind, int(step), _kill)
    else:
      _kill_after(kind, int(step), float(when))
  launch.run(ml_collections.ConfigDict(json.loads(config_json)), workdir)


if __name__ == "__main__":
  main(*sys.argv[1:])
