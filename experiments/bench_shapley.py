"""Benchmark: Monte Carlo Shapley values (shapca_jax.shapley) against NumPy and PyTorch.

For each (k players = k anchors, M permutations, d = 256) the default utility
(softmax_expectation, tau = 0.1) is estimated from M permutations by

  ours          mc_shapley(sim, key, num_permutations=M, antithetic=False), jitted, timed
                end to end;
  ours_anti     the same with antithetic=True (M permutations plus their M reverses);
  numpy         vectorised over permutations, chunked like ours to bound memory (CPU only);
  torch_loop    PyTorch eager as a user writes it: the loop-invariant softmax weights once,
                then a Python loop over permutations (randperm, gather, cumsum, divide, diff,
                index_add_), vectorised over anchors;
  torch_vec     PyTorch vectorised over permutations in memory-bounded chunks (gather,
                cumsum, divide, diff, one index_add_ per chunk: no argsort, no inverse
                gather);
  *_cuda        the PyTorch versions on the GPU with --device gpu (JAX then runs on the GPU).

Every contender draws its own M permutations inside the timed call, as its users would (ours
with jax.random, NumPy with Generator.permuted, the torch loop with one torch.randperm per
permutation, torch_vec by argsorting torch.rand). Each is also run once on the permutations
ours draws and compared with shapley_from_permutations on them (`max_abs_diff_*`), so a fast
but wrong version cannot pass unnoticed. With --given_permutations every contender is timed
on those permutations instead, ours through shapley_from_permutations: no draw is timed.
Contenders alternate call by call (`timing.interleaved_times`), so load from other processes
hits all alike; the table shows medians. The torch loop is left out where one call would take more than --torch_loop_max_s.
With --device gpu the table adds the memory bandwidth ours achieves: XLA's `bytes accessed`
of the compiled call (compiled without permutation chunking, as XLA counts a loop body once)
over its median time, and its share of --peak_gbps.

  python experiments/bench_shapley.py --cpus 1 --sizes 32x64            # the issue's row
  python experiments/bench_shapley.py --cpus 1 --sizes 32x64 --given_permutations
  python experiments/bench_shapley.py --cpus 1 --sizes 1024x256
  python experiments/bench_shapley.py --device gpu --output results/bench_shapley_gpu.json

Imports only numpy, JAX, shapca_jax.shapley and (when present) torch.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import platform
import sys
import time
from collections.abc import Callable

import numpy as np

import timing  # experiments/ is on sys.path as the script dir

TAU = 0.1
DIM = 256
GRID = [(k, m) for k in (16, 32, 128, 512, 1024) for m in (32, 256)]
FULL_SIZES = GRID + [(32, 64)]
QUICK_SIZES = [(16, 32), (32, 32), (32, 64), (128, 32)]
# Vectorised baselines process permutations in chunks of at most this many gathered elements.
CHUNK_ELEMENTS = 1 << 24
# A turn of the interleaved timing lasts at least this long, or MAX_CALLS_PER_TURN calls.
TURN_S = 2e-3
MAX_CALLS_PER_TURN = 100
# Each contender's typical call time (which sets its turn's length) is the median over this.
WARM_BUDGET_S = 0.02


def _similarities(k: int, seed: int) -> np.ndarray:
  """Cosine similarities of k random players to k random anchors in d = DIM."""
  rng = np.random.default_rng(seed)
  x, y = (v / np.linalg.norm(v, axis=1, keepdims=True) for v in rng.normal(size=(2, k, DIM)))
  return (x @ y.T).astype(np.float32)


def _chunks(perms, k: int):
  size = max(1, CHUNK_ELEMENTS // (2 * k * k))
  return [perms[i:i + size] for i in range(0, len(perms), size)]


def numpy_vectorised(sim: np.ndarray, perms, rng: np.random.Generator | None = None) -> np.ndarray:
  """perms: the permutations [M, k], or their number M, then drawn with `rng`."""
  k = sim.shape[0]
  if np.isscalar(perms):
    perms = rng.permuted(np.tile(np.arange(k), (perms, 1)), axis=1)
  w = np.exp((sim - sim.max(axis=0)) / TAU)
  terms = np.concatenate([w * sim, w], axis=1)
  phi = np.zeros_like(sim)
  for chunk in _chunks(perms, k):
    sums = np.cumsum(terms[chunk], axis=1)  # [c, k, 2 k_a], positions on axis 1
    gains = np.diff(sums[..., :k] / sums[..., k:], axis=1, prepend=0)
    positions = np.argsort(chunk, axis=1)  # np.add.at would be far slower
    phi += np.take_along_axis(gains, positions[..., None], axis=1).sum(axis=0)
  return phi / len(perms)


def torch_loop(sim, perms):
  """A Python loop over permutations, each vectorised over anchors.

  perms: the permutations [M, k], or their number M, then each drawn by torch.randperm."""
  import torch

  k = sim.shape[0]
  if isinstance(perms, int):
    num, perms = perms, (torch.randperm(k, device=sim.device) for _ in range(perms))
  else:
    num = len(perms)
  w = torch.exp((sim - sim.max(dim=0).values) / TAU)
  terms = torch.cat([w * sim, w], dim=1)
  phi = torch.zeros_like(sim)
  zero = torch.zeros_like(sim[:1])
  for perm in perms:
    sums = terms[perm].cumsum(dim=0)
    phi.index_add_(0, perm, torch.diff(sums[:, :k] / sums[:, k:], dim=0, prepend=zero))
  return phi / num


def torch_vectorised(sim, perms):
  """All permutations at once, in memory-bounded chunks.

  perms: the permutations [M, k], or their number M, then drawn by argsorting torch.rand."""
  import torch

  k = sim.shape[0]
  if isinstance(perms, int):
    perms = torch.rand(perms, k, device=sim.device).argsort(dim=1)
  w = torch.exp((sim - sim.max(dim=0).values) / TAU)
  terms = torch.cat([w * sim, w], dim=1)
  phi = torch.zeros_like(sim)
  for chunk in _chunks(perms, k):
    sums = terms[chunk].cumsum(dim=1)  # [c, k, 2 k_a], positions on axis 1
    values = sums[..., :k] / sums[..., k:]
    gains = torch.diff(values, dim=1, prepend=torch.zeros_like(values[:, :1]))
    phi.index_add_(0, chunk.reshape(-1), gains.reshape(-1, k))
  return phi / len(perms)


def _repeated(fn: Callable[[], object], sync: Callable[[object], object],
              calls: int) -> Callable[[], object]:
  """fn called `calls` times, each waited for: latency per call, no overlap of calls."""
  def run():
    for _ in range(calls - 1):
      sync(fn())
    return fn()

  return run


class _Contender:
  """One implementation bound to its inputs: fn() computes phi from permutations it draws,
  check() from the permutations ours draws, sync(out) waits for either."""

  def __init__(self, name: str, fn: Callable[[], object], sync: Callable[[object], object],
               to_numpy: Callable[[object], np.ndarray],
               check: Callable[[], object] | None = None):
    self.name, self.fn, self.sync, self.to_numpy = name, fn, sync, to_numpy
    self.check = check or fn

  def seconds_once(self) -> float:
    begin = time.perf_counter()
    self.sync(self.fn())
    return time.perf_counter() - begin

  def seconds_typical(self, budget_s: float = WARM_BUDGET_S, max_calls: int = 50) -> float:
    """Median seconds per call over up to `max_calls` calls or about `budget_s`: one call
    alone can be many times slower (a thread pool waking up), and would set a turn too short."""
    seconds = [self.seconds_once()]
    while len(seconds) < max_calls and sum(seconds) < budget_s:
      seconds.append(self.seconds_once())
    return float(np.median(seconds))


def _jax_contenders(sim_np, k: int, m: int, device: str, given: bool):
  """Ours (plain and antithetic), the reference phi on ours' permutations, and the input.

  With `given`, ours is timed on the permutations it drew beforehand (shapley_from_permutations).
  """
  import jax

  from shapca_jax import shapley

  target = jax.devices(device)[0]
  sim = jax.device_put(sim_np, target)
  key = jax.device_put(jax.random.key(0), target)
  perms = shapley.sample_permutations(key, m, k)
  from_perms = jax.jit(lambda s, p, anti: shapley.shapley_from_permutations(
      shapley.make_game(s, tau=TAU), p, antithetic=anti), static_argnums=2)
  reference = from_perms(sim, perms, False)

  def ours(anti):
    if given:
      return lambda: from_perms(sim, perms, anti)
    return lambda: shapley.mc_shapley(sim, key, num_permutations=m, tau=TAU, antithetic=anti)

  contenders = [_Contender(name, ours(anti), jax.block_until_ready, np.asarray)
                for name, anti in (("ours", False), ("ours_anti", True))]
  return contenders, np.asarray(reference), np.asarray(perms), (sim, key)


def _torch_contenders(sim_np, perms_np, device: str, loop_max_s: float, given: bool,
                      notes: list[str]):
  import torch

  contenders = []
  torch_devices = ["cpu"] if device == "cpu" else ["cuda"]
  if device == "gpu" and not torch.cuda.is_available():
    notes.append("torch has no CUDA here: no PyTorch contenders")
    torch_devices = []
  for torch_device in torch_devices:
    suffix = "" if torch_device == "cpu" else "_cuda"
    sim = torch.from_numpy(sim_np).to(torch_device)
    perms = torch.from_numpy(perms_np.astype(np.int64)).to(torch_device)

    def sync(x, torch_device=torch_device):
      if torch_device == "cuda":
        torch.cuda.synchronize()
      return x

    to_numpy = lambda x: x.cpu().numpy()
    m = len(perms_np)

    def contender(name, fn, s=sim, p=perms):
      return _Contender(name, lambda: fn(s, p if given else m), sync, to_numpy,
                        check=lambda: fn(s, p))

    contenders.append(contender(f"torch_vec{suffix}", torch_vectorised))
    # One permutation, twice (the first warms up), predicts the loop over M.
    loop_one = _Contender("", lambda s=sim: torch_loop(s, 1), sync, to_numpy)
    loop_one.seconds_once()
    predicted = loop_one.seconds_once() * m
    if predicted <= loop_max_s:
      contenders.append(contender(f"torch_loop{suffix}", torch_loop))
    else:
      notes.append(f"torch_loop{suffix} skipped: one call would take ~{predicted:.0f} s")
  return contenders


def _bytes_accessed(sim, key, m: int) -> float:
  """XLA's estimate of the bytes ours moves, compiled with all permutations in one chunk."""
  import jax

  from shapca_jax import shapley

  compiled = jax.jit(lambda s, key: shapley.mc_shapley(
      s, key, num_permutations=m, tau=TAU, antithetic=False, chunk_size=m)).lower(sim, key).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["bytes accessed"])


