"""Data parallelism and FSDP on a device mesh, with JAX's own sharding (no extra layer).

The mesh has two axes:

  data   replicas that each see a slice of every global batch
  fsdp   devices that also split the parameters and the optimizer state between them

A global batch is split by rows over both axes (``PartitionSpec(("data", "fsdp"))``), the usual
FSDP layout: every device computes on its own rows, and XLA gathers each parameter shard where a
layer needs it and reduce-scatters its gradient. Parameters and optimizer moments are split along
their largest dimension that the ``fsdp`` size divides (``fsdp_spec``); with ``fsdp`` = 1 they are
replicated and the step is plain data parallelism. The jitted step sees global arrays, so it
computes exactly what one device computes on the same global batch: the batch-wide parts of the
loss (the k x k Shapley alignment) are over the whole global batch, not per device.

Each process feeds only its own rows (``process_batch_shard``) and the global array is put
together with ``jax.make_array_from_process_local_data`` (``global_batch``).
"""

from typing import Any, Callable

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
import numpy as np

PyTree = Any
DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
AXES = (DATA_AXIS, FSDP_AXIS)
# Batch rows go over both axes: under FSDP the fsdp devices are data-parallel workers too.
BATCH_SPEC = PartitionSpec(AXES)


def make_mesh(data: int = -1, fsdp: int = 1, devices=None, *, key: str = "mesh") -> Mesh:
  """A ``(data, fsdp)`` mesh over ``devices`` (default: every device of every process).

  One of the sizes may be -1: it takes every device the other leaves. ``key`` names the config
  section in error messages.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = {DATA_AXIS: data, FSDP_AXIS: fsdp}
  for axis, size in sizes.items():
    if not isinstance(size, int) or not (size == -1 or size >= 1):
      raise ValueError(f"{key}.{axis}={size!r} must be -1 (all remaining devices) or >= 1")
  if data == -1 and fsdp == -1:
    raise ValueError(f"only one of {key}.data and {key}.fsdp may be -1")
  fixed = abs(data * fsdp)  # the product of the sizes that are given
  if -1 in (data, fsdp):
    if len(devices) % fixed:
      raise ValueError(f"{key}.data={data}, {key}.fsdp={fsdp}: {len(devices)} devices do not "
                       f"split into groups of {fixed}")
    sizes = {axis: len(devices) // fixed if size == -1 else size for axis, size in sizes.items()}
  elif fixed != len(devices):
    raise ValueError(f"{key}.data={data} x {key}.fsdp={fsdp} = {fixed} devices, but there are "
                     f"{len(devices)}; use -1 for one of them to take all devices")
  # Auto axes: XLA propagates the shardings, whatever this JAX version's default axis type is.
  return jax.make_mesh(tuple(sizes.values()), AXES, axis_types=(AxisType.Auto,) * 2,
                       devices=devices)


def mesh_from_config(config) -> Mesh:
  """The mesh of ``config.mesh`` over all devices."""
  return make_mesh(config.mesh.data, config.mesh.fsdp, key="config.mesh")


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows of every batch field split over all devices (a prefix: any rank >= 1 fits)."""
  return NamedSharding(mesh, BATCH_SPEC)


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int) -> PartitionSpec:
  """Split the largest dimension that ``fsdp_size`` divides (the first of equals); replicate
  scalars and arrays with no such dimension (nothing to gain from an uneven split)."""
  if fsdp_size == 1:
    return PartitionSpec()
  candidates = [(size, -dim) for dim, size in enumerate(shape) if size % fsdp_size == 0]
  if not candidates:
    return PartitionSpec()
  dim = -max(candidates)[1]
  return PartitionSpec(*([None] * dim + [FSDP_AXIS]))


def state_shardings(mesh: Mesh, tree: PyTree) -> PyTree:
  """A ``NamedSharding`` per array leaf of ``tree`` (arrays or ``ShapeDtypeStruct``s).

  Params and optimizer moments have the same shapes, so each moment lands beside its parameter.
  """
  fsdp_size = mesh.shape[FSDP_AXIS]
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), fsdp_size)), tree)


