"""Benchmark: the JAX CRF (shapca_jax.crf) against pytorch-crf on the same machine.

Times loss + gradient (w.r.t. emissions and CRF parameters) and Viterbi decoding at the MNER
shape (B=32, T=128) for K=9 (Twitter BIO tags) and K=13, prints ours / theirs ratios and writes
a JSON. Both sides get identical parameters and inputs with random lengths; the log-likelihoods
and decoded paths are compared too, so a fast but wrong result cannot pass unnoticed.

  python experiments/bench_crf.py --device cpu --output results/bench_crf_cpu.json

pytorch-crf and torch are imported only when present; without them only ours is timed.
torch's own thread pool suffers most when other processes load the CPU: ``--torch_threads 1``
gives the steadier (and for pytorch-crf faster) baseline on a busy 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np


def _median_seconds(fn: Callable[[], object], repeats: int,
                    sync: Callable[[object], None]) -> float:
  sync(fn())  # Warm-up: compilation and caches.
  times = []
  for _ in range(repeats):
    begin = time.perf_counter()
    sync(fn())
    times.append(time.perf_counter() - begin)
  return statistics.median(times)


def _inputs(batch: int, length: int, num_tags: int, seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  lengths = rng.integers(length // 2, length + 1, size=batch)
  lengths[0] = length  # pytorch-crf wants the first step on; one full row keeps T honest.
  return {
      "emissions": rng.normal(size=(batch, length, num_tags)).astype(np.float32),
      "tags": rng.integers(0, num_tags, size=(batch, length)),
      "lengths": lengths,
      "mask": np.arange(length)[None, :] < lengths[:, None],
      "transitions": rng.uniform(-0.1, 0.1, size=(num_tags, num_tags)).astype(np.float32),
      "start": rng.uniform(-0.1, 0.1, size=num_tags).astype(np.float32),
      "end": rng.uniform(-0.1, 0.1, size=num_tags).astype(np.float32),
  }


def _bench_ours(data: dict[str, np.ndarray], device: str, repeats: int) -> dict[str, object]:
  import jax
  import jax.numpy as jnp

  from shapca_jax import crf

  target = jax.devices(device)[0]
  params = jax.device_put({k: data[k] for k in ("transitions", "start", "end")}, target)
  emissions, tags, lengths = jax.device_put(
      (data["emissions"], data["tags"].astype(np.int32), data["lengths"].astype(np.int32)), target)

  def loss(params, emissions):
    return -jnp.mean(crf.crf_log_likelihood(params, emissions, tags, lengths))

  loss_and_grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  decode = jax.jit(crf.crf_decode)
  likelihood = jax.jit(crf.crf_log_likelihood)
  sync = jax.block_until_ready
  decoded = decode(params, emissions, lengths)[0]
  return {
      "loss_grad_s": _median_seconds(lambda: loss_and_grad(params, emissions), repeats, sync),
      "decode_s": _median_seconds(lambda: decode(params, emissions, lengths), repeats, sync),
      "log_likelihood": np.asarray(likelihood(params, emissions, tags, lengths)),
      "paths": [row[row >= 0].tolist() for row in np.asarray(decoded)],
  }


def _bench_pytorch_crf(data: dict[str, np.ndarray], device: str, repeats: int,
                      threads: int | None) -> dict[str, object]:
  import torch
  import torchcrf

  if threads:
    torch.set_num_threads(threads)
  target = torch.device("cuda" if device == "gpu" else "cpu")
  num_tags = data["emissions"].shape[2]
  model = torchcrf.CRF(num_tags, batch_first=True).to(target)
  with torch.no_grad():
    for param, name in ((model.transitions, "transitions"),
                        (model.start_transitions, "start"), (model.end_transitions, "end")):
      param.copy_(torch.from_numpy(data[name]))
  emissions = torch.from_numpy(data["emissions"]).to(target).requires_grad_(True)
  tags = torch.from_numpy(data["tags"]).to(target)
  mask = torch.from_numpy(data["mask"]).to(target)

  def sync(_):
    if target.type == "cuda":
      torch.cuda.synchronize()

  def loss_and_grad():
    model.zero_grad(set_to_none=True)
    emissions.grad = None
    loss = -model(emissions, tags, mask, reduction="mean")
    loss.backward()
    return loss

  def decode():
    with torch.no_grad():
      return model.decode(emissions, mask)

  with torch.no_grad():
    log_likelihood = model(emissions, tags, mask, reduction="none").cpu().numpy()
  return {
      "loss_grad_s": _median_seconds(loss_and_grad, repeats, sync),
      "decode_s": _median_seconds(decode, repeats, sync),
      "log_likelihood": log_likelihood,
      "paths": decode(),
      "torch_threads": torch.get_num_threads(),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--time", type=int, default=128)
  parser.add_argument("--tags", type=int, nargs="+", default=[9, 13])
  parser.add_argument("--repeats", type=int, default=30)
  parser.add_argument("--torch_threads", type=int, default=None,
                      help="torch intra-op threads (default: torch's own choice)")
  parser.add_argument("--output", type=pathlib.Path,
                      default=pathlib.Path("results/bench_crf.json"))
  args = parser.parse_args()

  import jax
  try:
    import torchcrf  # noqa: F401  Only to learn whether the baseline can run.
    baseline_missing = None
  except ImportError as error:
    baseline_missing = f"pytorch-crf unavailable: {error}"

  results = []
  for num_tags in args.tags:
    data = _inputs(args.batch, args.time, num_tags, seed=num_tags)
    ours = _bench_ours(data, args.device, args.repeats)
    row = {"batch": args.batch, "time": args.time, "tags": num_tags,
           "ours_loss_grad_ms": 1e3 * ours["loss_grad_s"], "ours_decode_ms": 1e3 * ours["decode_s"]}
    if baseline_missing is None:
      theirs = _bench_pytorch_crf(data, args.device, args.repeats, args.torch_threads)
      row.update({
          "pytorch_crf_loss_grad_ms": 1e3 * theirs["loss_grad_s"],
          "pytorch_crf_decode_ms": 1e3 * theirs["decode_s"],
          "loss_grad_speedup": theirs["loss_grad_s"] / ours["loss_grad_s"],
          "decode_speedup": theirs["decode_s"] / ours["decode_s"],
          "max_abs_log_likelihood_diff": float(
              np.max(np.abs(ours["log_likelihood"] - theirs["log_likelihood"]))),
          "decoded_paths_equal": ours["paths"] == theirs["paths"],
          "torch_threads": theirs["torch_threads"],
      })
      print(f"K={num_tags:3d}  loss+grad: ours {row['ours_loss_grad_ms']:.3f} ms, pytorch-crf "
            f"{row['pytorch_crf_loss_grad_ms']:.3f} ms, {row['loss_grad_speedup']:.1f}x | "
            f"decode: ours {row['ours_decode_ms']:.3f} ms, pytorch-crf "
            f"{row['pytorch_crf_decode_ms']:.3f} ms, {row['decode_speedup']:.1f}x | "
            f"paths equal {row['decoded_paths_equal']}, "
            f"max |dLL| {row['max_abs_log_likelihood_diff']:.1e}")
    else:
      print(f"K={num_tags:3d}  loss+grad: ours {row['ours_loss_grad_ms']:.3f} ms | "
            f"decode: ours {row['ours_decode_ms']:.3f} ms ({baseline_missing})")
    results.append(row)

  report = {
      "benchmark": "crf",
      "device": args.device,
      "jax_device": str(jax.devices(args.device)[0]),
      "jax_version": jax.__version__,
      "machine": f"{platform.machine()} {os.cpu_count()} cpus, load average {os.getloadavg()}",
      "repeats": args.repeats,
      "timing": "median wall time after one warm-up call (jit compile), results synchronised",
      "baseline_missing": baseline_missing,
      "results": results,
  }
  args.output.parent.mkdir(parents=True, exist_ok=True)
  args.output.write_text(json.dumps(report, indent=2))
  print(f"wrote {args.output}")


if __name__ == "__main__":
  main()