def _peak_bytes(sim, key, m: int) -> int:
  """Arguments, outputs and temporaries of ours' compiled call (XLA's memory analysis)."""
  import jax

  from shapca_jax import shapley

  compiled = jax.jit(lambda s, key: shapley.mc_shapley(
      s, key, num_permutations=m, tau=TAU, antithetic=False)).lower(sim, key).compile()
  memory = compiled.memory_analysis()
  return int(memory.argument_size_in_bytes + memory.output_size_in_bytes
             + memory.temp_size_in_bytes)


def bench_size(k: int, m: int, args) -> dict[str, object]:
  sim_np = _similarities(k, seed=k)
  contenders, reference, perms_np, (sim, key) = _jax_contenders(sim_np, k, m, args.device,
                                                                args.given_permutations)
  notes: list[str] = []
  if args.device == "cpu":
    rng = np.random.default_rng(0)
    draws = perms_np if args.given_permutations else m
    contenders.append(_Contender("numpy", lambda: numpy_vectorised(sim_np, draws, rng),
                                 lambda x: x, np.asarray,
                                 check=lambda: numpy_vectorised(sim_np, perms_np)))
  if importlib.util.find_spec("torch") is not None:
    contenders += _torch_contenders(sim_np, perms_np, args.device, args.torch_loop_max_s,
                                    args.given_permutations, notes)
  row: dict[str, object] = {"k": k, "M": m, "d": DIM, "notes": notes}
  warm = {}
  for c in contenders:  # compilation and warm-up, then agreement on the shared permutations
    out = c.to_numpy(c.sync(c.check()))
    if c.name != "ours_anti":
      row[f"max_abs_diff_{c.name}"] = float(np.max(np.abs(out - reference)))
    warm[c.name] = c.seconds_typical()
  # A turn of a fast contender repeats its call for about TURN_S (at most MAX_CALLS_PER_TURN
  # calls), so that it is not timed only right after a switch, when its thread pool has just
  # gone idle; as many turns as fit in the time budget.
  burst = {n: int(np.clip(TURN_S / t, 1, MAX_CALLS_PER_TURN)) for n, t in warm.items()}
  iters = int(np.clip(args.seconds_per_size / sum(burst[n] * t for n, t in warm.items()),
                      args.min_iters, args.max_iters))
  times = timing.interleaved_times({c.name: (_repeated(c.fn, c.sync, burst[c.name]), c.sync)
                                    for c in contenders}, warmup=0, iters=iters)
  row["turns"], row["calls_per_turn"] = iters, burst
  for name, seconds in times.items():
    row[f"{name}_s"] = float(np.median(seconds)) / burst[name]
  for name in times:
    if not name.startswith("ours"):
      row[f"speedup_vs_{name}"] = row[f"{name}_s"] / row["ours_s"]
  row["ours_peak_bytes"] = _peak_bytes(sim, key, m)
  if args.device == "gpu":
    row["ours_bytes_accessed"] = _bytes_accessed(sim, key, m)
    row["ours_gbps"] = row["ours_bytes_accessed"] / row["ours_s"] / 1e9
    row["ours_peak_fraction"] = row["ours_gbps"] / args.peak_gbps
  return row


