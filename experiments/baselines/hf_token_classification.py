"""The recipe a user would pick instead of Shap-CA: transformers token classification.

``AutoModelForTokenClassification`` on the same text encoder (default: the installed
all-MiniLM-L6-v2), fine-tuned the way the transformers NER example does it: the label of each
word on its first word piece (-100 elsewhere), dynamic padding per batch
(``DataCollatorForTokenClassification``), AdamW (weight decay off for biases and LayerNorm)
with linear warm-up over the first 10% of the steps then linear decay, one learning rate,
seqeval entity P/R/F1 on dev after every epoch, and the test split scored with the weights of
the best dev epoch. It reads our data: ``shapca_jax.data.readers`` and the same contexts,
laid out like ours as ``[CLS] text [SEP] context [SEP]`` (the context truncated first), the
same seed for the initialisation of the head and the batch order.

  python experiments/baselines/hf_token_classification.py --workdir workdirs/hf_t17 --epochs 3

As a suite row (``ablation-t17``'s ``hf-recipe``) it follows the experiment protocol:
``--epochs 10 --stop_after_epochs 7 --evals_per_epoch 2`` trains the first 7 epochs of a
10-epoch schedule and scores dev every half epoch, and ``test_predictions.jsonl.gz`` keeps each
test sentence's predicted tags and its correct / predicted / gold entity counts (seqeval's
entities), for the suite's paired bootstrap. A killed run starts again from the beginning.

``workdir/results.json`` has the fields of ours that apply (``dev``/``test`` precision, recall,
f1, ``best_step``, ``steps``, ``steps_per_second`` with evaluation left out, ``wall_seconds``,
``seconds_per_epoch``, ``padded_token_fraction``); ``workdir/metrics.jsonl`` has the training
loss every ``--log_every`` steps and one dev record per evaluation with the seconds since the
start, in the format of ours. Words the tokenizer maps to no piece, or cut off by ``--max_length``,
are predicted O (scored against their gold tags).
"""

import argparse
import gzip
import json
import pathlib
import time

import numpy as np
import seqeval.metrics
import torch
import transformers

from shapca_jax.data import contexts, labels, readers, tokenization

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
IGNORE = -100


def read(dataset: str, split: str, data_dir: str, context_source: str):
  examples = readers.read_split(dataset, split, data_dir)
  if context_source:
    examples = contexts.attach_contexts(examples, dataset, split, data_dir, context_source)[0]
  return examples


def encode(examples, tokenizer, max_length: int) -> list[dict]:
  """Features of each example: ids, token types and first-piece labels, plus the index of
  each word's first piece (-1 when it has none in the input) for decoding."""
  features = []
  for e in examples:
    context = (e.context or "").split()
    enc = tokenizer(list(e.words), context or None, is_split_into_words=True,
                    truncation="only_second" if context else True, max_length=max_length)
    if len(enc["input_ids"]) > max_length:  # the text alone is too long
      enc = tokenizer(list(e.words), is_split_into_words=True, truncation=True,
                      max_length=max_length)
    word_ids, sequence = enc.word_ids(), enc.sequence_ids()
    first = [-1] * len(e.words)
    piece_labels = []
    for position, (word, seq) in enumerate(zip(word_ids, sequence)):
      if seq == 0 and word is not None and first[word] == -1:
        first[word] = position
        piece_labels.append(labels.MNER_LABEL_IDS[e.tags[word]])
      else:
        piece_labels.append(IGNORE)
    features.append({"input_ids": enc["input_ids"], "token_type_ids": enc["token_type_ids"],
                     "attention_mask": enc["attention_mask"], "labels": piece_labels,
                     "first_piece": first})
  return features


def batches(features, indices, collator, batch_size: int):
  for start in range(0, len(indices), batch_size):
    chunk = [features[i] for i in indices[start:start + batch_size]]
    yield collator([{k: v for k, v in f.items() if k != "first_piece"} for f in chunk]), chunk


