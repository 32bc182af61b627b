"""Mesh data parallelism and FSDP: the sharded step computes what one device computes on the
same global batch, and checkpoints move between meshes (8 devices -> 4 and -> 1).

The multi-device runs happen in fresh processes (tests/sharding_worker.py) with forced host
device counts; the reference is today's plain single-device jit of ``steps.train_step``.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from shapca_jax import sharding
import sharding_worker
import train_fixtures

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = pathlib.Path(sharding_worker.__file__)
RTOL = 1e-5
# Attention key biases get no gradient (softmax ignores a shift shared by all keys), so Adam
# turns rounding noise into steps of up to the learning rate whatever the device count; they are
# held to that bound instead of RTOL.
NO_GRADIENT = "['attention']['key']['bias']"


# ----------------------------------------------------------------------------- rules


@pytest.mark.parametrize("shape, fsdp, spec", [
    ((30522, 768), 4, P(None, "fsdp")),    # the vocabulary does not split in 4: the width does
    ((30522, 768), 2, P("fsdp")),          # the largest dimension when it divides
    ((768, 3072), 4, P(None, "fsdp")),
    ((3, 3, 768), 8, P(None, None, "fsdp")),
    ((7,), 2, P()),                        # no dimension divides: replicated
    ((), 4, P()),                          # scalars (step counts): replicated
    ((768, 3072), 1, P()),                 # no fsdp: plain data parallelism
])
def test_fsdp_splits_the_largest_dimension_it_divides(shape, fsdp, spec):
  assert sharding.fsdp_spec(shape, fsdp) == spec


def test_mesh_sizes_are_checked_against_the_devices():
  assert dict(sharding.make_mesh(-1, 1).shape) == {"data": 1, "fsdp": 1}
  assert dict(sharding.make_mesh(1, -1).shape) == {"data": 1, "fsdp": 1}
  with pytest.raises(ValueError, match=r"config.mesh.data=2 x config.mesh.fsdp=1 = 2 devices"):
    sharding.make_mesh(2, 1, key="config.mesh")
  with pytest.raises(ValueError, match=r"config.mesh.fsdp=0"):
    sharding.make_mesh(-1, 0, key="config.mesh")
  with pytest.raises(ValueError, match="only one of"):
    sharding.make_mesh(-1, -1)
  with pytest.raises(ValueError, match="do not split into groups of 2"):
    sharding.make_mesh(-1, 2)


def test_one_process_reads_every_row_of_the_global_batch():
  mesh = sharding.make_mesh()
  assert sharding.process_batch_shard(mesh) == (0, 1)
  local = {"x": np.arange(12.0).reshape(4, 3), "valid": np.array([True, True, False, True])}
  batch = sharding.global_batch(local, mesh)
  for name, value in local.items():
    assert batch[name].sharding == sharding.batch_sharding(mesh)
    np.testing.assert_array_equal(batch[name], value)


# ----------------------------------------------------------------------------- runs on 8 devices


def _worker(*args, devices: int) -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
  return subprocess.Popen([sys.executable, str(WORKER), *map(str, args)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> dict:
  stdout, stderr = proc.communicate(timeout=600)
  assert proc.returncode == 0, stderr[-4000:]
  return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, minilm_dir, embedded_data_dir):
  """The reference, the data-parallel and the FSDP run on 8 devices, then the FSDP run's
  checkpoint continued on 4 devices (data 2 x fsdp 2, another process) and on this process's
  single device, both at once."""
  out = tmp_path_factory.mktemp("sharding")
  bert = train_fixtures.write_tiny_bert(out / "bert", minilm_dir)
  common = (out, bert, embedded_data_dir)
  summary = _finish(_worker("train", *common, devices=8))
  on_four = _worker("resume", *common, 2, 2, devices=4)
  setup = sharding_worker.Setup(bert, embedded_data_dir)
  losses, state = sharding_worker.resume(setup, sharding.make_mesh(), out / "checkpoint")
  sharding_worker._record(out / "resumed_1x1.npz", losses, state.params)
  assert _finish(on_four) == {"devices": 4}
  return out, summary, setup.config


def _assert_same_run(actual: np.lib.npyio.NpzFile, expected: np.lib.npyio.NpzFile, config,
                     first_step: int = 0):
  np.testing.assert_allclose(actual["losses"], expected["losses"][first_step:], rtol=RTOL)
  assert sorted(actual.files) == sorted(expected.files)
  adam_bound = 2 * sharding_worker.STEPS * config.learning_rate.encoder
  for name in expected.files:
    if name == "losses":
      continue
    a, e = actual[name], expected[name]
    if NO_GRADIENT in name:
      assert np.max(np.abs(a - e)) <= adam_bound, name
    else:
      assert np.linalg.norm(a - e) <= RTOL * np.linalg.norm(e), name


def test_data_parallel_steps_equal_one_device(runs):
  out, summary, config = runs
  assert summary["devices"] == 8
  _assert_same_run(np.load(out / "data.npz"), np.load(out / "reference.npz"), config)


def test_fsdp_steps_equal_one_device_and_split_the_params(runs):
  out, summary, config = runs
  _assert_same_run(np.load(out / "fsdp.npz"), np.load(out / "reference.npz"), config)
  # data 2 x fsdp 4: a device holds a quarter of the params, plus the few small replicated ones.
  assert 0.25 <= summary["fsdp_param_fraction"] < 0.26
  assert summary["embedding_spec"] == str(P(None, "fsdp"))


@pytest.mark.parametrize("mesh", ["2x2", "1x1"])
def test_checkpoint_from_8_devices_continues_on_fewer(runs, mesh):
  out, _, config = runs
  _assert_same_run(np.load(out / f"resumed_{mesh}.npz"), np.load(out / "reference.npz"), config,
                   first_step=sharding_worker.RESUME_AT)
