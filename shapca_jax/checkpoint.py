"""Checkpoints of a training run: the latest state for resuming, the best params for evaluation.

A thin layer over ``orbax.checkpoint.CheckpointManager`` (orbax-checkpoint 0.11.30 - 0.12.x)
that fixes the resume rules the training loop relies on. Layout under ``<workdir>/checkpoints``:

  latest/<step>/state   the train state (params, optimizer state, ...) as sharded arrays
  latest/<step>/data    the data-iterator state, one JSON file per process
  latest/<step>/meta    JSON: config, RNG key, best metric so far
  best/<step>/params    params of the best evaluation so far (on ``best_metric``)
  best/<step>/meta      JSON: config, the metric values of that evaluation

Orbax writes every step into a temporary directory and renames it when complete, so a save
killed midway leaves only a ``*.orbax-checkpoint-tmp*`` folder that is ignored and deleted on
the next start; the previous step stays the latest. A step damaged after it was written (a file
cut short or deleted) is skipped with a warning naming the step and the reason, and the next
older kept step is restored; ``TrainCheckpointer`` renames the damaged one ``<step>.unreadable``
so the run can save past it. A background write that fails (a full disk, no permission) raises
``CheckpointWriteError`` naming the step, the folder and the reason at the next training step.

Resume rules:
  * A run started again in the same workdir continues from the latest step
    (``TrainCheckpointer.restore_latest``); saving into a workdir that holds checkpoints before
    restoring them is an error, and so is saving a step at or below the latest one, so nothing
    is silently overwritten.
  * If the stored config differs from the run's config (keys outside ``resume_ignore_keys``),
    opening the workdir raises ``IncompatibleCheckpointError`` naming the differing keys.
  * Arrays restore onto the shardings of the abstract state the caller passes (e.g. from
    ``jax.eval_shape`` plus the run's shardings), so a checkpoint written on one mesh restores
    onto another.
  * A state with NaN or infinite values is never saved, so the last good checkpoint survives a
    diverged run.
  * A checkpoint write starts only once the previous one (latest or best) is on disk. So a
    latest step never holds an evaluation whose best params were lost (a run killed while
    writing the best params resumes from an earlier step and evaluates again), and a kill cuts
    at most one write short.

On one process, writes run on one background thread in the order they were asked for: a save
takes a device copy of the arrays (so the next, donating, train step may start at once; the
copy holds one more state in device memory until Orbax has copied it to the host) and returns,
and the thread waits for the previous write, hands the copy to Orbax and waits for its files.
Orbax's own host copy and its bookkeeping (tens of milliseconds a save) thus stay off the
training loop. With several processes Orbax's barriers between them are device collectives,
which must be issued in the same order as the train step's own on every process, so there the
caller's thread starts each write (Orbax still writes the files in the background).
"""

import base64
import contextlib
import dataclasses
import fnmatch
import json
import logging
import math
import queue
import threading
from types import MappingProxyType
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Union

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from shapca_jax import sharding

PyTree = Any
DataState = Union[Mapping[str, Any], bytes, None]

LATEST_DIR = "latest"
BEST_DIR = "best"
_BYTES_KEY = "__bytes_base64__"
_FORMAT_VERSION = 1


class IncompatibleCheckpointError(ValueError):
  """The workdir holds checkpoints written with a different config."""


class CheckpointWriteError(RuntimeError):
  """A checkpoint write failed (Orbax only logs failures of its background writes)."""


class UnreadableCheckpointError(RuntimeError):
  """No kept step of a checkpoint folder can be read."""


class NonFiniteStateError(ValueError):
  """The state to be saved holds NaN or infinite values."""


@dataclasses.dataclass(frozen=True)
class Restored:
  """What ``restore_latest`` hands back to the training loop."""
  step: int
  state: PyTree
  data_state: DataState
  rng: Optional[jax.Array]
  metadata: Mapping[str, Any]
  path: str  # the step's folder, for the "resumed from" line


# ------------------------------------------------------------------ per-process data-state item