@torch.no_grad()
def predict(model, features, collator, batch_size: int) -> list[list[str]]:
  """The tag of each word: its first piece's, O for words with no piece in the input."""
  model.eval()
  predicted = []
  for batch, chunk in batches(features, list(range(len(features))), collator, batch_size):
    ids = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.argmax(-1).numpy()
    for row, f in zip(ids, chunk):
      predicted.append([labels.MNER_LABELS[row[p]] if p >= 0 else "O" for p in f["first_piece"]])
  model.train()
  return predicted


def scores(examples, predicted: list[list[str]]) -> dict:
  gold = [list(e.tags) for e in examples]
  return {"precision": float(seqeval.metrics.precision_score(gold, predicted)),
          "recall": float(seqeval.metrics.recall_score(gold, predicted)),
          "f1": float(seqeval.metrics.f1_score(gold, predicted))}


def write_test_predictions(path: pathlib.Path, examples, predicted: list[list[str]]) -> None:
  """One line per test sentence, with seqeval's entity counts (their sums give its micro F1)."""
  with gzip.open(path, "wt") as f:
    for index, (e, tags) in enumerate(zip(examples, predicted)):
      gold = set(seqeval.metrics.sequence_labeling.get_entities(list(e.tags)))
      pred = set(seqeval.metrics.sequence_labeling.get_entities(tags))
      f.write(json.dumps({"index": index, "pred": tags, "num_correct": len(gold & pred),
                          "num_pred": len(pred), "num_gold": len(gold)}) + "\n")


