"""Inference with an exported model: batched and jitted, for all three tasks, with confidences
and, on request, the Shapley credit each context earns in the context->text games.

  python -m shapca_jax.predict --model DIR --input examples.jsonl [--output out.jsonl] [--explain]
  python -m shapca_jax.predict --model DIR --text "..." [--context "..."] [--image photo.jpg]
      [--head 0:2 --tail 4:5]   (mre: the entity pair, end-exclusive word spans)

Input: one JSON object per line, ``{"id"?, "words" | "text", "context"?, "image"?}``, plus
``"head": [start, end], "tail": [start, end]`` for MRE. ``words`` is the pre-split sentence,
``text`` is split on white space; ``context`` is the image-derived text (``--context`` fills it
in for lines without one); ``image`` is a file name, relative to ``--image_dir`` (default: the
input file's folder). A malformed line, a missing context or a missing image (for a model
trained with images) is an error naming the line; blank lines are skipped. Examples longer than
the model's largest bucket are truncated (the context first, as in training); the words left
out are reported on stderr and as ``truncated_words``.

Output: one JSON object per input, in input order, with ``id``, ``words``, ``context`` and
``truncated_words``, plus per task:
  mner   ``tags`` (BIO, ``null`` for truncated words) and ``entities`` (``start``/``end`` word
         span, ``type``, ``text``, ``confidence``: the smallest posterior marginal
         P(tag_t = decoded tag_t | x) over the entity's words, from the BIO-constrained CRF, an
         upper bound on the probability of exactly this span and type);
  mre    ``head``, ``tail``, ``relation``, ``confidence`` (its softmax probability) and
         ``probabilities`` of every relation;
  mjere  ``entities`` and ``quintuples`` (head, tail, relation) decoded from the word-pair grid
         as in training.
Predictions are the training evaluation's own (``ShapCA.predict``).

Explanations (``--explain``): inputs are batched like evaluation batches (grouped by length bucket
in input order, ``--batch_size`` per batch, by default the training batch size k). In each batch
the contexts are the players and every text is the anchor of one game, with the training
config's utility and tau_u on the model's alignment vectors (METHOD §4, a reconstruction).
``explanation.contexts`` is the column phi[:, j] of the example's own game, ``own_context`` its
own context's credit phi[j, j] and ``own_rank`` that credit's rank (1 = largest). Values are exact
for batches of up to 16 examples, Monte Carlo (fixed seed) beyond.
"""

import argparse
import dataclasses
import functools
import json
import logging
import os
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from shapca_jax import export, shapley, wordpair
from shapca_jax.data import errors, images, labels
from shapca_jax.data.errors import DataFormatError, check_json_nesting, read_lines, where
from shapca_jax.data.labels import Span
from shapca_jax.data.pipeline import BatchPipeline
from shapca_jax.data.readers import Example

INPUT_KEYS = ("id", "words", "text", "context", "image")
PAIR_KEYS = ("head", "tail")  # mre only
MISSING_CONTEXT_MODES = ("error", "empty")
_DECIMALS = 6


@dataclasses.dataclass(frozen=True)
class Query:
  """One input: its id and the example (``source`` is ``file:line``)."""
  id: Any
  example: Example


# ----------------------------------------------------------------------------- input


def _text_field(record: dict, key: str, loc: str) -> str | None:
  value = record.get(key)
  if value is not None and not isinstance(value, str):
    raise DataFormatError(f"{loc}: {key!r} must be a string, got {type(value).__name__}")
  return value


def _words(record: dict, loc: str) -> tuple[str, ...]:
  if ("words" in record) == ("text" in record):
    raise DataFormatError(f"{loc}: expected exactly one of 'words' (a list of strings) and "
                          "'text' (a string)")
  if "text" in record:
    words = tuple((_text_field(record, "text", loc) or "").split())
  else:
    words = record["words"]
    if not isinstance(words, list) or not all(isinstance(w, str) and w.strip() for w in words):
      raise DataFormatError(f"{loc}: 'words' must be a list of non-empty strings")
    words = tuple(words)
  if not words:
    raise DataFormatError(f"{loc}: the sentence has no words")
  return words