class _ProcessJsonHandler:
  """Orbax handler storing one JSON document per process (each process has its own data shard).

  Implements the ``orbax.checkpoint.CheckpointHandler`` protocol, like grain's own handler.
  """

  def save(self, directory: epath.Path, args: "_DataStateSave"):
    _process_file(directory).write_text(json.dumps(args.value))

  def restore(self, directory: epath.Path, args: Optional["_DataStateRestore"] = None) -> DataState:
    del args
    path = _process_file(directory)
    if not path.exists():
      saved = sorted(p.name for p in directory.iterdir())
      raise IncompatibleCheckpointError(
          f"{path} does not exist: the data-iterator state was saved by a different number of "
          f"processes ({saved}); resume with the same process count")
    return _decode_data_state(json.loads(path.read_text()))

  def metadata(self, directory: epath.Path) -> None:
    del directory

  def structure(self, directory: epath.Path) -> None:
    del directory

  def finalize(self, directory: epath.Path):
    pass

  def close(self):
    pass

  @classmethod
  def typestr(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


@ocp.args.register_with_handler(_ProcessJsonHandler, for_save=True)
@dataclasses.dataclass
class _DataStateSave(ocp.args.CheckpointArgs):
  value: Any  # already passed through _encode_data_state


@ocp.args.register_with_handler(_ProcessJsonHandler, for_restore=True)
@dataclasses.dataclass
class _DataStateRestore(ocp.args.CheckpointArgs):
  pass


def _process_file(directory: epath.Path) -> epath.Path:
  return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"


def _encode_data_state(value: DataState) -> Any:
  if isinstance(value, bytes):
    return {_BYTES_KEY: base64.b64encode(value).decode("ascii")}
  try:
    json.dumps(value)
  except TypeError as e:
    raise TypeError(f"data_state must be JSON-serialisable or bytes: {e}") from None
  return value


def _decode_data_state(value: Any) -> DataState:
  if isinstance(value, dict) and set(value) == {_BYTES_KEY}:
    return base64.b64decode(value[_BYTES_KEY])
  return value


# ------------------------------------------------------------------ config and RNG as JSON


def flatten_config(config: Any) -> dict[str, Any]:
  """``{"a.b": value}`` from a nested mapping or ml_collections ConfigDict, JSON-normalised."""
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  flat = {}

  def visit(prefix: str, node: Any):
    if isinstance(node, Mapping) and node:
      for key, value in node.items():
        visit(f"{prefix}.{key}" if prefix else str(key), value)
    else:
      flat[prefix] = node

  visit("", config)
  # The JSON round trip makes tuples lists and odd objects strings, as they will read back.
  return json.loads(json.dumps(flat, default=str))


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any],
                       ignore: Iterable[str] = (),
                       defaults: Mapping[str, Any] = MappingProxyType({})) -> list[str]:
  """Human-readable lines naming every flat key whose value differs (fnmatch ``ignore``).

  A key the checkpoint lacks is no difference when its value is its entry in ``defaults``: a
  key added to the schema since the checkpoint was written, whose default keeps the behaviour
  the checkpoint was written with.
  """
  ignore = tuple(ignore)
  lines = []
  for key in sorted(set(saved) | set(current)):
    if any(fnmatch.fnmatchcase(key, pattern) for pattern in ignore):
      continue
    if key not in current:
      lines.append(f"{key} (only in the checkpoint: {saved[key]!r})")
    elif key not in saved:
      if key in defaults and defaults[key] == current[key]:
        continue
      lines.append(f"{key} (not in the checkpoint; now {current[key]!r})")
    elif saved[key] != current[key]:
      lines.append(f"{key} (checkpoint {saved[key]!r}, now {current[key]!r})")
  return lines


def _encode_rng(rng: Optional[jax.Array]) -> Optional[dict[str, Any]]:
  if rng is None:
    return None
  if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    impl = str(jax.random.key_impl(rng))
    rng = jax.random.key_data(rng)
  else:  # a raw uint32 key from jax.random.PRNGKey
    impl = None
  return {"impl": impl, "data": np.asarray(rng).tolist()}