def create_sharded(create: Callable[[PyTree], PyTree], params: PyTree,
                   mesh: Mesh) -> tuple[PyTree, PyTree]:
  """``create(params)`` (e.g. a train state with its optimizer state) built on the mesh.

  Returns the result on ``state_shardings`` and those shardings. Only ``params`` pass through
  their current devices; what ``create`` adds (optimizer moments) is born sharded.
  """
  shardings = state_shardings(mesh, jax.eval_shape(create, params))
  params = shard(params, state_shardings(mesh, params))
  return jax.jit(create, out_shardings=shardings)(params), shardings


def with_shardings(tree: PyTree, shardings: PyTree) -> PyTree:
  """``ShapeDtypeStruct``s of ``tree`` carrying ``shardings``: the target of a checkpoint restore,
  whatever mesh the checkpoint was written from."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings)


def process_batch_shard(mesh: Mesh) -> tuple[int, int]:
  """(shard index, shard count) of this process's rows in every global batch.

  The batch sharding hands row block j (of data x fsdp blocks) to the j-th device of the mesh;
  this process reads the blocks of its own devices, which must be consecutive.
  """
  me = jax.process_index()
  blocks = [j for j, device in enumerate(mesh.devices.flat) if device.process_index == me]
  count = mesh.size // len(blocks)
  if blocks != list(range(blocks[0], blocks[0] + len(blocks))) or blocks[0] % len(blocks):
    raise ValueError(f"process {me} holds batch blocks {blocks} of the mesh, not one consecutive "
                     "run; order the mesh devices by process")
  return blocks[0] // len(blocks), count


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows (``process_batch_shard``) -> the global batch, split over the mesh.

  All fields go to the devices in one call (one batched transfer on a single process).
  """
  _, count = process_batch_shard(mesh)
  local = {name: np.asarray(x) for name, x in local_batch.items()}
  shapes = {}
  for name, x in local.items():
    rows = x.shape[0] * count
    if rows % mesh.size:
      raise ValueError(f"a global batch of {rows} rows does not split over the {mesh.size} "
                       f"devices of the mesh {dict(mesh.shape)}")
    shapes[name] = (rows, *x.shape[1:])
  if count == 1:  # the local rows are the global batch: a plain transfer, ~4x less host time
    return jax.device_put(local, batch_sharding(mesh))
  return jax.make_array_from_process_local_data(batch_sharding(mesh), local, shapes)


def shard(tree: PyTree, shardings: PyTree) -> PyTree:
  """``tree``'s arrays (host or device, the same values on every process) placed on
  ``shardings`` (a tree like ``tree``, or one sharding for all)."""
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, tree)
  if all(s.is_fully_addressable for s in jax.tree.leaves(shardings)):
    return jax.device_put(tree, shardings)  # one batched transfer
  return jax.tree.map(_to_global, tree, shardings)


def _to_global(x: Any, sharding: jax.sharding.Sharding) -> jax.Array:
  """One process's copy of a value every process holds -> the global array on ``sharding``,
  which spans other processes' devices too (``jax.device_put`` refuses those)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return jax.random.wrap_key_data(_to_global(jax.random.key_data(x), sharding),
                                    impl=jax.random.key_impl(x))
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def jit_train_step(step_fn: Callable, mesh: Mesh, shardings: PyTree) -> Callable:
  """``step_fn(state, batch, rng) -> (state, metrics)`` jitted over the mesh: the state stays on
  ``shardings`` (and is donated), the batch is split by rows, the key and metrics replicated."""
  return jax.jit(step_fn, in_shardings=(shardings, batch_sharding(mesh), replicated(mesh)),
                 out_shardings=(shardings, replicated(mesh)), donate_argnums=0)


def jit_eval_step(eval_fn: Callable, mesh: Mesh, shardings: PyTree) -> Callable:
  """``eval_fn(state, batch)`` jitted over the mesh with its output replicated: one all-gather
  of the predictions, after which every process holds every row of the global batch."""
  return jax.jit(eval_fn, in_shardings=(shardings, batch_sharding(mesh)),
                 out_shardings=replicated(mesh))


@jax.jit
def device_copy(tree: PyTree) -> PyTree:
  """New buffers with the values of ``tree``'s arrays, on their shardings: what a reader keeps
  while the original buffers are donated to a step."""
  return jax.tree.map(lambda x: x.copy(), tree)
