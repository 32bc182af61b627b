"""Word pieces, the joint input and MRE markers against the transformers tokenizer; the JMERE
grid against hand-written grids."""

import shutil

import numpy as np
import pytest

from shapca_jax.data import labels, readers, tokenization
from shapca_jax.data.labels import Quintuple, Span
from shapca_jax.data.readers import Example
from shapca_jax.data.tokenization import Bucket, Encoder

I = labels.GRID_IGNORE
PER, ORG, LOC = (labels.GRID_LABEL_IDS[t] for t in ("per", "org", "loc"))
MEMBER, CONTAIN = labels.GRID_LABEL_IDS["member_of"], labels.GRID_LABEL_IDS["contain"]


def test_grid_of_two_entities_and_a_relation():
  # "Ann Lee joined Acme": Ann Lee (per) member_of Acme (org).
  grid = tokenization.encode_grid(
      4, [Span(0, 2, "per"), Span(3, 4, "org")],
      [Quintuple(Span(0, 2, "per"), Span(3, 4, "org"), "member_of")])
  expected = np.array([
      [PER, PER, 0, MEMBER],
      [I, PER, 0, MEMBER],
      [I, I, 0, 0],
      [I, I, I, ORG],
  ])
  np.testing.assert_array_equal(grid, expected)
  assert grid.dtype == np.int32


def test_grid_relation_from_a_later_head_goes_to_the_upper_triangle_and_padding_is_ignored():
  # "Paris in France": France (head, index 2) contains Paris (tail, index 0); width 4 pads.
  grid = tokenization.encode_grid(
      3, [Span(0, 1, "loc"), Span(2, 3, "loc")],
      [Quintuple(Span(2, 3, "loc"), Span(0, 1, "loc"), "contain")], width=4)
  expected = np.array([
      [LOC, 0, CONTAIN, I],
      [I, 0, 0, I],
      [I, I, LOC, I],
      [I, I, I, I],
  ])
  np.testing.assert_array_equal(grid, expected)


def test_grid_without_entities_is_zero_on_the_upper_triangle():
  np.testing.assert_array_equal(tokenization.encode_grid(2, [], []), [[0, 0], [I, 0]])


def test_grid_conflicts_are_counted_and_the_first_write_kept():
  # A loc span nested in an org span: the cells they share were written org first.
  result = tokenization.build_grid(3, [Span(0, 3, "org"), Span(1, 2, "loc")], [])
  assert result.conflicts == 1
  np.testing.assert_array_equal(result.grid, [[ORG, ORG, ORG], [I, ORG, ORG], [I, I, ORG]])
  # The same entity twice, or a relation repeated, is no conflict.
  same = tokenization.build_grid(2, [Span(0, 1, "per")] * 2,
                                 [Quintuple(Span(0, 1, "per"), Span(1, 2, "org"), "member_of")] * 2)
  assert same.conflicts == 0


def test_grid_conflicts_on_the_real_jmere_files(shared_data_dir):
  # Nested and overlapping spans exist in the real files; every one is counted.
  conflicts = [tokenization.example_grid(e).conflicts
               for e in readers.read_split("jmere", "valid", shared_data_dir)]
  assert sum(1 for c in conflicts if c) == 1 and conflicts[21] == 5


@pytest.mark.parametrize("entities,quintuples,message", [
    ([Span(2, 4, "per")], [], r"span \(2, 4, 'per'\) is outside the sentence of 3 words"),
    ([Span(0, 1, "person")], [], "unknown grid label 'person'"),
    ([], [Quintuple(Span(0, 1, "per"), Span(1, 2, "per"), "friend")], "unknown grid label"),
])
def test_grid_rejects_bad_spans_and_labels(entities, quintuples, message):
  with pytest.raises(ValueError, match=message):
    tokenization.encode_grid(3, entities, quintuples)


def test_marked_words_handles_nested_spans():
  marked = tokenization.marked_words(["a", "b", "c"], Span(0, 2, ""), Span(1, 2, ""))
  assert marked.words == ["<s>", "a", "<o>", "b", "</o>", "</s>", "c"]
  assert marked.index == [1, 3, 6] and (marked.head, marked.tail) == (0, 2)
  same = tokenization.marked_words(["a"], Span(0, 1, ""), Span(0, 1, ""))
  assert same.words == ["<s>", "<o>", "a", "</o>", "</s>"]