def _decode_rng(record: Optional[Mapping[str, Any]]) -> Optional[jax.Array]:
  if record is None:
    return None
  data = jnp.asarray(np.asarray(record["data"], dtype=np.uint32))
  return data if record["impl"] is None else jax.random.wrap_key_data(data, impl=record["impl"])


# ------------------------------------------------------------------ arrays


def _abstract(tree: PyTree) -> PyTree:
  """ShapeDtypeStructs with shardings; leaves without one are replicated over all devices."""
  replicated = jax.sharding.NamedSharding(
      jax.sharding.Mesh(np.asarray(jax.devices()), ("devices",)), jax.sharding.PartitionSpec())

  def leaf(x):
    target = getattr(x, "sharding", None) or replicated
    return jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x), sharding=target)

  return jax.tree.map(leaf, tree)


@jax.jit
def _finite_flags(leaves: list[jax.Array]) -> jax.Array:
  return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def _inexact_leaves(tree: PyTree) -> tuple[list[str], list[jax.Array]]:
  paths, leaves = [], []
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    if jnp.issubdtype(jnp.result_type(x), jnp.inexact):
      paths.append(jax.tree_util.keystr(path))
      leaves.append(x)
  return paths, leaves


def _check_finite(step: int, tree: PyTree, what: str):
  paths, leaves = _inexact_leaves(tree)
  if not leaves:
    return
  flags = np.asarray(_finite_flags(leaves))
  bad = [path for path, ok in zip(paths, flags) if not ok]
  if bad:
    raise NonFiniteStateError(f"refusing to save {what} at step {step}: NaN/inf in "
                              f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")


# ------------------------------------------------------------------ managers


def _checkpoints_dir(workdir: Union[str, epath.Path]) -> epath.Path:
  """``workdir/checkpoints`` as an absolute path: Orbax refuses relative ones."""
  return epath.Path(workdir).resolve() / "checkpoints"


def _manager(directory: epath.Path, *, read_only: bool, max_to_keep: Optional[int] = None,
             best_metric: Optional[str] = None, best_mode: str = "max",
             async_save: bool = True) -> ocp.CheckpointManager:
  """A manager of ``directory``; a ``read_only`` one creates, cleans up and deletes nothing.

  Readers leave Orbax's own ``read_only`` option off: it only makes ``save`` and ``delete``
  no-ops, which a reader never calls, and it logs a warning each time a manager opens.
  """
  best_fn = None if best_metric is None else (lambda metrics: metrics[best_metric])
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, best_fn=best_fn, best_mode=best_mode,
      keep_checkpoints_without_metrics=best_metric is None,
      create=not read_only, cleanup_tmp_directories=not read_only,
      enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(directory, options=options)


def _read_meta(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def _innermost(error: BaseException) -> BaseException:
  """The root of the chain of causes (an explicit ``from`` first, else the implicit context
  unless it was suppressed with ``from None``)."""
  while True:
    cause = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    if cause is None:
      return error
    error = cause


def _reason(error: BaseException) -> str:
  """The innermost cause of ``error`` as one line (Orbax wraps file errors several times)."""
  error = _innermost(error)
  return f"{type(error).__name__}: {' '.join(str(error).split())}"[:300]


def _write_error(step: int, manager: ocp.CheckpointManager,
                 error: BaseException) -> "CheckpointWriteError":
  return CheckpointWriteError(
      f"could not write the checkpoint of step {step} to {manager.directory} ({_reason(error)}); "
      f"the earlier checkpoints there are kept")


def _readable(directory: epath.Path, steps: Iterable[int], read: Callable[[int], Any],
              what: str) -> Iterator[tuple[int, Any]]:
  """``(step, read(step))`` for ``steps`` in order, warning about each unreadable one; raises
  ``UnreadableCheckpointError`` naming the folder when none of them is readable."""
  failed = []
  for step in steps:
    try:
      value = read(step)
    except Exception as e:  # pylint: disable=broad-except  # any damage reads as some error
      if isinstance(_innermost(e), IncompatibleCheckpointError):
        raise _innermost(e) from e  # the run does not fit the step: no damage, no fallback
      failed.append(f"step {step}: {_reason(e)}")
      logging.warning("%s checkpoint %s is unreadable (%s); trying the next kept step", what,
                      directory / str(step), _reason(e))
      continue
    yield step, value
  if failed:
    raise UnreadableCheckpointError(
        f"{directory}: no readable {what} checkpoint ({'; '.join(failed)}); move the "
        "folder away to start the run afresh")


def _restore_latest_from(manager: ocp.CheckpointManager,
                         abstract_state: PyTree) -> Optional[Restored]:
  """The newest readable latest step (read-only), or None when the folder holds no step."""
  args = ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(abstract_state)),
                            data=_DataStateRestore(), meta=ocp.args.JsonRestore())
  newest_first = sorted(manager.all_steps(), reverse=True)
  for step, restored in _readable(manager.directory, newest_first,
                                  lambda s: manager.restore(s, args=args), LATEST_DIR):
    return _restored(step, restored, manager.directory)
  return None