def _span(record: dict, key: str, num_words: int, loc: str) -> Span:
  value = record.get(key)
  if not (isinstance(value, list) and len(value) == 2
          and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
          and 0 <= value[0] < value[1] <= num_words):
    raise DataFormatError(f"{loc}: {key!r} must be a word span [start, end) with 0 <= start < "
                          f"end <= {num_words}, got {value!r}")
  return Span(value[0], value[1], "")


def parse_query(record: Any, loc: str, *, task: str = "mner", default_id: Any,
                default_context: str | None = None,
                image_dir: pathlib.Path | None = None) -> Query:
  """A Query from one parsed input object; ``loc`` (``file:line``) prefixes every error."""
  if not isinstance(record, dict):
    raise DataFormatError(f"{loc}: expected a JSON object, got {type(record).__name__}")
  allowed = INPUT_KEYS + (PAIR_KEYS if task == "mre" else ())
  unknown = sorted(set(record) - set(allowed))
  if unknown:
    raise DataFormatError(f"{loc}: unknown keys {unknown} for a {task} model; expected some of "
                          f"{list(allowed)}")
  query_id = record.get("id", default_id)
  if not isinstance(query_id, (str, int)) or isinstance(query_id, bool):
    raise DataFormatError(f"{loc}: 'id' must be a string or an integer, got {query_id!r}")
  words = _words(record, loc)
  pair = {}
  if task == "mre":
    # The encoder reads a gold relation for its targets; prediction never looks at it.
    pair = dict(head=_span(record, "head", len(words), loc),
                tail=_span(record, "tail", len(words), loc), relation=labels.MNRE_RELATIONS[0])
  context = _text_field(record, "context", loc)
  image = _text_field(record, "image", loc) or ""
  image_path = str(image_dir / image) if image and image_dir is not None else image
  example = Example(image_id=pathlib.Path(image).name, words=words, source=loc,
                    context=default_context if context is None else context,
                    image_path=image_path, **pair)
  return Query(query_id, example)


def read_queries(path: str | os.PathLike, *, task: str = "mner",
                 default_context: str | None = None,
                 image_dir: str | os.PathLike | None = None) -> list[Query]:
  """The inputs of a JSONL file for a ``task`` model; ids default to the line number and must
  not repeat."""
  path = pathlib.Path(path)
  image_dir = pathlib.Path(image_dir) if image_dir is not None else path.parent
  queries, seen = [], {}
  for number, line in enumerate(read_lines(path), start=1):
    if not line.strip():
      continue
    loc = where(path, number)
    check_json_nesting(line, path, first_line=number)
    try:
      record = json.loads(line)
    except json.JSONDecodeError as err:
      raise DataFormatError(f"{loc}: not valid JSON ({err.msg} at column {err.colno})") from err
    query = parse_query(record, loc, task=task, default_id=number,
                        default_context=default_context, image_dir=image_dir)
    if query.id in seen:
      raise DataFormatError(f"{loc}: id {query.id!r} was already used on line {seen[query.id]}")
    seen[query.id] = number
    queries.append(query)
  if not queries:
    raise DataFormatError(f"{path}: no input lines")
  return queries


# ----------------------------------------------------------------------------- jitted steps


