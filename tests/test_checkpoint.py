"""TrainCheckpointer: round trips, retention, best tracking, killed saves, resume rules, meshes."""

import errno
import os
import pathlib
import re
import subprocess
import sys
import textwrap
import time

from etils import epath
import flax.linen as nn
from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from shapca_jax import checkpoint

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = {"lr": 1e-3, "model": {"heads": 2, "fusion": "adaptive"}, "log_every": 10}


def _state(seed=0):
  """A TrainState after one AdamW update, so the optimizer moments are not trivial."""
  model = nn.Dense(3)
  params = model.init(jax.random.key(seed), jnp.ones((1, 4)))["params"]
  state = train_state.TrainState.create(apply_fn=model.apply, params=params,
                                        tx=optax.adamw(1e-2))
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5 + seed), params)
  return state.apply_gradients(grads=grads)


def _assert_trees_equal(actual, expected):
  """Same leaf paths and values (paths, not treedefs: a TrainState's apply_fn is static)."""
  actual, expected = (jax.tree_util.tree_leaves_with_path(t) for t in (actual, expected))
  assert [path for path, _ in actual] == [path for path, _ in expected]
  for (path, a), (_, e) in zip(actual, expected):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(e), err_msg=jax.tree_util.keystr(path))


def _steps_on_disk(workdir, kind="latest"):
  """Finished step folders, read from the file system rather than through Orbax."""
  folder = pathlib.Path(workdir) / "checkpoints" / kind
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def _open(workdir, config=CONFIG, **kwargs):
  kwargs.setdefault("save_every_steps", 2)
  return checkpoint.TrainCheckpointer(workdir, config, **kwargs)


@pytest.mark.parametrize("writer_thread", [True, False])
def test_round_trip_of_state_data_and_rng(tmp_path, writer_thread):
  state, rng = _state(), jax.random.fold_in(jax.random.key(7), 3)
  data_state = {"next_index": 17, "epoch": 1, "shuffle": [3, 1, 2]}
  with _open(tmp_path, writer_thread=writer_thread) as ckpt:
    assert ckpt.restore_latest(jax.eval_shape(lambda: state)) is None
    ckpt.save_latest(4, state, data_state=data_state, rng=rng)

  abstract = jax.eval_shape(_state)
  for restore in (lambda: _open(tmp_path).restore_latest(abstract),
                  lambda: checkpoint.restore_latest(tmp_path, abstract)):
    restored = restore()
    assert restored.step == 4
    _assert_trees_equal(restored.state, state)
    assert int(restored.state.step) == 1
    assert restored.data_state == data_state
    np.testing.assert_array_equal(jax.random.key_data(restored.rng), jax.random.key_data(rng))
    np.testing.assert_array_equal(jax.random.normal(restored.rng, (3,)),
                                  jax.random.normal(rng, (3,)))
    assert restored.metadata["config"]["model.heads"] == 2


def test_raw_uint32_key_and_bytes_data_state(tmp_path):
  params = {"w": jnp.arange(6.0).reshape(2, 3)}
  with _open(tmp_path) as ckpt:
    ckpt.save_latest(2, params, data_state=b'{"pos": 5}\x00\xff', rng=jax.random.PRNGKey(3))
  restored = checkpoint.restore_latest(tmp_path, params)
  assert restored.data_state == b'{"pos": 5}\x00\xff'
  assert restored.rng.dtype == jnp.uint32
  np.testing.assert_array_equal(restored.rng, jax.random.PRNGKey(3))


def test_keeps_the_last_few_and_saves_on_the_interval(tmp_path):
  with _open(tmp_path, save_every_steps=3, keep_latest=2) as ckpt:
    assert [s for s in range(1, 10) if ckpt.should_save(s)] == [3, 6, 9]
    for step in (3, 6, 9):
      ckpt.save_latest(step, {"w": jnp.full((2,), float(step))})
  assert _steps_on_disk(tmp_path) == [6, 9]
  restored = checkpoint.restore_latest(tmp_path, {"w": jnp.zeros((2,))})
  assert restored.step == 9
  np.testing.assert_array_equal(restored.state["w"], [9.0, 9.0])


