"""Benchmark: the training loop's steps/s against its own compiled step called back to back.

The loop is the production one: ``train.train_and_evaluate`` on the main Twitter-2017 config
(BLIP-2 contexts, batch 16, the data of ``data/twitter2017``), stopped after ``--steps`` steps
(``config.max_steps``). Through ``train.LoopProbe`` it hands back the step it compiled, the
device batches it fed that step, its final state and its timer; the same step then runs back
to back on those batches, already on device, from that state. Their ratio is the loop's
efficiency: the share of the step's speed the loop keeps. Each round trains in a fresh workdir
and then times the step, so load from other processes hits both alike; medians are reported.

  python experiments/bench_loop.py --preset tiny --steps 200 --json results/bench_loop_tiny.json
  python experiments/bench_loop.py --preset minilm --steps 100
  python experiments/bench_loop.py --preset bert-base --steps 20

Presets (text encoder): ``tiny`` a 2-layer BERT of hidden size 32 with random weights, built in
a temporary folder (as the tests build theirs); ``minilm`` the installed all-MiniLM-L6-v2
weights; ``bert-base`` a BERT-base-shaped checkpoint with random weights (no BERT-base weights
exist offline). All three use MiniLM's tokenizer (the BERT uncased vocabulary).

The JSON has ``loop_steps_per_second`` (steps over the loop's wall time, evaluation and the
alignment diagnostics of the log steps left out, as in the steps/s training reports; checkpoint
writes kept in), ``step_steps_per_second``, ``loop_efficiency`` (their ratio; also
``loop_efficiency_with_diagnostics``, which keeps the diagnostics in) and
``loop_seconds``: the host seconds of the loop's sections (``train.LoopTimer``):
``input_wait`` for the prefetch thread, ``dispatch`` of the step, ``device_wait`` at log
steps, ``logging``, ``checkpoint``, and ``prefetch_input`` / ``prefetch_host_to_device`` (the
background thread's own time, overlapping the steps).

This runs the real loop, so it needs the whole data stack (tensorflow-datasets, grain) and,
for the random checkpoints, PyTorch and transformers.
"""

import argparse
import json
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import time

PRESETS = ("tiny", "minilm", "bert-base")
RANDOM_BERTS = {
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64),
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072),
}
# The BERT uncased vocabulary and BERT's position and token-type tables.
BERT_VOCAB = dict(vocab_size=30522, max_position_embeddings=512, type_vocab_size=2)
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json")
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def write_random_bert(folder: pathlib.Path, tokenizer_dir: pathlib.Path, **sizes) -> pathlib.Path:
  """A randomly initialised BERT of ``sizes`` saved by transformers, with the given tokenizer."""
  import torch
  import transformers
  torch.manual_seed(0)
  config = transformers.BertConfig(**BERT_VOCAB, **sizes)
  transformers.BertModel(config, add_pooling_layer=False).save_pretrained(
      folder, safe_serialization=True)
  for name in TOKENIZER_FILES:
    if (tokenizer_dir / name).exists():
      shutil.copy(tokenizer_dir / name, folder / name)
  return folder


def bench_config(preset: str, steps: int, scratch: pathlib.Path):
  sys.path.insert(0, str(REPO_ROOT / "experiments" / "configs"))
  import twitter17  # pylint: disable=import-outside-toplevel
  from shapca_jax.data import tokenization

  config = twitter17.get_config()
  config.max_steps = steps
  config.progress_bar = False  # its own overhead is another issue's; keep the output readable
  if preset in RANDOM_BERTS:
    folder = scratch / preset
    if not folder.is_dir():
      write_random_bert(folder, tokenization.default_tokenizer_dir(), **RANDOM_BERTS[preset])
    config.text_encoder = str(folder)
  return config


def time_step(probe) -> float:
  """Seconds of the probe's step over all its batches, back to back, from its final state, with
  the batches on the devices before the clock starts."""
  import jax
  state = probe.state
  batches = jax.block_until_ready([probe.put(batch) for batch in probe.batches])
  jax.block_until_ready(state)
  began = time.perf_counter()
  for batch in batches:
    state, metrics = probe.step_fn(state, batch, probe.rng)
  jax.block_until_ready((state, metrics))
  probe.state = state
  return time.perf_counter() - began


def one_round(config, scratch: pathlib.Path, index: int) -> dict:
  from shapca_jax import train

  workdir = scratch / f"run{index}"
  shared_tfds = scratch / "tfds"
  shared_tfds.mkdir(exist_ok=True)
  workdir.mkdir()
  (workdir / "tfds").symlink_to(shared_tfds)  # prepare the TFDS records once for all rounds
  probe = train.LoopProbe()
  load_before = os.getloadavg()[0]
  results = train.train_and_evaluate(config, workdir, probe=probe)
  timer = probe.timer
  # Evaluation and the alignment diagnostics (log steps only) are measurements, not training:
  # left out as train's own steps/s leaves them out. Checkpoint writes stay in.
  measuring = {name: timer.excluded.get(name, 0.0) for name in ("evaluation", "diagnostics")}
  loop_seconds = timer.loop_seconds - sum(measuring.values())
  step_seconds = time_step(probe)
  steps = len(probe.batches)
  shutil.rmtree(workdir / "checkpoints", ignore_errors=True)
  return {
      "steps": steps,
      "loop_steps_per_second": steps / loop_seconds,
      "step_steps_per_second": steps / step_seconds,
      "loop_efficiency": step_seconds / loop_seconds,
      "loop_efficiency_with_diagnostics": step_seconds / (loop_seconds
                                                          + measuring["diagnostics"]),
      "diagnostics_seconds": round(measuring["diagnostics"], 3),
      "loop_seconds": {name: round(t, 3) for name, t in sorted(timer.sections.items())},
      "compile_seconds": results["compile_seconds"],
      "train_padded_token_fraction": results["data"]["train"].get("padded_token_fraction"),
      "load_average_1min": [load_before, os.getloadavg()[0]],
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", choices=PRESETS, default="tiny")
  parser.add_argument("--steps", type=int, default=None,
                      help="loop steps per round (default: 200 tiny, 100 minilm, 20 bert-base)")
  parser.add_argument("--rounds", type=int, default=2, help="loop + step rounds, alternating")
  parser.add_argument("--json", default=None, help="write the results here")
  args = parser.parse_args()
  steps = args.steps or {"tiny": 200, "minilm": 100, "bert-base": 20}[args.preset]
  with tempfile.TemporaryDirectory(prefix="bench_loop_") as scratch:
    scratch = pathlib.Path(scratch)
    config = bench_config(args.preset, steps, scratch)
    rounds = []
    for index in range(args.rounds):
      rounds.append(one_round(config, scratch, index))
      print(json.dumps(rounds[-1]), flush=True)
  summary = {"preset": args.preset, "steps": steps, "rounds": rounds}
  for key in ("loop_steps_per_second", "step_steps_per_second", "loop_efficiency"):
    summary[key] = statistics.median(r[key] for r in rounds)
  summary["loop_seconds_per_step"] = {
      name: round(statistics.median(r["loop_seconds"].get(name, 0.0) for r in rounds) / steps, 5)
      for name in sorted({n for r in rounds for n in r["loop_seconds"]})}
  print(f"{args.preset}: loop {summary['loop_steps_per_second']:.2f} steps/s, step "
        f"{summary['step_steps_per_second']:.2f} steps/s, efficiency "
        f"{summary['loop_efficiency']:.3f}; host seconds per step {summary['loop_seconds_per_step']}")
  if args.json:
    path = pathlib.Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
  main()