def _every_word_has_a_piece(hf_tokenizer, example):
  return all(hf_tokenizer.tokenize(w) for w in example.words)


@pytest.mark.parametrize("tokens", [128, 24])  # 24 truncates most contexts, never a text here
def test_joint_input_matches_transformers_pair_encoding(minilm_dir, hf_tokenizer, twitter_valid,
                                                        tokens):
  encoder = Encoder(minilm_dir, "mner")
  examples = [e for e in twitter_valid if _every_word_has_a_piece(hf_tokenizer, e)][:300]
  # Leave the context at least one position: transformers refuses to truncate it to nothing.
  text_length = lambda e: len(hf_tokenizer(list(e.words), is_split_into_words=True)["input_ids"])
  examples = [e for e in examples if text_length(e) < tokens - 1]
  assert len(examples) > 100
  bucket = Bucket(tokens, 64)
  truncated = 0
  for example, pieces in zip(examples, encoder.pieces(examples)):
    row = encoder.row(example, pieces, bucket)
    hf = hf_tokenizer(list(example.words), example.context.split(), is_split_into_words=True,
                      truncation="only_second", max_length=tokens, padding="max_length")
    np.testing.assert_array_equal(row["input_ids"], hf["input_ids"])
    np.testing.assert_array_equal(row["token_type_ids"], hf["token_type_ids"])
    np.testing.assert_array_equal(row["attention_mask"], hf["attention_mask"])
    sequence_ids = np.array([-1 if s is None else s for s in hf.sequence_ids()])
    np.testing.assert_array_equal(row["text_mask"], sequence_ids == 0)
    np.testing.assert_array_equal(row["context_mask"], sequence_ids == 1)
    word_ids = hf.word_ids()
    first = [word_ids.index(w) for w in range(len(example.words))]
    assert row["num_words"] == len(example.words)
    np.testing.assert_array_equal(row["word_starts"][:len(first)], first)
    tags = [labels.MNER_LABEL_IDS[t] for t in example.tags]
    np.testing.assert_array_equal(row["tags"][:len(tags)], tags)
    truncated += int(row["context_mask"].sum() < len(hf_tokenizer.tokenize(example.context)))
  assert (truncated > 0) == (tokens == 24)


def test_words_without_pieces_become_unk(minilm_dir):
  encoder = Encoder(minilm_dir, "mner", layout="none")
  example = Example("x.jpg", ("Hi", "\ufe0f", "there"), "mem:1", tags=("O", "B-PER", "O"))
  row = encoder.row(example, encoder.pieces([example])[0], Bucket(8, 4))
  unk, cls, sep = (encoder.tokenizer.tokenizer.token_to_id(t) for t in ("[UNK]", "[CLS]", "[SEP]"))
  assert row["input_ids"][row["word_starts"][1]] == unk
  assert list(row["input_ids"][:5]) == [cls, row["input_ids"][1], unk, row["input_ids"][3], sep]
  assert list(row["tags"][:3]) == [0, labels.MNER_LABEL_IDS["B-PER"], 0]


def test_text_too_long_is_cut_at_a_word_and_the_context_dropped_first(minilm_dir):
  encoder = Encoder(minilm_dir, "mner")
  example = Example("x.jpg", ("one", "two", "three", "four"), "mem:1", tags=("O",) * 4,
                    context="a long caption here")
  pieces = encoder.pieces([example])[0]
  assert encoder.fit(pieces, Bucket(12, 8)) == (4, 5, 4)  # all fits ("caption" is 2 pieces)
  assert encoder.fit(pieces, Bucket(9, 8)) == (4, 2, 4)  # context cut, text whole
  assert encoder.fit(pieces, Bucket(6, 8)) == (3, 0, 3)  # text cut after word 3, no context
  assert encoder.fit(pieces, Bucket(10, 2)) == (2, 5, 2)  # word slots cut the text too
  row = encoder.row(example, pieces, Bucket(6, 8))
  assert row["num_words"] == 3 and row["text_mask"].sum() == 3 and row["context_mask"].sum() == 0
  views = Encoder(minilm_dir, "mner", layout="views")
  for bucket in (Bucket(9, 8), Bucket(6, 8)):  # the views hold what the joint row kept
    row = views.row(example, pieces, bucket)
    for view, mask in enumerate(("text_mask", "context_mask")):
      np.testing.assert_array_equal(row["views_input_ids"][view][row["views_mask"][view]],
                                    row["input_ids"][row[mask]])