def test_best_is_kept_apart_and_survives_reopening(tmp_path):
  params_at = lambda step: {"w": jnp.full((3,), float(step))}
  f1_at = {10: 0.40, 20: 0.55, 30: 0.50, 40: float("nan"), 50: 0.55}
  with _open(tmp_path) as ckpt:
    saved = {step: ckpt.save_best(step, params_at(step), {"f1": f1, "precision": 0.1})
             for step, f1 in f1_at.items()}
    assert saved == {10: True, 20: True, 30: False, 40: False, 50: False}
    assert ckpt.best == {"metric": "f1", "mode": "max", "value": 0.55, "step": 20}
    ckpt.save_latest(50, params_at(50))
  assert _steps_on_disk(tmp_path, "best") == [20]
  np.testing.assert_array_equal(checkpoint.restore_best(tmp_path, params_at(0))["w"], [20.0] * 3)
  meta = checkpoint.best_metadata(tmp_path)
  assert (meta["step"], meta["metrics"]) == (20, {"f1": 0.55, "precision": 0.1})
  assert meta["config"] == {"lr": 1e-3, "model.heads": 2, "model.fusion": "adaptive",
                            "log_every": 10}
  # The latest checkpoint records the best so far; a reopened run keeps ranking against it.
  assert checkpoint.restore_latest(tmp_path, params_at(0)).metadata["best"]["step"] == 20
  with _open(tmp_path) as ckpt:
    ckpt.restore_latest(params_at(0))
    assert ckpt.best["value"] == 0.55
    assert not ckpt.save_best(60, params_at(60), {"f1": 0.54})
    assert ckpt.save_best(70, params_at(70), {"f1": 0.56})
  assert _steps_on_disk(tmp_path, "best") == [70]
  with pytest.raises(KeyError, match="'f1' is not among the metrics"):
    _open(tmp_path / "other").save_best(1, params_at(1), {"accuracy": 1.0})


def _tree_on_disk(folder: pathlib.Path) -> dict[str, tuple[int, int]]:
  return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size)
          for p in folder.rglob("*")}


def test_readers_change_nothing_on_disk_and_warn_about_nothing(tmp_path, caplog):
  params = {"w": jnp.arange(3.0)}
  with _open(tmp_path) as ckpt:
    ckpt.save_latest(2, params)
    ckpt.save_best(2, params, {"f1": 0.5})
  before = _tree_on_disk(tmp_path)
  with caplog.at_level("WARNING"):
    np.testing.assert_array_equal(checkpoint.restore_best(tmp_path, params)["w"], [0, 1, 2])
    assert checkpoint.restore_latest(tmp_path, params).step == 2
  assert _tree_on_disk(tmp_path) == before
  assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == []


def test_no_best_checkpoint_is_an_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="no best checkpoint"):
    checkpoint.best_metadata(tmp_path)


def test_best_in_min_mode(tmp_path):
  with _open(tmp_path, best_metric="loss", best_mode="min") as ckpt:
    for step, loss in ((1, 2.0), (2, 1.0), (3, 1.5)):
      ckpt.save_best(step, {"w": jnp.full((1,), float(step))}, {"loss": loss})
  np.testing.assert_array_equal(checkpoint.restore_best(tmp_path, {"w": jnp.zeros(1)})["w"], [2.0])
  with pytest.raises(checkpoint.IncompatibleCheckpointError, match="ranks by min loss"):
    _open(tmp_path)


_KILLED_SAVE = """
import os, signal, sys
import jax.numpy as jnp
from shapca_jax import checkpoint
ckpt = checkpoint.TrainCheckpointer(sys.argv[1], {"lr": 0.1}, save_every_steps=1)
ckpt.restore_latest({"w": jnp.zeros((2048, 2048))})
ckpt.save_latest(1, {"w": jnp.ones((2048, 2048))}, data_state={"pos": 1})
ckpt.wait_until_finished()
ckpt.save_latest(2, {"w": jnp.full((2048, 2048), 2.0)}, data_state={"pos": 2})
folder = ckpt._latest.directory
while not list(folder.glob("2.orbax-checkpoint-tmp*")):  # the writer thread has begun step 2
  pass
os.kill(os.getpid(), signal.SIGKILL)  # while the 16 MB of step 2 are being written
"""


