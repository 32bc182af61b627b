"""Benchmark: Monte Carlo Shapley values (shapca_jax.shapley) against NumPy and PyTorch.

For each (k players = k anchors, M permutations) the default utility (softmax_expectation,
tau = 0.1) is estimated from M permutations by

  ours          mc_shapley(sim, key, num_permutations=M, antithetic=False), jitted, timed
                end to end (it also draws its permutations) after a warm-up call;
  ours_anti     the same with antithetic=True (M permutations plus their M reverses);
  numpy         vectorised over permutations, chunked like ours to bound memory;
  torch_loop    PyTorch eager, a Python loop over permutations (vectorised within one);
  torch_vec     PyTorch vectorised over permutations (gather, cumsum, inverse gather),
                chunked like ours;
  torch_*_cuda  the two PyTorch versions on the GPU with --device gpu.

The baselines receive ready permutations (they are not timed drawing them), the same ones
ours draws, and their results are compared with ours on those permutations
(`max_abs_diff`), so a fast but wrong version cannot pass unnoticed. Times are the minimum
over interleaved rounds (robust to other processes on the machine), also as permutation-
players per second (M k / time) and as ours' speed-up over each baseline.

  python experiments/bench_shapley.py --device cpu --output results/bench_shapley_cpu.json
  python experiments/bench_shapley.py --device cpu --quick     # small sizes only
  python experiments/bench_shapley.py --device cpu --sizes 32x64 --rounds 9  # one row
  python experiments/bench_shapley.py --device gpu             # adds torch CUDA

torch is imported only when present; without it only ours and NumPy are timed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import platform
import time
from collections.abc import Callable

import numpy as np

TAU = 0.1
DIM = 256
FULL_SIZES = [(k, m) for k in (16, 32, 128, 512, 1024) for m in (32, 256)] + [(32, 64)]
QUICK_SIZES = [(16, 32), (32, 32), (32, 64), (128, 32)]
# Vectorised baselines process permutations in chunks of at most this many gathered elements.
CHUNK_ELEMENTS = 1 << 24
# Above this many permutation-player-anchor triples, one call per round is enough.
SINGLE_CALL_WORK = 1 << 22
# From this many, two rounds are enough (each call takes seconds).
LONG_WORK = 1 << 26


def _similarities(k: int, seed: int) -> np.ndarray:
  """Cosine similarities of k random players to k random anchors in d = DIM."""
  rng = np.random.default_rng(seed)
  x, y = (v / np.linalg.norm(v, axis=1, keepdims=True) for v in rng.normal(size=(2, k, DIM)))
  return (x @ y.T).astype(np.float32)


def _chunks(perms, k: int):
  size = max(1, CHUNK_ELEMENTS // (2 * k * k))
  return [perms[i:i + size] for i in range(0, len(perms), size)]


def numpy_vectorised(sim: np.ndarray, perms: np.ndarray) -> np.ndarray:
  k = sim.shape[0]
  w = np.exp((sim - sim.max(axis=0)) / TAU)
  terms = np.concatenate([w * sim, w], axis=1)
  phi = np.zeros_like(sim)
  for chunk in _chunks(perms, k):
    sums = np.cumsum(terms[chunk], axis=1)  # [c, k, 2 k_a], positions on axis 1
    values = sums[..., :k] / sums[..., k:]
    gains = np.diff(values, axis=1, prepend=0)
    positions = np.argsort(chunk, axis=1)
    phi += np.take_along_axis(gains, positions[..., None], axis=1).sum(axis=0)
  return phi / len(perms)


def torch_loop(sim, perms):
  """What a PyTorch user writes first: a loop over permutations."""
  import torch

  phi = torch.zeros_like(sim)
  for perm in perms:
    s = sim[perm]  # [k, k_a], players in permutation order
    w = torch.exp((s - s.max(dim=0).values) / TAU)
    values = torch.cumsum(w * s, dim=0) / torch.cumsum(w, dim=0)
    phi[perm] += torch.diff(values, dim=0, prepend=torch.zeros_like(values[:1]))
  return phi / len(perms)


def torch_vectorised(sim, perms):
  """All permutations at once (in memory-bounded chunks): gather, cumsum, inverse gather."""
  import torch

  k = sim.shape[0]
  w = torch.exp((sim - sim.max(dim=0).values) / TAU)
  terms = torch.cat([w * sim, w], dim=1)
  phi = torch.zeros_like(sim)
  for chunk in _chunks(perms, k):
    sums = torch.cumsum(terms[chunk], dim=1)
    values = sums[..., :k] / sums[..., k:]
    gains = torch.diff(values, dim=1, prepend=torch.zeros_like(values[:, :1]))
    positions = torch.argsort(chunk, dim=1)
    phi += torch.take_along_dim(gains, positions[..., None], dim=1).sum(dim=0)
  return phi / len(perms)


class _Contender:
  """One implementation bound to its inputs: run() returns a NumPy array of phi."""

  def __init__(self, name: str, call: Callable[[], object], to_numpy: Callable[[object], np.ndarray],
               sync: Callable[[object], object]):
    self.name, self.call, self.to_numpy, self.sync = name, call, to_numpy, sync
    self.times: list[float] = []

  def timed(self, calls: int) -> None:
    begin = time.perf_counter()
    for _ in range(calls):
      self.sync(self.call())
    self.times.append((time.perf_counter() - begin) / calls)


def _contenders(sim_np, k: int, m: int, device: str, torch_loop_max: int):
  import jax

  from shapca_jax import shapley

  target = jax.devices(device)[0]
  sim = jax.device_put(sim_np, target)
  key = jax.device_put(jax.random.key(0), target)
  perms_np = np.asarray(shapley.sample_permutations(key, m, k))
  contenders = [
      _Contender("ours", lambda: shapley.mc_shapley(sim, key, num_permutations=m, antithetic=False),
                 np.asarray, jax.block_until_ready),
      _Contender("ours_anti", lambda: shapley.mc_shapley(sim, key, num_permutations=m),
                 np.asarray, jax.block_until_ready),
      _Contender("numpy", lambda: numpy_vectorised(sim_np, perms_np), np.asarray, lambda x: x),
  ]
  if importlib.util.find_spec("torch") is not None:
    import torch

    torch_devices = ["cpu"] + (["cuda"] if device == "gpu" and torch.cuda.is_available() else [])
    for torch_device in torch_devices:
      suffix = "" if torch_device == "cpu" else "_cuda"
      t_sim = torch.from_numpy(sim_np).to(torch_device)
      t_perms = torch.from_numpy(perms_np.astype(np.int64)).to(torch_device)

      def sync(x, torch_device=torch_device):
        if torch_device == "cuda":
          torch.cuda.synchronize()
        return x

      contenders.append(_Contender(f"torch_vec{suffix}", lambda s=t_sim, p=t_perms: torch_vectorised(s, p),
                                   lambda x: x.cpu().numpy(), sync))
      if m * k <= torch_loop_max:
        contenders.append(_Contender(f"torch_loop{suffix}", lambda s=t_sim, p=t_perms: torch_loop(s, p),
                                     lambda x: x.cpu().numpy(), sync))
  reference = np.asarray(jax.jit(
      lambda s, p: shapley.shapley_from_permutations(shapley.make_game(s, tau=TAU), p))(sim, perms_np))
  return contenders, reference


def bench_size(k: int, m: int, device: str, rounds: int, torch_loop_max: int) -> dict[str, object]:
  contenders, reference = _contenders(_similarities(k, seed=k), k, m, device, torch_loop_max)
  row: dict[str, object] = {"k": k, "M": m, "d": DIM}
  for c in contenders:  # warm-up (compilation) and agreement on the shared permutations
    if c.name != "ours_anti":
      row[f"max_abs_diff_{c.name}"] = float(np.max(np.abs(c.to_numpy(c.sync(c.call())) - reference)))
    else:
      c.sync(c.call())
  calls = 1 if m * k * k >= SINGLE_CALL_WORK else max(1, SINGLE_CALL_WORK // (m * k * k) // 4)
  if m * k * k >= LONG_WORK:
    rounds = min(rounds, 2)
  for _ in range(rounds):
    for c in contenders:
      c.timed(calls if not c.name.startswith("torch_loop") else max(1, calls // 8))
  for c in contenders:
    best = min(c.times)
    row[f"{c.name}_s"] = best
    row[f"{c.name}_perm_players_per_s"] = m * k / best
  for c in contenders:
    if not c.name.startswith("ours"):
      row[f"speedup_vs_{c.name}"] = row[f"{c.name}_s"] / row["ours_s"]
  return row


def _format(rows: list[dict[str, object]]) -> str:
  names = [c[:-2] for c in rows[0] if c.endswith("_s") and not c.endswith("per_s")]
  header = f"{'k':>5} {'M':>4} " + " ".join(f"{n:>13}" for n in names)
  lines = [header + "   speed-up of ours vs " + ", ".join(n for n in names if not n.startswith("ours"))]
  for r in rows:
    times = " ".join(f"{r[f'{n}_s'] * 1e3:11.3f}ms" if f"{n}_s" in r else f"{'-':>13}" for n in names)
    ratios = ", ".join(f"{r[f'speedup_vs_{n}']:.1f}x" if f"speedup_vs_{n}" in r else "-"
                       for n in names if not n.startswith("ours"))
    lines.append(f"{r['k']:>5} {r['M']:>4} {times}   {ratios}")
  lines.append("permutation-players/s (ours): " + ", ".join(
      f"k={r['k']},M={r['M']}: {r['ours_perm_players_per_s']:.3g}" for r in rows))
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
  parser.add_argument("--quick", action="store_true", help="small sizes only (a short CPU run)")
  parser.add_argument("--sizes", nargs="+", default=None, metavar="KxM",
                      help="only these sizes, e.g. 32x64 1024x256")
  parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
  parser.add_argument("--torch_loop_max", type=int, default=1 << 20,
                      help="skip the torch loop above this many permutation-players")
  parser.add_argument("--torch_threads", type=int, default=None,
                      help="torch intra-op threads (default: torch's own choice)")
  parser.add_argument("--output", type=pathlib.Path, default=None)
  args = parser.parse_args()
  if args.torch_threads and importlib.util.find_spec("torch") is not None:
    import torch

    torch.set_num_threads(args.torch_threads)

  import jax

  sizes = QUICK_SIZES if args.quick else FULL_SIZES
  if args.sizes:
    sizes = [tuple(int(n) for n in size.split("x")) for size in args.sizes]
  load_before = os.getloadavg()[0]
  rows = []
  for k, m in sizes:
    rows.append(bench_size(k, m, args.device, args.rounds, args.torch_loop_max))
    print(f"k={k} M={m}: ours {rows[-1]['ours_s'] * 1e3:.3f} ms", flush=True)
  print(_format(rows))
  output = args.output or pathlib.Path(f"results/bench_shapley_{args.device}.json")
  output.parent.mkdir(parents=True, exist_ok=True)
  meta = {"device": str(jax.devices(args.device)[0]), "jax": jax.__version__,
          "machine": platform.processor() or platform.machine(), "tau": TAU,
          "utility": "softmax_expectation", "timing": "min over interleaved rounds",
          "load_average_1min": [load_before, os.getloadavg()[0]]}
  if importlib.util.find_spec("torch") is not None:
    import torch

    meta["torch"] = torch.__version__
    meta["torch_threads"] = torch.get_num_threads()
  output.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
  print(f"wrote {output}")


if __name__ == "__main__":
  main()
