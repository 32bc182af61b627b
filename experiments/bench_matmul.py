"""Benchmark: the encoder's dense matmuls alone, XLA against PyTorch, on the CPU.

A BERT layer's dense weights are four H x H (query, key, value, output), one H x I and one
I x H. Training multiplies each three ways: the forward pass ``x @ W``, the input gradient
``dy @ W.T`` and the weight gradient ``x.T @ dy``. This times those 9 distinct products, each
as one jitted JAX function (XLA:CPU's own choice of kernel) and as the ``torch`` call autograd
makes, alternating, and sums one layer's 18 in proportion. It separates the GEMM kernels from
everything else in ``bench_train_step.py``: a BERT-base step is mostly these products.

  python experiments/bench_matmul.py                    # BERT-base: H 768, I 3072, 1024 tokens
  python experiments/bench_matmul.py --cpus 1
  python experiments/bench_matmul.py --hidden 384 --intermediate 1536   # MiniLM-L6
"""

import argparse
import os
import statistics

import numpy as np

import timing  # experiments/ is on sys.path as the script dir


def products(tokens: int, hidden: int, intermediate: int) -> list[tuple[str, int, int, int, int]]:
  """(name, m, k, n, uses per layer) of each product: an [m, k] by [k, n] matmul."""
  out = []
  for weight, (fan_in, fan_out, count) in {"HxH": (hidden, hidden, 4),
                                           "HxI": (hidden, intermediate, 1),
                                           "IxH": (intermediate, hidden, 1)}.items():
    out += [(f"{weight} x@W", tokens, fan_in, fan_out, count),
            (f"{weight} dy@W.T", tokens, fan_out, fan_in, count),
            (f"{weight} x.T@dy", fan_in, tokens, fan_out, count)]
  return out


def _operands(name: str, m: int, k: int, n: int, rng: np.random.Generator):
  """The two arrays as the training step holds them: a transposed operand is a stored array
  read transposed, as in the backward pass."""
  a = rng.normal(size=(k, m) if name.endswith("x.T@dy") else (m, k)).astype(np.float32)
  b = rng.normal(size=(n, k) if name.endswith("W.T") else (k, n)).astype(np.float32)
  return a, b


def _contenders(name: str, a: np.ndarray, b: np.ndarray) -> dict[str, timing.Runner]:
  import jax
  import jax.numpy as jnp
  import torch

  left = (lambda x: x.T) if name.endswith("x.T@dy") else (lambda x: x)
  right = (lambda w: w.T) if name.endswith("W.T") else (lambda w: w)
  jax_fn = jax.jit(lambda x, y: jnp.matmul(left(x), right(y)))
  ja, jb = jax.device_put(a), jax.device_put(b)
  ta, tb = torch.from_numpy(a), torch.from_numpy(b)
  return {"jax": (lambda: jax_fn(ja, jb), jax.block_until_ready),
          "pytorch": (lambda: torch.mm(left(ta), right(tb)), lambda _: None)}


def _block_times(runners: dict[str, timing.Runner], rounds: int,
                 iters: int) -> dict[str, list[float]]:
  """Seconds per call, each side timed in blocks of ``iters`` calls, sides alternating block by
  block. Call-by-call alternation would time each side in the wake of the other's thread pool
  (PyTorch's OpenMP threads keep spinning after a call), which halves XLA's speed on the
  smaller products here; a step of ``bench_train_step.py`` is long enough not to notice."""
  times: dict[str, list[float]] = {side: [] for side in runners}
  for _ in range(rounds):
    for side, (fn, sync) in runners.items():
      block = timing.interleaved_times({side: (fn, sync)}, warmup=2, iters=iters)
      times[side] += block[side]
  return times


def check(name: str, a: np.ndarray, b: np.ndarray) -> float:
  """Largest difference between the two sides, relative to the largest entry (float64 oracle)."""
  expected = (a.T if name.endswith("x.T@dy") else a).astype(np.float64) @ (
      b.T if name.endswith("W.T") else b).astype(np.float64)
  scale = np.abs(expected).max()
  return max(float(np.abs(np.asarray(fn()) - expected).max() / scale)
             for fn, _ in _contenders(name, a, b).values())


def run(tokens: int, hidden: int, intermediate: int, iters: int, rounds: int = 3,
        seed: int = 0) -> list[dict]:
  rng = np.random.default_rng(seed)
  rows = []
  for name, m, k, n, count in products(tokens, hidden, intermediate):
    a, b = _operands(name, m, k, n, rng)
    medians = {side: statistics.median(t) for side, t in
               _block_times(_contenders(name, a, b), rounds, iters).items()}
    rows.append({"product": name, "m": m, "k": k, "n": n, "per_layer": count,
                 "gflop": 2 * m * k * n / 1e9, "max_rel_error": check(name, a, b),
                 **{f"{side}_s": s for side, s in medians.items()}})
  return rows


def table(rows: list[dict]) -> str:
  lines = ["| product | m x k x n | JAX ms | PyTorch ms | JAX GFLOP/s | PyTorch GFLOP/s | "
           "PyTorch / JAX time |", "|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['product']} | {r['m']}x{r['k']}x{r['n']} | {1e3 * r['jax_s']:.2f} | "
                 f"{1e3 * r['pytorch_s']:.2f} | {r['gflop'] / r['jax_s']:.0f} | "
                 f"{r['gflop'] / r['pytorch_s']:.0f} | {r['pytorch_s'] / r['jax_s']:.2f}x |")
  layer = {side: sum(r["per_layer"] * r[f"{side}_s"] for r in rows) for side in ("jax", "pytorch")}
  lines.append(f"| one layer's {sum(r['per_layer'] for r in rows)} products | | "
               f"{1e3 * layer['jax']:.1f} | {1e3 * layer['pytorch']:.1f} | | | "
               f"{layer['pytorch'] / layer['jax']:.2f}x |")
  error = max(r["max_rel_error"] for r in rows)
  return "\n".join(lines) + f"\nlargest difference from float64, relative to its largest entry: {error:.1e}"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tokens", type=int, default=1024, help="rows: batch x length (16 x 64)")
  parser.add_argument("--hidden", type=int, default=768)
  parser.add_argument("--intermediate", type=int, default=3072)
  parser.add_argument("--iters", type=int, default=15)
  parser.add_argument("--cpus", type=int, default=None, help="pin to this many cores")
  args = parser.parse_args()
  os.environ["JAX_PLATFORMS"] = "cpu"
  if args.cpus:
    allowed = sorted(os.sched_getaffinity(0))
    if not 0 < args.cpus <= len(allowed):
      raise SystemExit(f"--cpus={args.cpus}: this process may use {len(allowed)} cores")
    os.sched_setaffinity(0, allowed[:args.cpus])  # before JAX and PyTorch start threads
  import torch
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  print(table(run(args.tokens, args.hidden, args.intermediate, args.iters)))


if __name__ == "__main__":
  main()