def _run_python(source, *args, device_count=1):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
             XLA_FLAGS=f"--xla_force_host_platform_device_count={device_count}")
  return subprocess.run([sys.executable, "-c", textwrap.dedent(source), *map(str, args)],
                        env=env, capture_output=True, text=True, timeout=120)


def test_killed_save_leaves_the_previous_checkpoint_usable(tmp_path):
  result = _run_python(_KILLED_SAVE, tmp_path)
  assert result.returncode == -9, result.stderr[-2000:]
  latest_dir = tmp_path / "checkpoints" / "latest"
  assert [p.name for p in latest_dir.glob("2.orbax-checkpoint-tmp*")], os.listdir(latest_dir)
  assert _steps_on_disk(tmp_path) == [1]

  abstract = {"w": jax.ShapeDtypeStruct((2048, 2048), jnp.float32)}
  with checkpoint.TrainCheckpointer(tmp_path, {"lr": 0.1}, save_every_steps=1) as ckpt:
    restored = ckpt.restore_latest(abstract)
    assert (restored.step, restored.data_state) == (1, {"pos": 1})
    np.testing.assert_array_equal(restored.state["w"], 1.0)
    ckpt.save_latest(2, {"w": jnp.full((2048, 2048), 3.0)}, data_state={"pos": 2})
  assert not list(latest_dir.glob("*tmp*"))
  assert checkpoint.restore_latest(tmp_path, abstract).state["w"][0, 0] == 3.0


def test_incompatible_config_names_the_keys(tmp_path):
  with _open(tmp_path) as ckpt:
    ckpt.save_latest(2, {"w": jnp.ones(2)})
  changed = {"lr": 3e-5, "model": {"heads": 4, "fusion": "adaptive"}, "log_every": 50,
             "seed": 1}
  with pytest.raises(checkpoint.IncompatibleCheckpointError) as error:
    _open(tmp_path, config=changed)
  message = str(error.value)
  for key in ("lr (checkpoint 0.001, now 3e-05)", "model.heads (checkpoint 2, now 4)",
              "log_every", "seed (not in the checkpoint"):
    assert key in message
  assert "model.fusion" not in message
  # Listed keys may change; an ml_collections ConfigDict flattens like the dict it holds.
  with _open(tmp_path, config=ml_collections.ConfigDict(dict(CONFIG, log_every=50)),
             resume_ignore_keys=["log_*"]) as ckpt:
    assert ckpt.restore_latest({"w": jnp.zeros(2)}).step == 2


def test_a_key_added_to_the_schema_resumes_at_its_default_only(tmp_path):
  with _open(tmp_path) as ckpt:
    ckpt.save_latest(2, {"w": jnp.ones(2)})
  defaults = {**CONFIG, "model": {**CONFIG["model"], "new_switch": False}}
  with _open(tmp_path, config=defaults, schema_defaults=defaults) as ckpt:
    assert ckpt.restore_latest({"w": jnp.zeros(2)}).step == 2
  changed = {**CONFIG, "model": {**CONFIG["model"], "new_switch": True}}
  with pytest.raises(checkpoint.IncompatibleCheckpointError,
                     match=r"model.new_switch \(not in the checkpoint; now True\)"):
    _open(tmp_path, config=changed, schema_defaults=defaults)


def test_nothing_is_silently_overwritten(tmp_path):
  with _open(tmp_path) as ckpt:
    ckpt.save_latest(4, {"w": jnp.ones(2)})
  with _open(tmp_path) as ckpt:
    with pytest.raises(RuntimeError, match="call restore_latest"):
      ckpt.save_latest(6, {"w": jnp.zeros(2)})
    with pytest.raises(RuntimeError, match="call restore_latest"):
      ckpt.save_best(6, {"w": jnp.zeros(2)}, {"f1": 1.0})
    ckpt.restore_latest({"w": jnp.zeros(2)})
    with pytest.raises(ValueError, match="refusing to overwrite"):
      ckpt.save_latest(4, {"w": jnp.zeros(2)})
  np.testing.assert_array_equal(checkpoint.restore_latest(tmp_path, {"w": jnp.zeros(2)}).state["w"],
                                [1.0, 1.0])


