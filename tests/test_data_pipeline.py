"""The grain pipeline: batches decode back to the raw files; order, resume, shards, padding."""

import ast
import json

import numpy as np
import pytest
from PIL import Image

from shapca_jax.data import contexts, labels, readers
from shapca_jax.data.pipeline import BatchPipeline
from shapca_jax.data.tokenization import DEFAULT_BUCKETS, Bucket, Encoder


@pytest.fixture(scope="module")
def mner_encoder(minilm_dir):
  return Encoder(minilm_dir, "mner")


def _rows(pipeline):
  """Every valid row of every batch as (example index, batch, row)."""
  for batch in pipeline:
    for r in np.flatnonzero(batch["valid"]):
      yield int(batch["example_index"][r]), batch, r


def _word_pieces(batch, r, id_to_token):
  """The pieces of each word of row r: from its first piece to the next word's (or text end)."""
  starts = list(batch["word_starts"][r][:batch["num_words"][r]])
  text_end = 1 + int(batch["text_mask"][r].sum())
  ids = batch["input_ids"][r]
  return [[id_to_token(i) for i in ids[s:e]] for s, e in zip(starts, starts[1:] + [text_end])]


def test_mner_batches_decode_to_the_raw_file(embedded_data_dir, mner_encoder, hf_tokenizer,
                                             twitter_valid):
  path = embedded_data_dir / "twitter2017" / "valid.txt"
  raw = [[line.split("\t") for line in block.split("\n")[1:]]
         for block in path.read_text(encoding="utf-8").strip().split("\n\n")]
  captions = dict(line.split(" :", 1) for line in
                  (embedded_data_dir / "twitter2017/contexts/blip2.txt").read_text().splitlines())
  pipeline = BatchPipeline(twitter_valid, mner_encoder, batch_size=32)
  seen = []
  vocab = mner_encoder.tokenizer.tokenizer
  for index, batch, r in _rows(pipeline):
    seen.append(index)
    words, tags = zip(*raw[index])
    expected = [hf_tokenizer.tokenize(w) or ["[UNK]"] for w in words]
    assert _word_pieces(batch, r, vocab.id_to_token) == expected
    assert [labels.MNER_LABELS[t] for t in batch["tags"][r][:len(words)]] == list(tags)
    context = batch["input_ids"][r][batch["context_mask"][r]]
    image_id = twitter_valid[index].image_id
    assert [vocab.id_to_token(i) for i in context] == hf_tokenizer.tokenize(captions[image_id])
  assert sorted(seen) == list(range(len(raw)))


def test_mre_batches_decode_to_the_raw_lines(minilm_dir, shared_data_dir):
  path = shared_data_dir / "mnre" / "ours_val.txt"
  raw = [ast.literal_eval(line) for line in path.read_text(encoding="utf-8").splitlines()[:60]]
  examples = readers.read_split("mnre", "valid", shared_data_dir)[:60]
  examples, _ = contexts.attach_contexts(examples, "mnre", "valid", shared_data_dir, "BLIP",
                                         missing_context="empty")
  encoder = Encoder(minilm_dir, "mre")
  vocab = encoder.tokenizer.tokenizer
  seen = 0
  for index, batch, r in _rows(BatchPipeline(examples, encoder, batch_size=16)):
    line = raw[index]
    ids = list(batch["input_ids"][r])
    for marker, key, close in (("head_pos", "h", "</s>"), ("tail_pos", "t", "</o>")):
      start = int(batch[marker][r])
      end = ids.index(vocab.token_to_id(close), start)
      inner = [vocab.id_to_token(i) for i in ids[start + 1:end]
               if vocab.id_to_token(i) not in ("<s>", "</s>", "<o>", "</o>")]
      assert "".join(inner).replace("##", "") == line[key]["name"].lower().replace(" ", "")
    assert labels.MNRE_RELATIONS[batch["relation"][r]] == line["relation"]
    seen += 1
  assert seen == 60


