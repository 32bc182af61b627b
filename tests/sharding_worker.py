"""Training steps of the tiny model on a device mesh, for test_sharding.

The pytest process has initialised JAX with one CPU device; runs on more devices happen in a
fresh process with ``XLA_FLAGS=--xla_force_host_platform_device_count=N``:

  python tests/sharding_worker.py train OUT BERT_DIR DATA_DIR
      the plain single-device step (today's path, the reference) and the sharded step on
      data=N and on data=2 x fsdp=N/2 for all STEPS; the fsdp run saves a checkpoint after
      RESUME_AT steps. Writes OUT/{reference,data,fsdp}.npz and OUT/checkpoint.
  python tests/sharding_worker.py resume OUT BERT_DIR DATA_DIR DATA FSDP
      restores OUT/checkpoint onto this process's (DATA, FSDP) mesh and runs the remaining
      steps; writes OUT/resumed_DATAxFSDP.npz.

Every run records its loss per step and its final params. The batches are the first STEPS
global batches of the embedded Twitter-2017 training split (GLOBAL_BATCH rows, one bucket).
"""

import json
import pathlib
import sys

import chex
import jax
import numpy as np

from shapca_jax import checkpoint
from shapca_jax import optim
from shapca_jax import sharding
from shapca_jax import steps
from shapca_jax import train
from shapca_jax.data import contexts, readers, tokenization
from shapca_jax.data.pipeline import BatchPipeline

if __name__ == "__main__":  # run as a script: train_fixtures sits beside this file
  sys.path.insert(0, str(pathlib.Path(__file__).parent))
import train_fixtures  # pylint: disable=wrong-import-position

GLOBAL_BATCH = 8
STEPS = 4
RESUME_AT = 2
CHECKPOINT_DIR = "checkpoint"


class Setup:
  """The tiny model, its initial params, optimizer and batches, identical in every process."""

  def __init__(self, bert_dir: pathlib.Path, data_dir: pathlib.Path):
    self.config = train_fixtures.tiny_config(data_dir, bert_dir)
    self.config.batch_size = GLOBAL_BATCH
    examples = readers.read_split("twitter2017", "train", data_dir)[:64]
    examples = contexts.attach_contexts(examples, "twitter2017", "train", data_dir, "blip2")[0]
    encoder = tokenization.Encoder(bert_dir, "mner")
    pipeline = BatchPipeline(examples, encoder, batch_size=GLOBAL_BATCH, shuffle=True, seed=0,
                             drop_remainder=True, buckets=tokenization.DEFAULT_BUCKETS[:1])
    self.batches = [pipeline.batch(i) for i in range(STEPS)]
    self.model, pretrained = train.build_model(self.config, encoder.tokenizer.vocab_size)
    # On the host, so that no run's donated buffers are the next run's params.
    self.params = jax.device_get(
        train.init_params(self.model, pretrained, self.batches[0], jax.random.key(1)))
    self.tx = optim.make_optimizer(
        self.params, learning_rates=dict(self.config.learning_rate), total_steps=10,
        warmup_ratio=0.1, weight_decay=0.01, grad_clip_norm=1.0)
    self.rng = jax.random.key(2)

  def create_state(self, params):
    return steps.create_train_state(self.model, params, self.tx)

  def step_fn(self):
    """A fresh step function that fails when traced twice: one bucket, one compilation."""
    def step(state, batch, rng):
      return steps.train_step(state, batch, rng, align=self.config.align)

    chex.clear_trace_counter()  # chex counts per function source; this is a new jit
    return chex.assert_max_traces(step, n=1)


def _record(path: pathlib.Path, losses: list[float], params) -> None:
  flat = {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(jax.device_get(params))}
  np.savez(path, losses=np.asarray(losses), **flat)


def reference(setup: Setup) -> tuple[list[float], object]:
  """Today's single-device path: numpy batches into a plainly jitted, donated step."""
  state = setup.create_state(setup.params)
  step = jax.jit(setup.step_fn(), donate_argnums=0)
  losses = []
  for batch in setup.batches:
    state, metrics = step(state, batch, setup.rng)
    losses.append(float(metrics["loss"]))
  return losses, state.params


def on_mesh(setup: Setup, mesh, save_to: pathlib.Path | None = None):
  """All steps through the sharding helpers; optionally a checkpoint after RESUME_AT steps."""
  state, shardings = sharding.create_sharded(setup.create_state, setup.params, mesh)
  step = sharding.jit_train_step(setup.step_fn(), mesh, shardings)
  losses = []
  for i, batch in enumerate(setup.batches, start=1):
    state, metrics = step(state, sharding.global_batch(batch, mesh), setup.rng)
    losses.append(float(metrics["loss"]))
    if save_to is not None and i == RESUME_AT:
      with checkpoint.TrainCheckpointer(save_to, {"tiny": 1}, save_every_steps=1) as ckpt:
        ckpt.save_latest(i, state, data_state={"next": i}, rng=setup.rng)
  return losses, state


def resume(setup: Setup, mesh, checkpoint_dir: pathlib.Path):
  """Restores the checkpoint onto ``mesh`` (shardings from the abstract state) and finishes."""
  abstract_params = jax.eval_shape(
      lambda r: setup.model.init(r, setup.batches[0])["params"], jax.random.key(0))
  abstract = jax.eval_shape(setup.create_state, abstract_params)
  shardings = sharding.state_shardings(mesh, abstract)
  restored = checkpoint.restore_latest(checkpoint_dir, sharding.with_shardings(abstract, shardings))
  assert restored.step == RESUME_AT and restored.data_state == {"next": RESUME_AT}
  step = sharding.jit_train_step(setup.step_fn(), mesh, shardings)
  state, losses = restored.state, []
  for batch in setup.batches[RESUME_AT:]:
    state, metrics = step(state, sharding.global_batch(batch, mesh), restored.rng)
    losses.append(float(metrics["loss"]))
  return losses, state


def param_fraction_per_device(state) -> float:
  """Bytes of params on the first device over the bytes of all params."""
  leaves = jax.tree.leaves(state.params)
  total = sum(x.nbytes for x in leaves)
  return sum(x.addressable_shards[0].data.nbytes for x in leaves) / total


def main(argv: list[str]) -> None:
  command, out, bert_dir, data_dir = argv[0], *map(pathlib.Path, argv[1:4])
  setup = Setup(bert_dir, data_dir)
  n = jax.device_count()
  summary = {"devices": n}
  if command == "train":
    _record(out / "reference.npz", *reference(setup))
    losses, state = on_mesh(setup, sharding.make_mesh(n, 1))
    _record(out / "data.npz", losses, state.params)
    losses, state = on_mesh(setup, sharding.make_mesh(2, n // 2), save_to=out / CHECKPOINT_DIR)
    _record(out / "fsdp.npz", losses, state.params)
    summary["fsdp_param_fraction"] = param_fraction_per_device(state)
    summary["embedding_spec"] = str(
        state.params["text_encoder"]["embeddings"]["word_embeddings"]["embedding"].sharding.spec)
  else:
    data, fsdp = map(int, argv[4:6])
    losses, state = resume(setup, sharding.make_mesh(data, fsdp), out / CHECKPOINT_DIR)
    _record(out / f"resumed_{data}x{fsdp}.npz", losses, state.params)
  print(json.dumps(summary))


if __name__ == "__main__":
  main(sys.argv[1:])