def test_non_finite_state_is_refused(tmp_path):
  with _open(tmp_path) as ckpt:
    ckpt.save_latest(2, {"w": jnp.ones(2), "step": jnp.int32(2)})
    with pytest.raises(checkpoint.NonFiniteStateError, match=r"step 4: NaN/inf in \['w'\]"):
      ckpt.save_latest(4, {"w": jnp.array([1.0, jnp.nan]), "step": jnp.int32(4)})
    with pytest.raises(checkpoint.NonFiniteStateError, match="best params"):
      ckpt.save_best(4, {"w": jnp.array([jnp.inf])}, {"f1": 0.9})
  assert _steps_on_disk(tmp_path) == [2]
  assert _steps_on_disk(tmp_path, "best") == []


def test_saves_compile_nothing_after_compile_checks(tmp_path):
  """The NaN/inf check is compiled beside the train step, not inside the loop's first save."""
  compiled = []

  def listener(event, seconds, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      compiled.append(seconds)

  # Leaf shapes no other test uses, so nothing is already in the compilation cache.
  state = {"w": jnp.ones((3, 5, 7)), "b": jnp.zeros((11,)), "step": jnp.int32(2)}
  with _open(tmp_path) as ckpt:
    ckpt.compile_checks(state, {"w": state["w"]})
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
      ckpt.save_latest(2, state)
      ckpt.save_best(2, {"w": state["w"]}, {"f1": 0.5})
      ckpt.wait_until_finished()
    finally:
      jax.monitoring.unregister_event_duration_listener(listener)
  assert compiled == []


def test_a_save_keeps_the_values_it_was_given_when_the_next_step_donates_them(tmp_path):
  """Saves write in the background from a device copy: a donating step that reuses the saved
  arrays' buffers at once must not change what lands on disk."""
  overwrite = jax.jit(lambda tree: jax.tree.map(lambda x: x * 0 + 7, tree), donate_argnums=0)
  state = {"w": jnp.arange(4096.0), "step": jnp.int32(2)}
  params = {"w": jnp.arange(4096.0) * 2}
  with _open(tmp_path) as ckpt:
    ckpt.save_best(2, params, {"f1": 0.5})
    ckpt.save_latest(2, state)
    state, params = overwrite(state), overwrite(params)
    jax.block_until_ready((state, params))
  np.testing.assert_array_equal(checkpoint.restore_latest(tmp_path, state).state["w"],
                                np.arange(4096.0))
  np.testing.assert_array_equal(checkpoint.restore_best(tmp_path, params)["w"],
                                np.arange(4096.0) * 2)


def test_data_state_from_another_process_count_is_an_error(tmp_path):
  with _open(tmp_path) as ckpt:
    ckpt.save_latest(2, {"w": jnp.ones(2)}, data_state={"pos": 1})
  data_dir = tmp_path / "checkpoints" / "latest" / "2" / "data"
  (data_dir / "process_0-of-1.json").rename(data_dir / "process_0-of-2.json")
  with pytest.raises(ValueError, match="different number of processes"):
    checkpoint.restore_latest(tmp_path, {"w": jnp.zeros(2)})


_ON_FOUR_DEVICES = """
import sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from shapca_jax import checkpoint
assert jax.device_count() == 4
mesh = Mesh(np.asarray(jax.devices()), ("data",))
shardings = {"w": NamedSharding(mesh, P("data", None)), "b": NamedSharding(mesh, P())}
abstract = {k: jax.ShapeDtypeStruct(s, jnp.float32, sharding=shardings[k])
            for k, s in (("w", (8, 3)), ("b", (3,)))}
with checkpoint.TrainCheckpointer(sys.argv[1], {"lr": 0.1}, save_every_steps=1) as ckpt:
  restored = ckpt.restore_latest(abstract)
  assert restored.step == 1
  assert restored.state["w"].sharding == shardings["w"]
  assert len({s.device for s in restored.state["w"].addressable_shards}) == 4
  np.testing.assert_array_equal(restored.state["w"], np.arange(24.0).reshape(8, 3))
  ckpt.save_latest(2, jax.tree.map(lambda x: x * 10, restored.state))
print("ok")
"""


def test_restores_across_meshes(tmp_path):
  state = {"w": jnp.arange(24.0).reshape(8, 3), "b": jnp.ones(3)}
  with checkpoint.TrainCheckpointer(tmp_path, {"lr": 0.1}, save_every_steps=1) as ckpt:
    ckpt.save_latest(1, state)
  result = _run_python(_ON_FOUR_DEVICES, tmp_path, device_count=4)  # 1 device -> 4
  assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
  single = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # 4 devices -> 1
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=single),
                          state)
  restored = checkpoint.restore_latest(tmp_path, abstract)
  assert restored.step == 2 and restored.state["w"].sharding == single
  _assert_trees_equal(restored.state, jax.tree.map(lambda x: x * 10, state))


