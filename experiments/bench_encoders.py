"""Benchmark: forward time of our Flax BERT against PyTorch eager `BertModel`, same machine.

A BERT-base-sized model (transformers' default BertConfig, random weights) encodes a batch of
16 x 128 token ids with random right padding. PyTorch builds the model, saves it as safetensors
and our loader reads that folder, so both sides run the same weights; the largest difference
of their last hidden states is reported next to the times, so a fast but wrong result cannot
pass unnoticed. Optionally the CLIP ViT-B/32 vision tower is timed the same way.

  python experiments/bench_encoders.py --device cpu --output results/bench_encoders_cpu.json
  python experiments/bench_encoders.py --device gpu --dtype bfloat16 --encoders bert,clip

`--dtype bfloat16` runs our encoder with bf16 compute (fp32 params) and PyTorch under
`torch.autocast`. torch/transformers are imported only when present; without them only ours
is timed (random weights from `init_encoder`).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import tempfile

import numpy as np

import timing  # experiments/ is on sys.path as the script dir

def _summary(times: list[float]) -> dict[str, object]:
  return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
          "all_ms": [round(1e3 * t, 2) for t in times]}


def _inputs(encoder: str, batch: int, length: int, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  if encoder == "clip":
    return {"pixel_values": rng.normal(size=(batch, 224, 224, 3)).astype(np.float32)}
  lengths = rng.integers(length // 4, length + 1, size=batch)
  lengths[0] = length
  return {"input_ids": rng.integers(1000, 30000, size=(batch, length)),
          "token_type_ids": np.zeros((batch, length), np.int64),
          "attention_mask": (np.arange(length)[None] < lengths[:, None]).astype(np.int64)}


def _torch_model(encoder: str, folder: pathlib.Path):
  """A random PyTorch model saved to `folder`, or None when torch/transformers are absent."""
  try:
    import torch
    import transformers
  except ImportError:
    return None
  torch.manual_seed(0)
  if encoder == "clip":
    model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig())
  else:
    model = transformers.BertModel(transformers.BertConfig())
  model.eval().save_pretrained(folder)
  return model


def _torch_runner(model, encoder: str, data: dict[str, np.ndarray], args) -> timing.Runner:
  import torch

  target = torch.device("cuda" if args.device == "gpu" else "cpu")
  model = model.to(target)
  if encoder == "clip":
    feed = {"pixel_values": torch.from_numpy(data["pixel_values"].transpose(0, 3, 1, 2))}
  else:
    feed = {k: torch.from_numpy(v) for k, v in data.items()}
  feed = {k: v.to(target) for k, v in feed.items()}
  autocast = torch.autocast(target.type, dtype=torch.bfloat16,
                            enabled=args.dtype == "bfloat16")

  def forward():
    with torch.inference_mode(), autocast:
      return model(**feed).last_hidden_state

  def sync(_):
    if target.type == "cuda":
      torch.cuda.synchronize()

  return forward, sync


def _our_runner(encoder: str, folder: pathlib.Path | None, data: dict[str, np.ndarray],
                args) -> timing.Runner:
  import jax
  import jax.numpy as jnp

  from shapca_jax.models import weights
  from shapca_jax.models.bert import BertConfig
  from shapca_jax.models.vision import VisionConfig

  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  if folder is not None:
    module, params, _ = weights.load_hf_encoder(folder, dtype=dtype,
                                                attention_implementation=args.attention)
  else:
    config = VisionConfig.clip() if encoder == "clip" else BertConfig()
    module, params = weights.init_encoder(config, jax.random.key(0), dtype=dtype,
                                          attention_implementation=args.attention)
  target = jax.devices()[0]
  params = jax.device_put(params, target)
  feed = jax.device_put({k: v.astype(np.int32) if v.dtype == np.int64 else v
                         for k, v in data.items()}, target)

  @jax.jit
  def forward(params, feed):
    out = module.apply({"params": params}, **feed)
    return out[0] if encoder == "clip" else out

  return (lambda: forward(params, feed)), jax.block_until_ready


def _environment(args) -> dict[str, object]:
  import jax

  env = {"jax_version": jax.__version__, "jax_backend": jax.default_backend(),
         "jax_device_kind": jax.devices()[0].device_kind}
  try:
    import torch
  except ImportError:
    return env
  return {**env, "torch_version": torch.__version__, "torch_threads": torch.get_num_threads()}


def _as_numpy(out) -> np.ndarray:
  if hasattr(out, "detach"):
    return out.detach().float().cpu().numpy()
  return np.asarray(out, dtype=np.float32)


def _run(encoder: str, args) -> dict[str, object]:
  data = _inputs(encoder, args.batch, args.length)
  with tempfile.TemporaryDirectory() as tmp:
    torch_model = None if args.skip_torch else _torch_model(encoder, pathlib.Path(tmp))
    runners = {"ours": _our_runner(encoder, pathlib.Path(tmp) if torch_model else None, data,
                                   args)}
  if torch_model is not None:
    runners["pytorch_eager"] = _torch_runner(torch_model, encoder, data, args)
  times = timing.interleaved_times(runners, args.warmup, args.iters)
  result: dict[str, object] = {"encoder": encoder,
                               **{name: _summary(t) for name, t in times.items()}}
  if torch_model is None:
    return result
  ours, theirs = (_as_numpy(runners[name][0]()) for name in ("ours", "pytorch_eager"))
  diff = np.abs(ours - theirs)
  if encoder == "bert":  # padded positions carry no meaning; compare real tokens
    diff = diff[data["attention_mask"].astype(bool)]
  result.update(max_abs_diff=float(diff.max()),
                ours_over_pytorch=statistics.median(times["ours"])
                / statistics.median(times["pytorch_eager"]))
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--encoders", default="bert", help="comma-separated: bert, clip")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--length", type=int, default=128, help="BERT sequence length")
  parser.add_argument("--warmup", type=int, default=None, help="default: 1 on cpu, 3 on gpu")
  parser.add_argument("--iters", type=int, default=None, help="default: 3 on cpu, 20 on gpu")
  parser.add_argument("--attention", default=None,
                      help="implementation for jax.nn.dot_product_attention (xla, cudnn)")
  parser.add_argument("--skip_torch", action="store_true")
  parser.add_argument("--output", default=None,
                      help="JSON path (default results/bench_encoders_<device>_<dtype>.json)")
  args = parser.parse_args()
  args.warmup = args.warmup if args.warmup is not None else (1 if args.device == "cpu" else 3)
  args.iters = args.iters if args.iters is not None else (3 if args.device == "cpu" else 20)
  # Must happen before JAX initialises a backend.
  os.environ["JAX_PLATFORMS"] = "cpu" if args.device == "cpu" else "cuda"

  results = [_run(encoder.strip(), args) for encoder in args.encoders.split(",")]
  report = {"device": args.device, "dtype": args.dtype, "batch": args.batch,
            "length": args.length, "warmup": args.warmup, "iters": args.iters,
            "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg(), **_environment(args), "results": results}
  for r in results:
    line = f"{r['encoder']}: ours {r['ours']['median_ms']:.1f} ms"
    if "pytorch_eager" in r:
      line += (f", PyTorch eager {r['pytorch_eager']['median_ms']:.1f} ms, ours/PyTorch "
               f"{r['ours_over_pytorch']:.2f}, max |diff| {r['max_abs_diff']:.1e}")
    print(line)
  output = pathlib.Path(args.output or f"results/bench_encoders_{args.device}_{args.dtype}.json")
  output.parent.mkdir(parents=True, exist_ok=True)
  output.write_text(json.dumps(report, indent=2))
  print(f"wrote {output}")


if __name__ == "__main__":
  main()