def _restored(step: int, restored: Mapping[str, Any], directory: epath.Path) -> Restored:
  meta = restored["meta"]
  return Restored(step=step, state=restored["state"], data_state=restored["data"],
                  rng=_decode_rng(meta.get("rng")), metadata=meta, path=str(directory / str(step)))


def restore_latest(workdir: Union[str, epath.Path], abstract_state: PyTree) -> Optional[Restored]:
  """Reads the newest readable train state of ``workdir`` (read-only), or None when there is none.

  Args:
    workdir: the run's working directory (checkpoints live in ``workdir/checkpoints``).
    abstract_state: the state's structure with shapes, dtypes and target shardings, e.g.
      ``jax.eval_shape(create_state, ...)`` with shardings set; concrete arrays also work.

  Raises:
    UnreadableCheckpointError: steps exist but none can be read.
  """
  directory = _checkpoints_dir(workdir) / LATEST_DIR
  if not directory.exists():
    return None
  manager = _manager(directory, read_only=True)
  try:
    return _restore_latest_from(manager, abstract_state)
  finally:
    manager.close()


def _best_score(meta: Mapping[str, Any]) -> float:
  best = meta["best"]
  return best["value"] if best["mode"] == "max" else -best["value"]


@contextlib.contextmanager
def _best_checkpoints(workdir: Union[str, epath.Path]
                      ) -> Iterator[tuple[epath.Path, ocp.CheckpointManager, dict[int, Any]]]:
  """The best-checkpoint folder of ``workdir``, a reading manager and the metadata of each
  readable kept step.

  Raises:
    FileNotFoundError: there is no best checkpoint.
    UnreadableCheckpointError: none of the kept best steps can be read.
  """
  directory = _checkpoints_dir(workdir) / BEST_DIR
  manager = _manager(directory, read_only=True) if directory.exists() else None
  try:
    if manager is None or not manager.all_steps():
      raise FileNotFoundError(f"no best checkpoint under {directory}")
    # One step is kept; two exist only if a run died between saving a new best and pruning.
    yield directory, manager, dict(_readable(
        directory, manager.all_steps(), lambda s: _read_meta(manager, s), BEST_DIR))
  finally:
    if manager is not None:
      manager.close()


def restore_best(workdir: Union[str, epath.Path], abstract_params: PyTree) -> PyTree:
  """The params of the best evaluation in ``workdir``, on the shardings of ``abstract_params``;
  raises as ``_best_checkpoints`` does."""
  with _best_checkpoints(workdir) as (directory, manager, metas):
    ranked = sorted(metas, key=lambda s: _best_score(metas[s]), reverse=True)
    args = ocp.args.Composite(params=ocp.args.StandardRestore(_abstract(abstract_params)))
    for _, restored in _readable(directory, ranked, lambda s: manager.restore(s, args=args),
                                 BEST_DIR):
      return restored["params"]