def _format(rows: list[dict[str, object]]) -> str:
  """A markdown table: median times, speed-ups of ours, and bandwidth on GPU."""
  names = []
  for r in rows:
    names += [c[:-2] for c in r if c.endswith("_s") and c[:-2] not in names
              and not c.endswith("_max_s")]
  baselines = [n for n in names if not n.startswith("ours")]
  gpu = "ours_gbps" in rows[0]
  header = (["k", "M"] + [f"{n} (ms)" for n in names] + [f"ours vs {n}" for n in baselines]
            + (["ours GB/s", "% of peak"] if gpu else []) + ["ours peak MiB"])
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for r in rows:
    cells = [str(r["k"]), str(r["M"])]
    cells += [f"{r[f'{n}_s'] * 1e3:.3g}" if f"{n}_s" in r else "skipped" for n in names]
    cells += [f"{r[f'speedup_vs_{n}']:.1f}x" if f"speedup_vs_{n}" in r else "-" for n in baselines]
    if gpu:
      cells += [f"{r['ours_gbps']:.0f}", f"{100 * r['ours_peak_fraction']:.0f}%"]
    cells.append(f"{r['ours_peak_bytes'] / 2**20:.1f}")
    lines.append("| " + " | ".join(cells) + " |")
  notes = [f"k={r['k']}, M={r['M']}: {n}" for r in rows for n in r["notes"]]
  return "\n".join(lines + ([""] + notes if notes else []))