def _outputs(module, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """``ShapCA.predict`` (the evaluation's decoding), the confidences of the task and the
  alignment vectors. XLA computes the encoder once for both calls."""
  out = module.encode(batch, deterministic=True)
  result = {"prediction": module.predict(batch),
            **{k: out[k] for k in ("text_vec", "context_vec") if k in out}}
  if module.task == "mner":
    result["marginals"] = module.crf.marginals(out["emissions"], batch["num_words"])
  elif module.task == "mre":
    result["probabilities"] = jax.nn.softmax(out["logits"], axis=-1)
  return result


# The module is static (hashable, compared by its fields): equal models share compilations.
@functools.partial(jax.jit, static_argnums=0)
def forward(model, params, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """``prediction`` (see ``ShapCA.predict``), ``marginals`` [B, W, K] (mner) or
  ``probabilities`` [B, C] (mre), and the alignment vectors."""
  return model.apply({"params": params}, batch, method=_outputs)


@functools.partial(jax.jit, static_argnames=("utility", "tau", "num_permutations"))
def context_credits(context_vec: jax.Array, text_vec: jax.Array, valid: jax.Array,
                    key: jax.Array, *, utility: str, tau: float,
                    num_permutations: int) -> jax.Array:
  """phi [k, k]: context i's Shapley value in the game of text j (padding rows are null players).

  Exact for k <= ``shapley.EXACT_MAX_PLAYERS``, else Monte Carlo with antithetic permutations.
  """
  sim = shapley.cosine_similarity(context_vec, text_vec)
  common = dict(utility=utility, tau=tau, players=context_vec, player_mask=valid)
  if sim.shape[0] <= shapley.EXACT_MAX_PLAYERS:
    return shapley.exact_shapley(sim, **common)
  return shapley.mc_shapley(sim, key, num_permutations=num_permutations, antithetic=True,
                            **common)


# ----------------------------------------------------------------------------- predictor


def _round(x: Any) -> float:
  return round(float(x), _DECIMALS)


def _words_at(words: Sequence[str], start: int, end: int, **extra: Any) -> dict[str, Any]:
  return {"start": start, "end": end, **extra, "text": " ".join(words[start:end])}


def mner_record(words: Sequence[str], names: Sequence[str], tag_ids: np.ndarray,
                marginals: np.ndarray) -> dict[str, Any]:
  """Tags and entities of the first ``len(tag_ids)`` words; ``marginals`` [n, K]."""
  n = len(tag_ids)
  tags = [names[t] for t in tag_ids]
  confidence = marginals[np.arange(n), tag_ids]
  return {"tags": tags + [None] * (len(words) - n),
          "entities": [_words_at(words, s.start, s.end, type=s.label,
                                 confidence=_round(np.min(confidence[s.start:s.end])))
                       for s in labels.bio_spans(tags)]}


def mre_record(example: Example, names: Sequence[str], probabilities: np.ndarray) -> dict:
  """The pair, the most probable relation and every relation's probability."""
  best = int(np.argmax(probabilities))
  return {"head": _words_at(example.words, example.head.start, example.head.end),
          "tail": _words_at(example.words, example.tail.start, example.tail.end),
          "relation": names[best], "confidence": _round(probabilities[best]),
          "probabilities": {name: _round(p) for name, p in zip(names, probabilities)}}


def mjere_record(words: Sequence[str], grid: np.ndarray, vocab: wordpair.GridVocab) -> dict:
  """Entities and quintuples decoded from the predicted grid of the kept words."""
  decoded = wordpair.decode_grid(grid, vocab)
  return {"entities": [_words_at(words, *span, type=kind) for span, kind in decoded.entities],
          "quintuples": [{"head": _words_at(words, *head, type=head_type),
                          "tail": _words_at(words, *tail, type=tail_type), "relation": relation}
                         for head, head_type, tail, tail_type, relation in decoded.quintuples]}


class Predictor:
  """Batched, jitted inference with an exported model (one compilation per length bucket).

  Args:
    exported: a loaded model folder (``export.load_model``).
    batch_size: rows per batch; default the training batch size (the k of the Shapley games).
    missing_context: "error" (an input without context, for a model trained with contexts, is
      an error naming its line) or "empty" (it gets an empty context; counted and reported).
    missing_image: "error" or "blank" (an all-zero image; counted), for models with images.
    explain_permutations: Monte Carlo permutations (plus reverses) for batches over 16 examples.
    seed: the PRNG seed of those permutations.
  """

  def __init__(self, exported: export.ExportedModel, *, batch_size: int | None = None,
               missing_context: str = "error", missing_image: str = "error",
               explain_permutations: int = 256, seed: int = 0):
    if missing_context not in MISSING_CONTEXT_MODES:
      raise ValueError(f"missing_context={missing_context!r}; expected {MISSING_CONTEXT_MODES}")
    if missing_image not in images.MISSING_IMAGE_MODES:
      raise ValueError(f"missing_image={missing_image!r}; expected {images.MISSING_IMAGE_MODES}")
    self.exported = exported
    self.config = exported.config
    self.batch_size = batch_size or self.config.batch_size
    self.missing_context = missing_context
    self.missing_image = missing_image
    self.explain_permutations = explain_permutations
    self.seed = seed
    self.encoder = exported.encoder()
    self.image_processor = exported.image_processor()
    self.grid_vocab = exported.grid_vocab() if exported.task == "mjere" else None

  # -- input checks that depend on the model

  def _check(self, queries: Sequence[Query]) -> dict[str, int]:
    counts = {"missing_context": 0, "contexts_ignored": 0, "images_ignored": 0}
    for q in queries:
      e = q.example
      if self.exported.task == "mre" and e.head is None:
        raise DataFormatError(f"{e.source}: an mre model needs the entity pair ('head', 'tail')")
      if not self.encoder.uses_context:
        counts["contexts_ignored"] += e.context is not None
      elif e.context is None:
        if self.missing_context == "error":
          raise DataFormatError(f"{e.source}: no context, and the model was trained with "
                                "contexts; give one ('context' or --context) or pass "
                                "--missing_context empty")
        counts["missing_context"] += 1
      if self.image_processor is None:
        counts["images_ignored"] += bool(e.image_path)
      elif self.missing_image == "error" and not pathlib.Path(e.image_path).is_file():
        what = f"image file {e.image_path} not found" if e.image_path else "no 'image'"
        raise DataFormatError(f"{e.source}: {what}, and the model was trained with images; "
                              "pass --missing_image blank to use a blank image")
    return counts

  def _pixels(self, batch: dict[str, np.ndarray], queries: Sequence[Query]) -> tuple[np.ndarray,
                                                                                    int]:
    rows = batch["example_index"]
    paths = [queries[i].example.image_path for i in rows if i >= 0]
    loaded, blank = images.load_images(paths, self.image_processor, self.missing_image)
    pixels = np.zeros((len(rows), *loaded.shape[1:]), np.float32)
    pixels[rows >= 0] = loaded
    return pixels, blank

  # -- prediction

  def predict(self, queries: Sequence[Query], *,
              explain: bool = False) -> tuple[list[dict], dict[str, Any]]:
    """Records in input order (see the module docstring) and a report of what was done."""
    if explain:
      self._check_explainable()
    start = time.perf_counter()
    counts = self._check(queries)
    examples = [q.example for q in queries]
    pipeline = BatchPipeline(examples, self.encoder, batch_size=self.batch_size,
                             buckets=self.exported.buckets, num_threads=1, prefetch=1)
    records: list[dict | None] = [None] * len(queries)
    blank_images = 0
    key = jax.random.key(self.seed)
    for b in range(pipeline.report.batches_per_epoch):
      batch = pipeline.batch(b)
      if self.image_processor is not None:
        batch["pixel_values"], blank = self._pixels(batch, queries)
        blank_images += blank
      out = jax.device_get(forward(self.exported.model, self.exported.params, batch))
      phi = None
      if explain:
        phi = np.asarray(context_credits(
            out["context_vec"], out["text_vec"], batch["valid"], jax.random.fold_in(key, b),
            utility=self.config.align.utility, tau=self.config.align.tau_u,
            num_permutations=self.explain_permutations))
      for row in np.flatnonzero(batch["valid"]):
        index = int(batch["example_index"][row])
        records[index] = self._record(queries[index], out, batch, row)
        if phi is not None:
          records[index]["explanation"] = _explanation(phi, batch, row, queries, b)
    truncated = [(q, r) for q, r in zip(queries, records) if r["truncated_words"]]
    for q, r in truncated:
      logging.warning("%s: %d of %d words were cut off to fit %d tokens; nothing is predicted "
                      "for them",
                      q.example.source, r["truncated_words"], len(r["words"]),
                      self.exported.buckets[-1].tokens)
    seconds = time.perf_counter() - start
    report = {"examples": len(queries), "batches": pipeline.report.batches_per_epoch,
              "text_truncated": len(truncated),
              "context_truncated": pipeline.report.context_truncated,
              **counts, "blank_images": blank_images, "seconds": round(seconds, 3),
              "examples_per_second": round(len(queries) / seconds, 2)}
    return records, report

  def _check_explainable(self) -> None:
    config = self.config
    if not config.use_context:
      raise ValueError(f"{self.exported.directory}: the model was trained without contexts "
                       "(use_context=False); there is no context->text game to explain")
    if config.align.kind == "none":
      raise ValueError(f"{self.exported.directory}: the model was trained without alignment "
                       "(align.kind='none'), so its alignment vectors were never trained and "
                       "their Shapley credits mean nothing")

  def _record(self, query: Query, out: dict[str, np.ndarray], batch: dict[str, np.ndarray],
              row: int) -> dict[str, Any]:
    example = query.example
    n = int(batch["num_words"][row])
    prediction = out["prediction"][row]
    record = {"id": query.id, "words": list(example.words), "context": example.context,
              "truncated_words": len(example.words) - n}
    if self.exported.task == "mner":
      record |= mner_record(example.words, self.exported.labels, prediction[:n],
                            out["marginals"][row])
    elif self.exported.task == "mre":
      record |= mre_record(example, self.exported.labels, out["probabilities"][row])
    else:
      record |= mjere_record(example.words, prediction[:n, :n], self.grid_vocab)
    return record


def _explanation(phi: np.ndarray, batch: dict[str, np.ndarray], row: int,
                 queries: Sequence[Query], batch_number: int) -> dict[str, Any]:
  players = np.flatnonzero(batch["valid"])
  ids = [queries[int(batch["example_index"][i])].id for i in players]
  own = phi[row, row]
  return {"batch": batch_number, "own_context": _round(own),
          "own_rank": int(1 + np.sum(phi[players, row] > own)),
          "contexts": [{"id": i, "phi": _round(phi[p, row])} for i, p in zip(ids, players)]}


# ----------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m shapca_jax.predict",
      description="Predict with an exported Shap-CA model; JSON lines out.")
  parser.add_argument("--model", required=True, help="a folder written by shapca_jax.export")
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--input", help="JSONL file: {\"id\"?, \"words\"|\"text\", \"context\"?, "
                                      "\"image\"?} per line")
  source.add_argument("--text", help="one text, split on white space")
  parser.add_argument("--context", help="context of --text, or of input lines without one")
  parser.add_argument("--image", help="image file of --text")
  parser.add_argument("--head", help="mre, with --text: the head entity's words START:END")
  parser.add_argument("--tail", help="mre, with --text: the tail entity's words START:END")
  parser.add_argument("--image_dir", help="folder of the input lines' images (default: the "
                                          "input file's folder)")
  parser.add_argument("--output", default="-", help="JSONL output file (default: stdout)")
  parser.add_argument("--batch_size", type=int, help="default: the training batch size")
  parser.add_argument("--explain", action="store_true",
                      help="add each example's Shapley credits of the contexts in its batch")
  parser.add_argument("--explain_permutations", type=int, default=256,
                      help="Monte Carlo permutations for batches of more than 16 examples")
  parser.add_argument("--seed", type=int, default=0, help="seed of those permutations")
  parser.add_argument("--missing_context", choices=MISSING_CONTEXT_MODES, default="error")
  parser.add_argument("--missing_image", choices=images.MISSING_IMAGE_MODES, default="error")
  return parser


def _word_span(value: str | None, flag: str) -> list[int] | None:
  if value is None:
    return None
  try:
    start, end = (int(v) for v in value.split(":"))
  except ValueError:
    raise DataFormatError(f"{flag} {value!r}: expected START:END word indices") from None
  return [start, end]


def _queries(args: argparse.Namespace, task: str) -> list[Query]:
  if args.input is not None:
    if args.image or args.head or args.tail:
      raise DataFormatError("--image, --head and --tail go with --text; input lines carry "
                            "their own 'image', 'head' and 'tail'")
    return read_queries(args.input, task=task, default_context=args.context,
                        image_dir=args.image_dir)
  record = {"text": args.text, "context": args.context, "image": args.image,
            "head": _word_span(args.head, "--head"), "tail": _word_span(args.tail, "--tail")}
  return [parse_query({k: v for k, v in record.items() if v is not None}, "--text", task=task,
                      default_id=1)]


def _write(records: list[dict], output: str) -> None:
  lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
  if output == "-":
    sys.stdout.write(lines)
  else:
    pathlib.Path(output).write_text(lines, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  logging.basicConfig(format="%(levelname)s: %(message)s", level=logging.WARNING)
  try:
    exported = export.load_model(args.model)
    queries = _queries(args, exported.task)
    predictor = Predictor(exported, batch_size=args.batch_size,
                          missing_context=args.missing_context, missing_image=args.missing_image,
                          explain_permutations=args.explain_permutations, seed=args.seed)
    records, report = predictor.predict(queries, explain=args.explain)
  except (DataFormatError, export.ExportError, FileNotFoundError, ValueError) as err:
    print(f"error: {err}", file=sys.stderr)
    return errors.USAGE_EXIT_CODE
  _write(records, args.output)
  print(json.dumps(report), file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
