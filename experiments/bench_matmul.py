"""Benchmark: the encoder's dense matmuls alone, XLA against PyTorch, on the CPU.

A BERT layer's dense weights are four H x H (query, key, value, output), one H x I and one
I x H. Training multiplies each three ways: the forward pass ``x @ W``, the input gradient
``dy @ W.T`` and the weight gradient ``x.T @ dy``. This times those 9 distinct products, each
as one jitted JAX function (XLA:CPU's own choice of kernel) and as the ``torch`` call autograd
makes, alternating in blocks, and sums one layer's 18 in proportion. It separates the GEMM
kernels from everything else in ``bench_train_step.py``: a BERT-base step is mostly these
products.

  python experiments/bench_matmul.py                    # BERT-base: H 768, I 3072, 1024 tokens
  python experiments/bench_matmul.py --cpus 1
  python experiments/bench_matmul.py --hidden 384 --intermediate 1536   # MiniLM-L6
"""

import argparse
import os
import statistics
from typing import NamedTuple

import numpy as np

import timing  # experiments/ is on sys.path as the script dir


class Product(NamedTuple):
  """An [m, k] by [k, n] matmul, made ``per_layer`` times per layer and training step; a
  transposed operand is a stored array read transposed, as in the backward pass."""
  name: str
  m: int
  k: int
  n: int
  per_layer: int
  transpose_left: bool = False
  transpose_right: bool = False

  def operands(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The two arrays as the training step holds them."""
    a = rng.normal(size=(self.k, self.m) if self.transpose_left else (self.m, self.k))
    b = rng.normal(size=(self.n, self.k) if self.transpose_right else (self.k, self.n))
    return a.astype(np.float32), b.astype(np.float32)

  def of(self, a, b):
    """The product itself, from operands of any array library with ``.T`` and ``@``."""
    return (a.T if self.transpose_left else a) @ (b.T if self.transpose_right else b)


def products(tokens: int, hidden: int, intermediate: int) -> list[Product]:
  """The forward product and both gradients of each dense weight of one layer."""
  out = []
  for weight, (fan_in, fan_out, count) in {"HxH": (hidden, hidden, 4),
                                           "HxI": (hidden, intermediate, 1),
                                           "IxH": (intermediate, hidden, 1)}.items():
    out += [Product(f"{weight} x@W", tokens, fan_in, fan_out, count),
            Product(f"{weight} dy@W.T", tokens, fan_out, fan_in, count, transpose_right=True),
            Product(f"{weight} x.T@dy", fan_in, tokens, fan_out, count, transpose_left=True)]
  return out


def contenders(product: Product, a: np.ndarray, b: np.ndarray) -> dict[str, timing.Runner]:
  import jax
  import torch

  jax_fn = jax.jit(product.of)
  ja, jb = jax.device_put(a), jax.device_put(b)
  ta, tb = torch.from_numpy(a), torch.from_numpy(b)
  return {"jax": (lambda: jax_fn(ja, jb), jax.block_until_ready),
          "pytorch": (lambda: product.of(ta, tb), lambda _: None)}


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


def max_error(product: Product, a: np.ndarray, b: np.ndarray,
              runners: dict[str, timing.Runner]) -> float:
  """Largest difference between the runners and the float64 product, relative to its largest
  entry."""
  expected = product.of(a.astype(np.float64), b.astype(np.float64))
  scale = np.abs(expected).max()
  return max(float(np.abs(np.asarray(fn()) - expected).max() / scale)
             for fn, _ in runners.values())


def run(tokens: int, hidden: int, intermediate: int, iters: int, rounds: int = 3,
        seed: int = 0) -> list[dict]:
  rng = np.random.default_rng(seed)
  rows = []
  for product in products(tokens, hidden, intermediate):
    a, b = product.operands(rng)
    runners = contenders(product, a, b)
    medians = {side: statistics.median(t)
               for side, t in _block_times(runners, rounds, iters).items()}
    m, k, n = product.m, product.k, product.n
    rows.append({"product": product.name, "m": m, "k": k, "n": n,
                 "per_layer": product.per_layer, "gflop": 2 * m * k * n / 1e9,
                 "max_rel_error": max_error(product, a, b, runners),
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
  lines.append(f"largest difference from float64, relative to its largest entry: {error:.1e}")
  return "\n".join(lines)


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