def _naive_grid(sample, width):
  grid = -np.ones((width, width), int)
  n = len(sample["token"])
  for i in range(n):
    for j in range(i, n):
      grid[i, j] = 0
  writes = []
  relations = [r for group in sample["label_list"] for r in group]
  for r in relations:
    for ent in (r["beg_ent"], r["sec_ent"]):
      writes += [(i, j, ent["tags"]) for i in range(*ent["pos"]) for j in range(i, ent["pos"][1])]
  for r in relations:
    writes += [(min(a, p), max(a, p), r["relation"]) for a in range(*r["beg_ent"]["pos"])
               for p in range(*r["sec_ent"]["pos"])]
  for i, j, name in writes:
    if grid[i, j] == 0:
      grid[i, j] = labels.GRID_LABELS.index(name)
  return grid


def test_jmere_batches_carry_the_raw_grid(minilm_dir, shared_data_dir):
  raw = json.loads((shared_data_dir / "jmere" / "val.json").read_text())[:40]
  examples = readers.read_split("jmere", "valid", shared_data_dir)[:40]
  encoder = Encoder(minilm_dir, "jmere", layout="none")
  pipeline = BatchPipeline(examples, encoder, batch_size=8)
  assert pipeline.report.grid_conflicts == 5  # val item 21 has nested spans
  seen = 0
  for index, batch, r in _rows(pipeline):
    np.testing.assert_array_equal(batch["grid"][r], _naive_grid(raw[index], batch["grid"].shape[1]))
    assert batch["num_words"][r] == len(raw[index]["token"])
    seen += 1
  assert seen == 40


def test_shapes_and_dtypes_come_from_a_few_buckets(mner_encoder, twitter_valid):
  buckets = (Bucket(32, 16), Bucket(48, 32), Bucket(96, 64))
  pipeline = BatchPipeline(twitter_valid, mner_encoder, batch_size=16, buckets=buckets)
  counts = pipeline.report.examples_per_bucket
  assert sum(counts.values()) == len(twitter_valid) and min(counts.values()) > 0
  shapes = set()
  for batch in pipeline:
    b, length = batch["input_ids"].shape
    words = batch["word_starts"].shape[1]
    shapes.add((length, words))
    expected = {"input_ids": (np.int32, (b, length)), "token_type_ids": (np.int32, (b, length)),
                "attention_mask": (np.int32, (b, length)), "text_mask": (np.bool_, (b, length)),
                "context_mask": (np.bool_, (b, length)), "word_starts": (np.int32, (b, words)),
                "num_words": (np.int32, (b,)), "image_group": (np.int32, (b,)),
                "example_index": (np.int32, (b,)), "valid": (np.bool_, (b,)),
                "tags": (np.int32, (b, words))}
    assert {k: (v.dtype.type, v.shape) for k, v in batch.items()} == expected
    assert b == 16
  assert shapes == {(b.tokens, b.words) for b in buckets}


def test_padding_batches_have_the_shapes_of_their_buckets_batches(mner_encoder, twitter_valid):
  buckets = (Bucket(32, 16), Bucket(48, 32), Bucket(96, 64))
  pipeline = BatchPipeline(twitter_valid, mner_encoder, batch_size=16, buckets=buckets,
                           shuffle=True, num_epochs=2)
  layout = lambda batch: {k: (v.dtype, v.shape) for k, v in batch.items()}
  for index, batch in enumerate(pipeline):
    b = pipeline.bucket_index(index)
    assert batch["input_ids"].shape[1] == buckets[b].tokens
    assert layout(pipeline.padding_batch(b)) == layout(batch)
  assert index + 1 == 2 * pipeline.report.batches_per_epoch
  padding = pipeline.padding_batch(2)
  assert not padding["valid"].any() and (padding["example_index"] == -1).all()
  assert not padding["attention_mask"].any()


def test_padding_rows_are_marked_and_empty(mner_encoder, twitter_valid):
  examples = twitter_valid[:21]
  batches = list(BatchPipeline(examples, mner_encoder, batch_size=8))
  valid = np.concatenate([b["valid"] for b in batches])
  index = np.concatenate([b["example_index"] for b in batches])
  assert valid.sum() == 21 and len(valid) == 24
  assert (index[~valid] == -1).all() and sorted(index[valid]) == list(range(21))
  last = batches[-1]
  pad = ~last["valid"]
  assert not last["attention_mask"][pad].any() and not last["text_mask"][pad].any()
  assert (last["input_ids"][pad] == mner_encoder.tokenizer.pad_id).all()


