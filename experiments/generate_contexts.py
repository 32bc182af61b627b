r"""Generates a context for every image with a large multimodal model, resumably.

Against an OpenAI-compatible server (e.g. `vllm serve llava-hf/llava-1.5-7b-hf`):

  python experiments/generate_contexts.py --images /data/mnre/images \
      --out contexts/mnre_llava15.jsonl \
      --base_url http://localhost:8000/v1 --model llava-hf/llava-1.5-7b-hf --concurrency 16

Only the images of one data set split (ids read by the data layer, files under --images):

  python experiments/generate_contexts.py --images /data/mnre/images \
      --dataset mnre --split train --data_dir /data --out contexts/mnre_train.jsonl ...

With a local LLaVA-1.5 folder on a GPU: `--backend transformers --model_dir /ckpt/llava-1.5-7b-hf`.

Run the same command again to continue a killed job: ids already in --out are skipped. The exit
status is 0 only when every image has its context; failures and their reasons are listed in
`<out stem>.failures.jsonl` and in the summary printed at the end.
"""

import argparse
import logging
import pathlib
import sys

from shapca_jax.contextgen import backends
from shapca_jax.contextgen import images
from shapca_jax.contextgen import prompts
from shapca_jax.contextgen import runner


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  inputs = parser.add_argument_group("inputs and outputs")
  inputs.add_argument("--images", required=True, help="image folder (searched recursively)")
  inputs.add_argument("--dataset", help="describe only this data set's images (e.g. mnre)")
  inputs.add_argument("--split", help="the data set split, with --dataset")
  inputs.add_argument("--data_dir", help="the data set folder, with --dataset")
  inputs.add_argument("--out", required=True, help="contexts JSONL (appended, resumable)")
  inputs.add_argument("--failures", help="failures JSONL (default: <out stem>.failures.jsonl)")
  inputs.add_argument("--sort", action="store_true",
                      help="rewrite --out ordered by image id at the end (atomically)")
  inputs.add_argument("--allow_mixed", action="store_true",
                      help="add to --out even if its contexts came from another generator/prompt")
  inputs.add_argument("--no_progress", action="store_true", help="no progress bar")

  generation = parser.add_argument_group("generation")
  generation.add_argument("--backend", choices=("openai", "transformers"), default="openai")
  generation.add_argument("--prompt", default=prompts.DEFAULT_PROMPT,
                          help="instruction sent with each image (default: %(default)r)")
  generation.add_argument("--prompt_file", help="read the instruction from this file instead")
  generation.add_argument("--generator", help="name written to the `generator` field "
                          "(default: openai:<model> or transformers:<model_dir name>)")
  generation.add_argument("--max_tokens", type=int, default=512, help="longest context, in tokens")

  openai = parser.add_argument_group("openai backend")
  openai.add_argument("--base_url", help="API root, e.g. http://localhost:8000/v1")
  openai.add_argument("--model", help="served model name, e.g. llava-hf/llava-1.5-7b-hf")
  openai.add_argument("--api_key_env", default="OPENAI_API_KEY",
                      help="environment variable holding the API key (default: %(default)s)")
  openai.add_argument("--concurrency", type=int, default=8, help="requests in flight")
  openai.add_argument("--timeout_s", type=float, default=120.0,
                      help="seconds for the connection and each read or write "
                      "(default: %(default)s)")
  openai.add_argument("--max_retries", type=int, default=5,
                      help="retries per image of connection errors, timeouts, 408/409/429, 5xx "
                      "and malformed bodies, with the openai client's backoff and Retry-After "
                      "(default: %(default)s)")
  openai.add_argument("--temperature", type=float, default=0.0)

  local = parser.add_argument_group("transformers backend")
  local.add_argument("--model_dir", help="local llava-hf LLaVA-1.5 checkpoint folder")
  local.add_argument("--batch_size", type=int, default=8)
  local.add_argument("--device", default="auto", help="cuda, cpu or auto")
  local.add_argument("--dtype", default="auto", help="float16, bfloat16, float32 or auto")

  args = parser.parse_args(argv)
  if args.dataset and not (args.split and args.data_dir):
    parser.error("--dataset needs --split and --data_dir")
  if args.backend == "openai" and not (args.base_url and args.model):
    parser.error("the openai backend needs --base_url and --model")
  if args.backend == "transformers" and not args.model_dir:
    parser.error("the transformers backend needs --model_dir")
  return args


def build_backend(args: argparse.Namespace, prompt: str) -> backends.Backend:
  if args.backend == "openai":
    config = backends.OpenAIConfig(
        base_url=args.base_url, model=args.model, api_key_env=args.api_key_env,
        timeout_s=args.timeout_s, max_retries=args.max_retries, max_tokens=args.max_tokens,
        temperature=args.temperature, concurrency=args.concurrency)
    return backends.OpenAIBackend(config, prompt, generator=args.generator)
  config = backends.TransformersConfig(args.model_dir, batch_size=args.batch_size,
                                       max_new_tokens=args.max_tokens, device=args.device,
                                       dtype=args.dtype)
  return backends.TransformersBackend.from_pretrained(config, prompt, generator=args.generator)


def main(argv: list[str] | None = None) -> int:
  """Exit status: 0 when every image has its context, 1 when some failed, 2 for bad input."""
  args = parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  # A line per request and per retry would drown the progress bar; failures are in the summary.
  for client_logger in ("openai", "httpx", "httpx2"):
    logging.getLogger(client_logger).setLevel(logging.WARNING)
  try:
    prompt = (pathlib.Path(args.prompt_file).read_text("utf-8") if args.prompt_file
              else args.prompt)
    if args.dataset:
      refs = images.refs_from_dataset(args.dataset, args.split, args.data_dir, args.images)
    else:
      refs = images.refs_from_folder(args.images)
    summary = runner.generate_contexts(refs, build_backend(args, prompt), args.out,
                                       failures_path=args.failures, sort=args.sort,
                                       allow_mixed=args.allow_mixed,
                                       progress=not args.no_progress)
  except (ValueError, OSError) as e:  # Bad flags, files or data: say what, without a traceback.
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(summary.format())
  return 0 if summary.ok else 1


if __name__ == "__main__":
  sys.exit(main())