def test_views_and_none_layouts(minilm_dir, hf_tokenizer):
  example = Example("x.jpg", ("Ann", "sings"), "mem:1", tags=("B-PER", "O"), context="a singer")
  views = Encoder(minilm_dir, "mner", layout="views")
  row = views.row(example, views.pieces([example])[0], Bucket(16, 4))
  for view, text in enumerate((["Ann", "sings"], ["a", "singer"])):
    expected = hf_tokenizer(text, is_split_into_words=True, padding="max_length", max_length=16)
    np.testing.assert_array_equal(row["views_input_ids"][view], expected["input_ids"])
    np.testing.assert_array_equal(row["views_attention_mask"][view], expected["attention_mask"])
    pieces = sum(expected["attention_mask"]) - 2
    assert row["views_mask"][view].tolist() == [0] + [1] * pieces + [0] * (15 - pieces)
  joint = Encoder(minilm_dir, "mner").row(example, views.pieces([example])[0], Bucket(16, 4))
  assert set(row) - set(joint) == {"views_input_ids", "views_attention_mask", "views_mask"}
  for name, value in joint.items():  # the joint input is the same in both layouts
    np.testing.assert_array_equal(row[name], value)
  assert row["context_mask"].sum() == 2
  assert {k: v[0] for k, v in views.fields(Bucket(16, 4)).items() if k in row} == {
      k: np.shape(v) for k, v in row.items()}
  alone = Encoder(minilm_dir, "mner", layout="none")
  row = alone.row(example, alone.pieces([example])[0], Bucket(16, 4))
  expected = hf_tokenizer(["Ann", "sings"], is_split_into_words=True, padding="max_length",
                          max_length=16)
  np.testing.assert_array_equal(row["input_ids"], expected["input_ids"])
  assert not row["context_mask"].any() and not row["token_type_ids"].any()


def test_mre_markers_match_transformers_with_added_tokens(minilm_dir, hf_tokenizer,
                                                          shared_data_dir):
  hf = hf_tokenizer.__class__.from_pretrained(str(minilm_dir))
  hf.add_special_tokens({"additional_special_tokens": list(tokenization.MARKERS)})
  encoder = Encoder(minilm_dir, "mre", layout="none")
  assert encoder.tokenizer.vocab_size == len(hf)
  examples = [e for e in readers.read_split("mnre", "test", shared_data_dir)[:200]
              if e.head.end <= e.tail.start or e.tail.end <= e.head.start]
  for example, pieces in zip(examples, encoder.pieces(examples)):
    words = list(example.words)
    for position, marker in sorted([(example.head.start, "<s>"), (example.head.end, "</s>"),
                                    (example.tail.start, "<o>"), (example.tail.end, "</o>")],
                                   reverse=True):
      words.insert(position, marker)
    expected = hf(words, is_split_into_words=True)["input_ids"]
    row = encoder.row(example, pieces, Bucket(128, 64))
    np.testing.assert_array_equal(row["input_ids"][:len(expected)], expected)
    assert row["input_ids"][row["head_pos"]] == hf.convert_tokens_to_ids("<s>")
    assert row["input_ids"][row["tail_pos"]] == hf.convert_tokens_to_ids("<o>")
    assert row["relation"] == labels.MNRE_RELATIONS.index(example.relation)
    first = [hf_tokenizer.tokenize(w)[0] for w in example.words if hf_tokenizer.tokenize(w)]
    starts = row["word_starts"][:row["num_words"]]
    assert hf.convert_ids_to_tokens(row["input_ids"][starts]) == first


def test_vocab_txt_alone_gives_the_same_pieces(minilm_dir, tmp_path, twitter_valid):
  for name in ("vocab.txt", "tokenizer_config.json"):
    shutil.copy(minilm_dir / name, tmp_path / name)
  examples = twitter_valid[:50]
  full, bare = (Encoder(d, "mner").pieces(examples) for d in (minilm_dir, tmp_path))
  for a, b in zip(full, bare):
    np.testing.assert_array_equal(a.text_ids, b.text_ids)
    np.testing.assert_array_equal(a.context_ids, b.context_ids)