def _pin_cpus(cpus: int) -> None:
  """Restrict this process to `cpus` cores before JAX and PyTorch start their thread pools."""
  allowed = sorted(os.sched_getaffinity(0))
  if not 0 < cpus <= len(allowed):
    raise SystemExit(f"--cpus={cpus}: this process may use {len(allowed)} cores")
  os.sched_setaffinity(0, allowed[:cpus])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
  parser.add_argument("--quick", action="store_true", help="small sizes only (a short CPU run)")
  parser.add_argument("--sizes", nargs="+", default=None, metavar="KxM",
                      help="only these sizes, e.g. 32x64 1024x256 (default: the k x M grid)")
  parser.add_argument("--cpus", type=int, default=None,
                      help="pin the run to this many cores; torch uses as many threads")
  parser.add_argument("--seconds_per_size", type=float, default=None,
                      help="timing budget per size (default: 4 on CPU, 1.5 on GPU)")
  parser.add_argument("--min_iters", type=int, default=3)
  parser.add_argument("--max_iters", type=int, default=2000)
  parser.add_argument("--torch_loop_max_s", type=float, default=20.0,
                      help="skip the torch loop where one call would take longer")
  parser.add_argument("--peak_gbps", type=float, default=3350.0,
                      help="the GPU's peak memory bandwidth (default: H100 SXM)")
  parser.add_argument("--given_permutations", action="store_true",
                      help="time every contender on ours' permutations, drawn beforehand")
  parser.add_argument("--cpu_threefry", action=argparse.BooleanOptionalAction, default=True,
                      help="on CPU, hash large threefry draws as straight-line code "
                      "(shapca_jax.cpu_threefry, as config.cpu_threefry does for training)")
  parser.add_argument("--output", type=pathlib.Path, default=None)
  args = parser.parse_args()
  if args.seconds_per_size is None:
    args.seconds_per_size = 4.0 if args.device == "cpu" else 1.5
  if args.cpus:
    _pin_cpus(args.cpus)
  has_torch = importlib.util.find_spec("torch") is not None
  if has_torch and args.cpus:
    import torch

    torch.set_num_threads(args.cpus)
  # The repository root, for shapca_jax where the package is not installed.
  sys.path.insert(1, str(pathlib.Path(__file__).resolve().parents[1]))
  # JAX takes GPU memory as it needs it, leaving the rest to PyTorch.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  import jax

  if args.cpu_threefry and args.device == "cpu":
    from shapca_jax import cpu_threefry
    cpu_threefry.install()
  sizes = QUICK_SIZES if args.quick else (GRID if args.device == "gpu" else FULL_SIZES)
  if args.sizes:
    sizes = [tuple(int(n) for n in size.split("x")) for size in args.sizes]
  output = args.output or pathlib.Path(f"results/bench_shapley_{args.device}.json")
  output.parent.mkdir(parents=True, exist_ok=True)
  meta = {"device": str(jax.devices(args.device)[0]), "jax": jax.__version__,
          "machine": platform.processor() or platform.machine(), "tau": TAU,
          "utility": "softmax_expectation", "timing": "median over interleaved turns",
          "cores_used": len(os.sched_getaffinity(0)), "command": " ".join(sys.argv),
          "load_average_before": os.getloadavg(), "peak_gbps": args.peak_gbps,
          "cpu_threefry": args.cpu_threefry}
  if has_torch:
    import torch

    meta["torch"] = torch.__version__
    meta["torch_threads"] = torch.get_num_threads()
  begin = time.perf_counter()
  rows = []
  for k, m in sizes:
    rows.append(bench_size(k, m, args))
    print(f"k={k} M={m}: ours {rows[-1]['ours_s'] * 1e3:.3f} ms", flush=True)
    meta.update(load_average_after=os.getloadavg(), wall_s=time.perf_counter() - begin)
    # Written after every size, so that a run cut short keeps what it measured.
    output.write_text(json.dumps({"meta": meta, "rows": rows, "table": _format(rows)}, indent=2))
  print(_format(rows))
  print(f"wrote {output} ({meta['wall_s']:.0f} s)")


if __name__ == "__main__":
  main()