def test_relative_workdir_is_resolved(tmp_path, monkeypatch):
  # Orbax rejects relative checkpoint paths; a run started with `--workdir workdirs/x` must work.
  monkeypatch.chdir(tmp_path)
  state = {"w": jnp.arange(3.0)}
  with checkpoint.TrainCheckpointer("relative_run", {"a": 1}, save_every_steps=1, async_save=False) as c:
    c.save_latest(1, state)
    assert c.save_best(1, state, {"f1": 0.5})
  restored = checkpoint.restore_latest("relative_run", state)
  np.testing.assert_array_equal(restored.state["w"], state["w"])
  np.testing.assert_array_equal(checkpoint.restore_best("relative_run", state)["w"], state["w"])


@pytest.mark.parametrize("writer_thread", [True, False])  # False: as with several processes
def test_a_lost_write_is_an_error_at_the_next_save(tmp_path, monkeypatch, writer_thread):
  # Orbax logs a failed background write and carries on; the next save must refuse to go on.
  state = {"w": jnp.arange(3.0)}
  with checkpoint.TrainCheckpointer(tmp_path, {"a": 1}, save_every_steps=1,
                                    writer_thread=writer_thread) as c:
    c.save_latest(1, state)
    c.wait_until_finished()
    monkeypatch.setattr(c._latest, "save", lambda *args, **kwargs: None)  # writes nothing
    c.save_latest(2, state)
    while c._writes.unfinished_tasks:
      time.sleep(0.01)
    with pytest.raises(checkpoint.CheckpointWriteError, match="step 2"):
      c.save_latest(3, state)


# ------------------------------------------------------------------------ damage and full disks