def _order(pipeline, limit=None):
  order = []
  for i, batch in enumerate(pipeline):
    if limit is not None and i == limit:
      break
    order.append(tuple(batch["example_index"]))
  return order


def test_seed_fixes_the_order_and_epochs_reshuffle(mner_encoder, twitter_valid):
  make = lambda seed: BatchPipeline(twitter_valid, mner_encoder, batch_size=16, shuffle=True,
                                    seed=seed, num_epochs=2, drop_remainder=True)
  first, again, other = _order(make(0)), _order(make(0)), _order(make(1))
  assert first == again and first != other
  per_epoch = make(0).report.batches_per_epoch
  epochs = [first[:per_epoch], first[per_epoch:]]
  assert len(first) == 2 * per_epoch and epochs[0] != epochs[1]
  for epoch in epochs:
    seen = [i for batch in epoch for i in batch]
    assert len(seen) == len(set(seen)) and min(seen) >= 0  # no repeats, no padding when training


def test_a_resumed_iterator_continues_the_same_order(mner_encoder, twitter_valid):
  make = lambda: BatchPipeline(twitter_valid, mner_encoder, batch_size=16, shuffle=True, seed=3,
                               num_epochs=2, drop_remainder=True)
  iterator = iter(make())
  for _ in range(50):  # into the second epoch
    next(iterator)
  state = iterator.get_state()
  rest = [tuple(b["example_index"]) for b in iterator]
  resumed = iter(make())
  resumed.set_state(state)
  assert [tuple(b["example_index"]) for b in resumed] == rest and rest
  assert _order(make())[50:] == rest


def test_shards_split_every_global_batch_and_agree_on_its_shape(mner_encoder, twitter_valid):
  buckets = (Bucket(40, 32), Bucket(96, 64))
  make = lambda shard, count: BatchPipeline(
      twitter_valid, mner_encoder, batch_size=8 * 2 // count, buckets=buckets, shuffle=True,
      seed=5, shard_index=shard, shard_count=count)
  whole = list(make(0, 1))
  halves = list(zip(make(0, 2), make(1, 2)))
  assert len(whole) == len(halves)
  for batch, (a, b) in zip(whole, halves):
    assert a["input_ids"].shape == b["input_ids"].shape == (8, batch["input_ids"].shape[1])
    joined = np.concatenate([a["example_index"], b["example_index"]])
    np.testing.assert_array_equal(joined, batch["example_index"])
    np.testing.assert_array_equal(np.concatenate([a["image_group"], b["image_group"]]),
                                  batch["image_group"])


@pytest.mark.parametrize("training", [False, True])
def test_two_processes_read_every_example_once_per_epoch(mner_encoder, twitter_valid, training):
  # Each process reads its half of every global batch of 2 x 4 rows; together, per epoch,
  # evaluation covers every example once and training every example once except each
  # bucket's dropped remainder (fewer than 8 rows).
  examples = twitter_valid[:101]
  buckets = (Bucket(40, 32), Bucket(96, 64))
  make = lambda shard: BatchPipeline(
      examples, mner_encoder, batch_size=4, buckets=buckets, shuffle=training, seed=1,
      num_epochs=2, drop_remainder=training, shard_index=shard, shard_count=2)
  processes = [make(0), make(1)]
  per_epoch = processes[0].report.batches_per_epoch
  batches = [list(p) for p in processes]
  assert len(batches[0]) == len(batches[1]) == 2 * per_epoch
  sizes = processes[0].report.examples_per_bucket.values()
  for epoch in range(2):
    seen = [int(i) for shard in batches for batch in shard[epoch * per_epoch:][:per_epoch]
            for i in batch["example_index"][batch["valid"]]]
    assert len(seen) == len(set(seen))
    if training:
      assert len(examples) - len(seen) == sum(n % 8 for n in sizes)
    else:
      assert sorted(seen) == list(range(len(examples)))