def test_tokenizer_folder_errors(tmp_path, minilm_dir):
  with pytest.raises(FileNotFoundError, match="expected a tokenizer checkpoint folder"):
    Encoder(tmp_path, "mner")
  (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n<s>\n")
  with pytest.raises(ValueError, match=r"already has the MRE markers \['<s>'\]"):
    Encoder(tmp_path, "mre")
  with pytest.raises(ValueError, match="layout='both'"):
    Encoder(minilm_dir, "mner", layout="both")


def test_a_word_cut_mid_piece_is_dropped_whole(minilm_dir):
  # "tweeting" is several pieces: a budget that ends inside a word must drop that word, never
  # overrun the bucket (it used to give a negative context length and a broadcast error).
  encoder = Encoder(minilm_dir, "mner")
  words = ("unbelievably",) * 40
  example = Example("x.jpg", words, "mem:1", tags=("O",) * 40, context="a caption")
  pieces = encoder.pieces([example])[0]
  per_word = len(pieces.text_ids) // 40
  assert per_word > 1
  fit = encoder.fit(pieces, Bucket(64, 64))
  assert fit.text == fit.words * per_word <= 61 and fit.context == 61 - fit.text >= 0
  row = encoder.row(example, pieces, Bucket(64, 64))
  assert row["num_words"] == fit.words and row["attention_mask"].sum() <= 64


def _ladder_cost(ladder, lengths, max_length):
  need = np.minimum(lengths, max_length)
  return int(np.sum(np.asarray(ladder)[np.searchsorted(ladder, need)]))


def _brute_force_ladder_cost(lengths, max_length, multiple, max_buckets, min_examples):
  """The least padded size over every admissible ladder, enumerated."""
  import itertools
  need = np.minimum(lengths, max_length)
  candidates = list(range(multiple, max_length, multiple))
  best = None
  for count in range(max_buckets):
    for smaller in itertools.combinations(candidates, count):
      ladder = (*smaller, max_length)
      lower = [0, *ladder[:-1]]
      takes = [int(np.sum((need > lo) & (need <= hi))) for lo, hi in zip(lower, ladder)]
      if any(t < min_examples for t in takes[:-1]):
        continue
      cost = _ladder_cost(ladder, lengths, max_length)
      best = cost if best is None else min(best, cost)
  return best


@pytest.mark.parametrize("seed, max_length, multiple, max_buckets, min_examples", [
    (0, 64, 8, 3, 1), (1, 64, 8, 4, 10), (2, 100, 16, 2, 1), (3, 128, 8, 5, 16),
    (4, 40, 8, 8, 1), (5, 64, 8, 1, 1)])
def test_bucket_ladder_pads_as_little_as_the_best_enumerated_ladder(
    seed, max_length, multiple, max_buckets, min_examples):
  rng = np.random.default_rng(seed)
  lengths = np.concatenate([rng.normal(30, 8, 300), rng.integers(5, 2 * max_length, 20)])
  lengths = np.maximum(lengths.astype(int), 3)
  ladder = tokenization.bucket_ladder(lengths, max_length=max_length, multiple=multiple,
                                      max_buckets=max_buckets, min_examples=min_examples)
  assert len(ladder) <= max_buckets and ladder[-1] == max_length
  assert list(ladder) == sorted(set(ladder))
  assert all(s % multiple == 0 for s in ladder[:-1])
  need = np.minimum(lengths, max_length)
  lower = [0, *ladder[:-1]]
  assert all(np.sum((need > lo) & (need <= hi)) >= min_examples
             for lo, hi in zip(lower[:-1], ladder[:-1]))
  assert _ladder_cost(ladder, lengths, max_length) == _brute_force_ladder_cost(
      lengths, max_length, multiple, max_buckets, min_examples)


def test_ladder_buckets_give_each_bucket_the_words_of_its_inputs():
  lengths = [10, 30, 31, 60, 200]
  words = [9, 3, 20, 40, 70]
  assert tokenization.ladder_buckets((32, 64, 128), lengths, words) == (
      Bucket(32, 24), Bucket(64, 40), Bucket(128, 72))
  # Word slots never exceed the positions left after [CLS] and [SEP].
  assert tokenization.ladder_buckets((16,), [12], [15]) == (Bucket(16, 14),)