def _damage(step_dir, how):
  if how == "meta deleted":
    (step_dir / "meta" / "metadata").unlink()
  elif how == "array file cut short":
    biggest = max((p for p in (step_dir / "state").rglob("*") if p.is_file()),
                  key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[:biggest.stat().st_size // 2])
  else:  # "data state cut short"
    (step_dir / "data" / "process_0-of-1.json").write_text('{"pos": ')


@pytest.mark.parametrize("how", ["meta deleted", "array file cut short", "data state cut short"])
def test_an_unreadable_latest_step_falls_back_to_the_one_before(tmp_path, how, caplog):
  w = lambda step: {"w": jnp.arange(1000.0) * step}
  with _open(tmp_path) as ckpt:
    ckpt.save_latest(2, w(2), data_state={"pos": 2})
    ckpt.save_latest(4, w(4), data_state={"pos": 4})
  folder = tmp_path.resolve() / "checkpoints" / "latest"
  _damage(folder / "4", how)

  restored = checkpoint.restore_latest(tmp_path, w(0))
  assert (restored.step, restored.data_state, restored.path) == (2, {"pos": 2}, str(folder / "2"))
  np.testing.assert_array_equal(restored.state["w"], w(2)["w"])
  assert f"latest checkpoint {folder / '4'} is unreadable (" in caplog.text
  # The run resumes from step 2 and saves past the damaged step, which is set aside.
  with _open(tmp_path) as ckpt:
    assert ckpt.restore_latest(w(0)).step == 2
    ckpt.save_latest(4, w(40))
  assert _steps_on_disk(tmp_path) == [2, 4] and (folder / "4.unreadable").is_dir()
  np.testing.assert_array_equal(checkpoint.restore_latest(tmp_path, w(0)).state["w"], w(40)["w"])


def test_no_readable_step_is_one_error_naming_the_folder(tmp_path):
  with _open(tmp_path) as ckpt:
    ckpt.save_latest(2, {"w": jnp.ones(3)})
    ckpt.save_latest(4, {"w": jnp.ones(3)})
    ckpt.save_best(4, {"w": jnp.ones(3)}, {"f1": 0.5})
  root = tmp_path.resolve() / "checkpoints"
  for step in (2, 4):
    _damage(root / "latest" / str(step), "data state cut short")
  message = (rf"^{re.escape(str(root / 'latest'))}: no readable latest checkpoint "
             r"\(step 4: .*step 2: ")
  with pytest.raises(checkpoint.UnreadableCheckpointError, match=message):
    checkpoint.restore_latest(tmp_path, {"w": jnp.zeros(3)})
  with pytest.raises(checkpoint.UnreadableCheckpointError, match=message):
    with _open(tmp_path) as ckpt:
      ckpt.restore_latest({"w": jnp.zeros(3)})
  assert _steps_on_disk(tmp_path) == [2, 4]  # nothing is set aside when nothing is readable
  _damage(root / "best" / "4", "meta deleted")
  with pytest.raises(checkpoint.UnreadableCheckpointError,
                     match=rf"^{re.escape(str(root / 'best'))}: no readable best checkpoint"):
    checkpoint.restore_best(tmp_path, {"w": jnp.zeros(3)})


def _failing_writes(monkeypatch, file_name, error):
  """Every text write of ``file_name`` inside the temporary folder of step 2 raises ``error``
  (the JSON items; tensorstore's array writes are out of Python's reach)."""
  write_text = epath.Path.write_text

  def write(self, *args, **kwargs):
    if self.name == file_name and f"{os.sep}2.orbax-checkpoint-tmp" in str(self):
      raise error
    return write_text(self, *args, **kwargs)

  monkeypatch.setattr(epath.Path, "write_text", write)


@pytest.mark.parametrize("writer_thread", [True, False])
@pytest.mark.parametrize("file_name,error", [
    ("process_0-of-1.json", OSError(errno.ENOSPC, "No space left on device")),  # while saving
    ("metadata", OSError(errno.ENOSPC, "No space left on device")),  # in the background
    ("metadata", PermissionError(errno.EACCES, "Permission denied"))])
def test_a_failed_write_stops_at_once_naming_step_folder_and_reason(tmp_path, monkeypatch,
                                                                     file_name, error,
                                                                     writer_thread):
  state = {"w": jnp.arange(3.0)}
  folder = tmp_path.resolve() / "checkpoints" / "latest"
  with _open(tmp_path, save_every_steps=1, writer_thread=writer_thread) as ckpt:
    ckpt.save_latest(1, state)
    ckpt.wait_until_finished()
    _failing_writes(monkeypatch, file_name, error)
    with pytest.raises(checkpoint.CheckpointWriteError) as raised:
      ckpt.save_latest(2, state)
      for _ in range(500):  # what the training loop calls every step; it never blocks
        ckpt.check_writes()
        time.sleep(0.01)
  assert str(raised.value) == (
      f"could not write the checkpoint of step 2 to {folder} ({type(error).__name__}: {error}); "
      "the earlier checkpoints there are kept")
  assert _steps_on_disk(tmp_path) == [1]
  assert checkpoint.restore_latest(tmp_path, state).step == 1