def test_a_shard_of_only_padding_rows_still_gets_a_batch(mner_encoder, twitter_valid):
  (batch,) = list(BatchPipeline(twitter_valid[:1], mner_encoder, batch_size=2, shard_index=1,
                                shard_count=2))
  assert not batch["valid"].any() and (batch["example_index"] == -1).all()
  assert batch["input_ids"].shape == (2, 64) and len(set(batch["image_group"])) == 2


def test_image_groups_follow_image_ids(minilm_dir, shared_data_dir):
  examples = readers.read_split("mnre", "test", shared_data_dir)[:64]
  encoder = Encoder(minilm_dir, "mre", layout="none")
  for batch in BatchPipeline(examples, encoder, batch_size=16, shuffle=True, seed=0):
    ids = [examples[i].image_id if i >= 0 else f"pad{k}"
           for k, i in enumerate(batch["example_index"])]
    groups = batch["image_group"]
    same_id = np.equal.outer(np.array(ids, object), np.array(ids, object))
    np.testing.assert_array_equal(np.equal.outer(groups, groups), same_id)


def test_pixel_values_from_an_image_loader(minilm_dir, shared_data_dir):
  image_dir = shared_data_dir / "mnre" / "images" / "val"
  present = {p.name for p in image_dir.glob("*.jpg")}
  examples = [e for e in readers.read_split("mnre", "valid", shared_data_dir)
              if e.image_id in present]
  assert len(examples) >= 2
  load = lambda path: np.asarray(Image.open(path).convert("RGB").resize((8, 6)), np.float32) / 255
  encoder = Encoder(minilm_dir, "mre", layout="none")
  pipeline = BatchPipeline(examples, encoder, batch_size=4, image_loader=load, image_dir=image_dir)
  for index, batch, r in _rows(pipeline):
    np.testing.assert_array_equal(batch["pixel_values"][r],
                                  load(image_dir / examples[index].image_id))
    assert batch["pixel_values"].shape[1:] == (6, 8, 3)
  assert not batch["pixel_values"][~batch["valid"]].any()
  assert pipeline.padding_batch(0)["pixel_values"].shape == (4, 6, 8, 3)
  with pytest.raises(ValueError, match="no image path for image"):
    BatchPipeline(examples, encoder, batch_size=4, image_loader=load)


def test_report_counts_what_the_layout_does(mner_encoder, twitter_valid):
  examples = list(twitter_valid[:40])
  examples[0] = type(examples[0])(**{**examples[0].__dict__, "context": None})
  pipeline = BatchPipeline(examples, mner_encoder, batch_size=8, buckets=(Bucket(24, 16),))
  report = pipeline.report.as_dict()
  assert report["missing_context"] == 1 and report["examples"] == 40
  assert report["context_truncated"] > 0 and report["text_truncated"] > 0
  assert report["batches_per_epoch"] == 5 and report["examples_per_bucket"] == {"24x16": 40}


def test_bad_arguments_are_named(mner_encoder, twitter_valid):
  with pytest.raises(ValueError, match="expected buckets sorted"):
    BatchPipeline(twitter_valid, mner_encoder, batch_size=8, buckets=DEFAULT_BUCKETS[::-1])
  with pytest.raises(ValueError, match="0 <= shard_index < shard_count"):
    BatchPipeline(twitter_valid, mner_encoder, batch_size=8, shard_index=2, shard_count=2)
  with pytest.raises(ValueError, match="make no batch of 64 rows"):
    BatchPipeline(twitter_valid[:10], mner_encoder, batch_size=64, drop_remainder=True)


@pytest.mark.parametrize("training", [False, True])
def test_padded_token_fraction_counts_the_padding_of_the_batches(mner_encoder, twitter_valid,
                                                                  training):
  pipeline = BatchPipeline(twitter_valid, mner_encoder, batch_size=16, shuffle=training,
                           drop_remainder=training, buckets=(Bucket(32, 24), Bucket(48, 40),
                                                             Bucket(128, 64)))
  batches = [pipeline.batch(i) for i in range(pipeline.report.batches_per_epoch)]
  real = sum(int(b["attention_mask"].sum()) for b in batches)
  positions = sum(b["attention_mask"].size for b in batches)
  assert pipeline.report.padded_token_fraction == pytest.approx(1 - real / positions, abs=1e-4)