def evaluation_steps(steps_per_epoch: int, evals_per_epoch: int, last_step: int) -> set[int]:
  """Every 1/evals_per_epoch of an epoch (rounded to a step), and the last step."""
  within = {round(steps_per_epoch * i / evals_per_epoch) for i in range(1, evals_per_epoch + 1)}
  steps = {epoch * steps_per_epoch + s for epoch in range(-(-last_step // steps_per_epoch))
           for s in within}
  return {s for s in steps if s <= last_step} | {last_step}


def optimizer_groups(model, weight_decay: float) -> list[dict]:
  """AdamW groups as the transformers Trainer makes them: no decay on biases and LayerNorm."""
  decay, no_decay = [], []
  for name, param in model.named_parameters():
    (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(param)
  return [{"params": decay, "weight_decay": weight_decay},
          {"params": no_decay, "weight_decay": 0.0}]


def _append(path: pathlib.Path, record: dict) -> None:
  with path.open("a") as f:
    f.write(json.dumps(record) + "\n")


def run(args) -> dict:
  start = time.time()
  torch.manual_seed(args.seed)
  workdir = pathlib.Path(args.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  log = workdir / "metrics.jsonl"
  log.unlink(missing_ok=True)
  encoder_dir = args.text_encoder or str(tokenization.default_tokenizer_dir())
  tokenizer = transformers.AutoTokenizer.from_pretrained(encoder_dir)
  model = transformers.AutoModelForTokenClassification.from_pretrained(
      encoder_dir, num_labels=len(labels.MNER_LABELS),
      id2label=dict(enumerate(labels.MNER_LABELS)), label2id=dict(labels.MNER_LABEL_IDS))
  splits = {s: read(args.dataset, s, args.data_dir, args.contexts)
            for s in ("train", "valid", "test")}
  features = {s: encode(e, tokenizer, args.max_length) for s, e in splits.items()}
  collator = transformers.DataCollatorForTokenClassification(tokenizer)
  steps_per_epoch = -(-len(features["train"]) // args.batch_size)
  total = args.epochs * steps_per_epoch  # the learning-rate schedule's length
  last_step = min(args.stop_after_epochs or args.epochs, args.epochs) * steps_per_epoch
  if args.max_steps > 0:
    total = last_step = min(total, args.max_steps)
  evaluated = evaluation_steps(steps_per_epoch, args.evals_per_epoch, last_step)
  optimizer = torch.optim.AdamW(optimizer_groups(model, args.weight_decay), lr=args.learning_rate)
  schedule = transformers.get_linear_schedule_with_warmup(
      optimizer, int(args.warmup_ratio * total), total)
  order = torch.Generator().manual_seed(args.seed)
  step, train_seconds, best, best_state = 0, 0.0, None, None
  real_tokens = padded_tokens = 0
  model.train()
  while step < last_step:
    indices = torch.randperm(len(features["train"]), generator=order).tolist()
    began = time.perf_counter()
    for batch, _ in batches(features["train"], indices, collator, args.batch_size):
      real_tokens += int(batch["attention_mask"].sum())
      padded_tokens += batch["attention_mask"].numel()
      loss = model(**batch).loss
      loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip_norm)
      optimizer.step()
      schedule.step()
      optimizer.zero_grad()
      step += 1
      if step % args.log_every == 0:
        _append(log, {"step": step, "loss": float(loss.detach())})
      if step in evaluated:
        train_seconds += time.perf_counter() - began
        dev = scores(splits["valid"], predict(model, features["valid"], collator,
                                              args.eval_batch_size))
        _append(log, {"step": step, "epoch": step / steps_per_epoch,
                      "seconds": round(time.time() - start, 2), "dev": dev})
        print(f"step {step}: dev F1 {dev['f1']:.4f}", flush=True)
        if best is None or dev["f1"] > best[1]["f1"]:
          best = (step, dev)
          best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        began = time.perf_counter()
      if step == last_step:
        break
    train_seconds += time.perf_counter() - began
  model.load_state_dict(best_state)
  test_predicted = predict(model, features["test"], collator, args.eval_batch_size)
  write_test_predictions(workdir / "test_predictions.jsonl.gz", splits["test"], test_predicted)
  results = {
      "task": "mner",
      "dataset": args.dataset,
      "seed": args.seed,
      "recipe": "transformers AutoModelForTokenClassification",
      "best_step": best[0],
      "last_step": step,
      "dev": best[1],
      "test": scores(splits["test"], test_predicted),
      "steps": total,
      "steps_per_second": step / train_seconds,
      "seconds_per_epoch": train_seconds * steps_per_epoch / step,
      "padded_token_fraction": round(1 - real_tokens / padded_tokens, 4),
      "compile_seconds": 0.0,
      "wall_seconds": time.time() - start,
      "torch_threads": torch.get_num_threads(),
      "config": {**{k: v for k, v in vars(args).items() if k != "workdir"},
                 "num_epochs": args.epochs},
  }
  (workdir / "results.json").write_text(json.dumps(results, indent=2))
  return results


def arguments() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--text_encoder", default="", help="default: the installed MiniLM")
  parser.add_argument("--dataset", default="twitter2017", choices=("twitter2015", "twitter2017"))
  parser.add_argument("--data_dir", default=str(REPO_ROOT / "data"))
  parser.add_argument("--contexts", default="blip2", help="'' for text only")
  parser.add_argument("--epochs", type=int, default=3, help="the learning-rate schedule's epochs")
  parser.add_argument("--stop_after_epochs", type=int, default=0,
                      help="> 0: train only the first this many epochs of the schedule")
  parser.add_argument("--evals_per_epoch", type=int, default=1, help="dev evaluations per epoch")
  parser.add_argument("--max_steps", type=int, default=-1, help="> 0 stops early")
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--eval_batch_size", type=int, default=64)
  parser.add_argument("--max_length", type=int, default=128)
  parser.add_argument("--learning_rate", type=float, default=5e-5)
  parser.add_argument("--weight_decay", type=float, default=0.01)
  parser.add_argument("--warmup_ratio", type=float, default=0.1)
  parser.add_argument("--grad_clip_norm", type=float, default=1.0)
  parser.add_argument("--log_every", type=int, default=50)
  parser.add_argument("--seed", type=int, default=0)
  return parser


def main(argv=None) -> dict:
  return run(arguments().parse_args(argv))


if __name__ == "__main__":
  print(json.dumps({k: v for k, v in main().items() if k != "config"}, indent=2))