def best_metadata(workdir: Union[str, epath.Path]) -> dict[str, Any]:
  """What is stored beside the best params in ``workdir``: ``step``, ``metrics`` (that
  evaluation's scalars), ``best`` and the run's ``config`` (flat, as ``flatten_config``).

  Readable while the run is still training, unlike its results.json.
  """
  with _best_checkpoints(workdir) as (_, _, metas):
    return metas[max(metas, key=lambda s: _best_score(metas[s]))]


class TrainCheckpointer:
  """The latest and best checkpoints of one run in ``workdir``, with the resume rules.

  Use it as a context manager (or call ``close``), so pending asynchronous writes finish::

    with TrainCheckpointer(workdir, config, save_every_steps=500) as ckpt:
      restored = ckpt.restore_latest(abstract_state)  # None on a fresh workdir
      if restored:
        state, rng, start = restored.state, restored.rng, restored.step
        iterator.set_state(restored.data_state)
      for step in range(start + 1, num_steps + 1):
        state, metrics = train_step(state, next(iterator), rng)
        if ckpt.should_save(step) or step == num_steps:
          ckpt.save_latest(step, state, data_state=iterator.get_state(), rng=rng)
        if step % eval_every == 0:
          ckpt.save_best(step, state.params, evaluate(state.params))

  Saving takes a device copy of the arrays and returns; the writer thread writes them (see the
  module docstring), so the next (donating) train step may start at once. All processes must
  make the same calls, in the same order.
  """

  def __init__(self, workdir: Union[str, epath.Path], config: Any, *, save_every_steps: int,
               keep_latest: int = 2, best_metric: str = "f1", best_mode: str = "max",
               resume_ignore_keys: Iterable[str] = (),
               schema_defaults: Mapping[str, Any] = MappingProxyType({}),
               async_save: bool = True, writer_thread: Optional[bool] = None):
    """Opens (creating if needed) ``workdir/checkpoints`` and checks it against ``config``.

    Args:
      workdir: the run's working directory.
      config: the run's config (nested mapping or ml_collections ConfigDict); stored with every
        checkpoint and compared with the stored one on resume.
      save_every_steps: ``should_save`` is true every this many steps.
      keep_latest: how many latest checkpoints to keep.
      best_metric: key of the metrics passed to ``save_best`` that ranks evaluations.
      best_mode: ``"max"`` or ``"min"``.
      resume_ignore_keys: flat config keys (fnmatch patterns, e.g. ``"log_every"``,
        ``"eval.*"``) that may change between a run and its resumption.
      schema_defaults: flat config keys and their defaults; a key the stored config lacks may
        hold its default (see ``config_differences``).
      async_save: Orbax writes the files in a background thread.
      writer_thread: start each write on the checkpointer's own thread (see the module
        docstring); None: when there is one process.

    Raises:
      IncompatibleCheckpointError: stored checkpoints come from a different config.
    """
    if save_every_steps < 1:
      raise ValueError(f"save_every_steps must be >= 1, got {save_every_steps}")
    if keep_latest < 1:
      raise ValueError(f"keep_latest must be >= 1, got {keep_latest}")
    if best_mode not in ("max", "min"):
      raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
    self._config = flatten_config(config)
    self._schema_defaults = flatten_config(schema_defaults)
    self._requested: dict[Any, int] = {}  # manager directory -> step whose write is pending
    self._threaded = jax.process_count() == 1 if writer_thread is None else writer_thread
    self._writes: queue.Queue = queue.Queue()  # callables run in order by the writer thread
    self._failure: Optional[BaseException] = None  # the writer's first failure
    self._writer: Optional[threading.Thread] = None
    self._save_every = save_every_steps
    self._best_metric = best_metric
    self._best_mode = best_mode
    root = _checkpoints_dir(workdir)
    self._latest = _manager(root / LATEST_DIR, read_only=False, max_to_keep=keep_latest,
                            async_save=async_save)
    self._best = _manager(root / BEST_DIR, read_only=False, max_to_keep=1,
                          best_metric=best_metric, best_mode=best_mode, async_save=async_save)
    try:
      self._best_record = self._check_stored(tuple(resume_ignore_keys))
    except Exception:
      self.close()
      raise
    self._latest_step = self._latest.latest_step()  # the newest saved or asked-for step
    # A workdir that already holds a latest checkpoint must be resumed before anything is saved.
    self._may_save = self._latest_step is None

  def _check_stored(self, ignore: tuple[str, ...]) -> Optional[dict[str, Any]]:
    """Compares the stored configs with this run's; returns the stored best record."""
    best_record = None
    for manager in (self._latest, self._best):
      newest = self._newest_readable(manager, lambda s, m=manager: _read_meta(m, s))
      if newest is not None:
        step, meta = newest
        differences = config_differences(meta["config"], self._config, ignore,
                                         self._schema_defaults)
        if differences:
          raise IncompatibleCheckpointError(
              f"{manager.directory} holds step {step} written with a different config; "
              f"differing keys: {'; '.join(differences)}. Use a new workdir, or list keys that "
              f"may change on resume in resume_ignore_keys")
        if manager is self._best:
          best_record = meta["best"]
    if best_record is not None and (best_record["metric"], best_record["mode"]) != (
        self._best_metric, self._best_mode):
      raise IncompatibleCheckpointError(
          f"{self._best.directory} ranks by {best_record['mode']} {best_record['metric']}, "
          f"this run by {self._best_mode} {self._best_metric}")
    return best_record

  @property
  def latest_step(self) -> Optional[int]:
    """The newest latest step, counting one whose write is still pending."""
    return self._latest_step

  @property
  def best(self) -> Optional[Mapping[str, Any]]:
    """``{"metric", "mode", "value", "step"}`` of the best evaluation so far, or None."""
    return None if self._best_record is None else dict(self._best_record)

  def should_save(self, step: int) -> bool:
    """True every ``save_every_steps`` steps and when a preemption notice has arrived."""
    return step % self._save_every == 0 or self._latest.reached_preemption(step)

  def _newest_readable(self, manager: ocp.CheckpointManager,
                       read: Callable[[int], Any]) -> Optional[tuple[int, Any]]:
    """``(step, read(step))`` of the newest readable step of ``manager``, or None if it holds
    none; newer unreadable steps are renamed ``<step>.unreadable`` (Orbax ignores such names),
    so that the run can save past them and they stay for inspection."""
    kind = LATEST_DIR if manager is self._latest else BEST_DIR
    newest_first = sorted(manager.all_steps(), reverse=True)
    for step, value in _readable(manager.directory, newest_first, read, kind):
      unreadable = [s for s in newest_first if s > step]
      for s in unreadable:
        aside = manager.directory / f"{s}.unreadable"
        if aside.exists():
          aside.rmtree()
        (manager.directory / str(s)).rename(aside)
        logging.warning("renamed the unreadable %s checkpoint of step %d to %s", kind, s, aside)
      if unreadable:
        manager.reload()
      return step, value
    return None

  def restore_latest(self, abstract_state: PyTree) -> Optional[Restored]:
    """The newest readable train state onto the shardings of ``abstract_state``; None if there
    is none. Unreadable newer steps are skipped with a warning naming the step and the reason.

    After this call the run may save again (its next step must exceed the restored one).

    Raises:
      UnreadableCheckpointError: steps exist but none can be read.
    """
    args = ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(abstract_state)),
                              data=_DataStateRestore(), meta=ocp.args.JsonRestore())
    self.wait_until_finished()
    newest = self._newest_readable(self._latest, lambda s: self._latest.restore(s, args=args))
    self._may_save = True
    if newest is None:
      self._latest_step = None
      return None
    step, restored = newest
    self._latest_step = step
    return _restored(step, restored, self._latest.directory)

  def _require_resumed(self):
    if not self._may_save:
      raise RuntimeError(
          f"{self._latest.directory} holds checkpoints up to step {self.latest_step}; call "
          f"restore_latest() to resume them, or use a new workdir")

  def _meta(self, step: int, **extra: Any) -> dict[str, Any]:
    return {"format": _FORMAT_VERSION, "step": step, "config": self._config,
            "best": self._best_record, **extra}

  def save_latest(self, step: int, state: PyTree, *, data_state: DataState = None,
                  rng: Optional[jax.Array] = None):
    """Saves the train state, the data-iterator state (JSON-able or bytes) and the RNG key.

    Raises:
      NonFiniteStateError: the state holds NaN/inf (nothing is written).
      ValueError: ``step`` is not after the latest saved step.
    """
    self._require_resumed()
    latest = self.latest_step
    if latest is not None and step <= latest:
      raise ValueError(f"step {step} is not after the latest checkpoint (step {latest}) in "
                       f"{self._latest.directory}; refusing to overwrite it")
    _check_finite(step, state, "the train state")
    self._latest_step = step
    state = self._held(state)
    meta = self._meta(step, rng=_encode_rng(rng))
    data = _encode_data_state(data_state)
    self._write(lambda: self._save(self._latest, step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=_DataStateSave(data),
        meta=ocp.args.JsonSave(meta))))

  def compile_checks(self, *trees: PyTree):
    """Compiles the NaN/inf check of the saves for these trees (the train state, its params)
    now, beside the train step: otherwise the first save of each compiles it inside the
    training loop (about 0.5 s on a CPU, a few seconds of a short run's loop)."""
    for tree in trees:
      _, leaves = _inexact_leaves(tree)
      if leaves:
        _finite_flags.lower(leaves).compile()
      if self._threaded:
        sharding.device_copy.lower(tree).compile()

  def save_best(self, step: int, params: PyTree, metrics: Mapping[str, Any]) -> bool:
    """Saves ``params`` if ``metrics[best_metric]`` beats the best so far; returns whether it did.

    A NaN metric never counts as better.
    """
    if self._best_metric not in metrics:
      raise KeyError(f"best_metric {self._best_metric!r} is not among the metrics "
                     f"{sorted(metrics)}")
    value = float(metrics[self._best_metric])
    if not math.isfinite(value):
      logging.warning("step %d: %s = %s is not finite; best checkpoint unchanged", step,
                      self._best_metric, value)
      return False
    if self._best_record is not None:
      sign = 1.0 if self._best_mode == "max" else -1.0
      if sign * value <= sign * self._best_record["value"]:
        return False
    self._require_resumed()
    _check_finite(step, params, "best params")
    previous = self._best_record
    self._best_record = {"metric": self._best_metric, "mode": self._best_mode,
                         "value": value, "step": step}
    summary = {key: float(v) for key, v in metrics.items() if np.ndim(v) == 0}
    params = self._held(params)
    meta = self._meta(step, metrics=summary)

    def write():
      if step in self._best.all_steps():
        # Only after a resume that replays steps whose evaluation was already saved.
        logging.warning("replacing the best checkpoint of step %d (%s = %s) with %s = %s", step,
                        self._best_metric, previous["value"], self._best_metric, value)
        self._best.delete(step)
      self._save(self._best, step, metrics={self._best_metric: value}, args=ocp.args.Composite(
          params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta)))

    self._write(write)
    return True

  def _held(self, tree: PyTree) -> PyTree:
    """What a write may read after the save returns: a device copy for the writer thread (the
    caller's buffers are donated to the next step); on the caller's thread Orbax copies ``tree``
    to the host before ``save`` returns."""
    return sharding.device_copy(tree) if self._threaded else tree

  def _write(self, save: Callable[[], None]):
    """Runs ``save`` (one ``_save``) on the writer thread after the writes asked for before it,
    then waits there until its files are on disk; raises the writer's failure, if any, first.
    With several processes: waits for the previous write, then runs ``save`` here."""
    self.check_writes()
    if not self._threaded:
      self._confirm_all_written()  # one write at a time: a kill cuts at most one short
      save()
      return
    if self._writer is None:
      self._writer = threading.Thread(target=self._run_writes, name="checkpoint-writer",
                                      daemon=True)
      self._writer.start()

    def job():
      save()
      self._confirm_all_written()  # one write at a time: a kill cuts at most one short

    self._writes.put(job)

  def _run_writes(self):
    while (job := self._writes.get()) is not None:
      try:
        if self._failure is None:  # after a failure nothing more is written
          job()
      except BaseException as e:  # pylint: disable=broad-except  # raised on the caller's thread
        self._failure = e
      finally:
        self._writes.task_done()
    # Here, not on the caller's thread: Orbax raises a failed background write once per thread
    # that waits for it, and this thread has reported it already.
    self._close_managers()
    self._writes.task_done()

  def _save(self, manager: ocp.CheckpointManager, step: int, **kwargs: Any):
    """Starts writing ``step``; a write that fails at once (a synchronous item) raises
    ``CheckpointWriteError`` here, one that fails in the background at ``check_writes``."""
    try:
      manager.save(step, force=True, **kwargs)
    except Exception as e:  # pylint: disable=broad-except  # only file errors are rewritten
      if not isinstance(_innermost(e), OSError):
        raise
      raise _write_error(step, manager, e) from e
    self._requested[manager.directory] = step

  def _confirm_written(self, manager: ocp.CheckpointManager):
    """Raises ``CheckpointWriteError`` if the previous asynchronous save of ``manager`` did not
    reach the disk.

    Orbax logs a failed background write and carries on, which would leave a run training
    for hours with no checkpoint; the failure surfaces here, at ``check_writes``, at the next
    save or at the end.
    """
    expected = self._requested.pop(manager.directory, None)
    try:
      manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except  # any failure of the background write
      if expected is None:
        raise
      raise _write_error(expected, manager, e) from e
    if expected is None:
      return
    manager.reload()  # what is on disk, not the manager's own record of what it started
    if expected not in manager.all_steps():
      raise CheckpointWriteError(f"the checkpoint of step {expected} was not written to "
                                 f"{manager.directory}; see the Orbax error logged above")

  def check_writes(self):
    """Raises ``CheckpointWriteError`` if a background write has failed; never blocks.

    Call it every step: a run whose checkpoint failed (a full disk, say) stops at once instead
    of training on until its next save.
    """
    if self._failure is not None:
      failure, self._failure = self._failure, None
      raise failure
    if not self._threaded:
      for manager in (self._latest, self._best):
        if manager.directory in self._requested and not manager.is_saving_in_progress():
          self._confirm_written(manager)

  def wait_until_finished(self):
    """Blocks until pending asynchronous writes are on disk; raises if one of them failed."""
    self._writes.join()
    self.check_writes()
    if not self._threaded:
      self._confirm_all_written()

  def _confirm_all_written(self):
    self._confirm_written(self._latest)
    self._confirm_written(self._best)

  def close(self):
    """Finishes pending writes and closes both folders; raises the first failure after both."""
    if self._writer is not None:
      self._writes.put(None)
      self._writer.join()
      self._writer = None
    else:
      self._close_managers()
    self.check_writes()

  def _close_managers(self):
    for manager in (self._latest, self._best):
      try:
        manager.close()
      except Exception as e:  # pylint: disable=broad-except  # raised by check_writes
        if self._failure is None:
          self._failure = e

  def __enter__(self) -> "TrainCheckpointer":
    return self

  def __exit__(self, exc_type, exc_value, traceback):
    try:
      self.close()
    except Exception as e:  # pylint: disable=broad-except
      if exc_type is None:
        raise
      # The error in flight (a failed write, say) is the one to report; closing after it
      # fails for the same reason.
      logging.warning("closing the checkpoints after %s also failed: %s", exc_type.__name__,
                      _reason(e))
