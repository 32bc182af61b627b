"""Context sources: coverage of the real files, the id join, and every kind of bad context input."""

import ast
import json
import pathlib
import re

import pytest

from shapca_jax.data import contexts, readers
from shapca_jax.data.errors import DataFormatError


@pytest.fixture(scope="module")
def mnre_splits(shared_data_dir):
  return {s: readers.read_split("mnre", s, shared_data_dir) for s in readers.SPLITS}


def _examples_with_empty_captions(path, examples) -> int:
  """Counted here with a plain parse: BLIP left some images without a caption."""
  empty = {ast.literal_eval(line)["img_id"] for line in path.read_text().splitlines()
           if not ast.literal_eval(line)["text"].strip()}
  return sum(e.image_id in empty for e in examples)


@pytest.mark.parametrize("source", contexts.MNRE_SOURCES)
def test_every_mnre_captioner_covers_every_split(shared_data_dir, mnre_splits, source):
  for split, examples in mnre_splits.items():
    missing_context = "empty" if source == "BLIP" else "error"
    joined, report = contexts.attach_contexts(examples, "mnre", split, shared_data_dir, source,
                                              missing_context=missing_context)
    assert report.coverage == 1.0 and report.missing == 0
    assert report.empty_texts == _examples_with_empty_captions(pathlib.Path(report.files[0]),
                                                               examples)
    assert report.empty_texts > 0 if source == "BLIP" else report.empty_texts == 0
    assert report.placeholders_dropped == 1  # CAMIM's `inf.png` line, counted, not hidden
    assert all(e.context is not None for e in joined)


def test_mnre_contexts_are_the_file_texts(shared_data_dir, mnre_splits):
  path = shared_data_dir / "mnre" / "contexts" / "instruct_test.txt"
  texts = {}
  for line in path.read_text(encoding="utf-8").splitlines():
    record = ast.literal_eval(line)
    texts[record["img_id"]] = record["text"].strip()
  joined, _ = contexts.attach_contexts(mnre_splits["test"], "mnre", "test", shared_data_dir,
                                       "instruct")
  assert [e.context for e in joined] == [texts[e.image_id] for e in joined]


def test_a_subset_of_a_split_joins_against_the_whole_split(shared_data_dir, mnre_splits):
  joined, report = contexts.attach_contexts(mnre_splits["valid"][:10], "mnre", "valid",
                                            shared_data_dir, "BLIP")
  assert report.examples == 10 and all(e.context is not None for e in joined)


def test_jmere_joins_mnre_contexts(shared_data_dir):
  examples = readers.read_split("jmere", "valid", shared_data_dir)
  _, report = contexts.attach_contexts(examples, "jmere", "valid", shared_data_dir, "BLIP",
                                      missing_context="empty")
  assert report.coverage == 1.0 and report.files[0].endswith("mnre/contexts/BLIP_val.txt")


@pytest.mark.parametrize("source", contexts.TWITTER_SOURCES)
def test_twitter2017_sources_cover_every_split(shared_data_dir, source):
  for split in readers.SPLITS:
    examples = readers.read_split("twitter2017", split, shared_data_dir)
    _, report = contexts.attach_contexts(examples, "twitter2017", split, shared_data_dir, source)
    assert (report.examples, report.coverage) == (len(examples), 1.0)


def test_blip2_captions_join_by_image_id(embedded_data_dir):
  path = embedded_data_dir / "twitter2017" / "contexts" / "blip2.txt"
  captions = dict(line.split(" :", 1) for line in path.read_text(encoding="utf-8").splitlines())
  examples = readers.read_split("twitter2017", "test", embedded_data_dir)
  joined, _ = contexts.attach_contexts(examples, "twitter2017", "test", embedded_data_dir, "blip2")
  assert [e.context for e in joined] == [captions[e.image_id].strip() for e in examples]


def test_twitter2015_pgim_lacks_the_last_tweet_and_says_so(shared_data_dir):
  examples = readers.read_split("twitter2015", "valid", shared_data_dir)
  with pytest.raises(DataFormatError, match=r"1 of 1000 examples have no context, e\.g\. .*"
                     r"valid\.txt:\d+ \(image \d+\.jpg\).*missing_context='empty'"):
    contexts.attach_contexts(examples, "twitter2015", "valid", shared_data_dir, "pgim")
  joined, report = contexts.attach_contexts(examples, "twitter2015", "valid", shared_data_dir,
                                            "pgim", missing_context="empty")
  assert (report.missing, report.with_context) == (1, 999)
  assert joined[-1].context is None and all(e.context for e in joined[:-1])
  assert report.crlf_lines > 0


def _tiny_twitter(root, valid_ids=("1", "2"), train_ids=("3",)):
  for split, ids in (("valid", valid_ids), ("train", train_ids)):
    path = readers.split_path("twitter2017", split, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(f"IMGID:{i}\nword{i}\tO\nB{i}\tB-PER\n" for i in ids))
  (root / "twitter2017" / "contexts").mkdir(exist_ok=True)
  return readers.read_split("twitter2017", "valid", root)


def test_jsonl_joins_with_or_without_extension(tmp_path):
  examples = _tiny_twitter(tmp_path)
  path = tmp_path / "ctx.jsonl"
  path.write_text(json.dumps({"image_id": "1", "context": " a dog ", "generator": "g"}) + "\n"
                  + json.dumps({"image_id": "2.JPG", "context": "a cat", "extra": 1}) + "\n"
                  + json.dumps({"image_id": "3.jpg", "context": "train image"}) + "\n")
  joined, report = contexts.attach_contexts(examples, "twitter2017", "valid", tmp_path, str(path))
  assert [e.context for e in joined] == ["a dog", "a cat"]
  assert report.source == str(path)


def test_jsonl_per_split_pattern(tmp_path):
  examples = _tiny_twitter(tmp_path)
  (tmp_path / "ctx_valid.jsonl").write_text(
      "".join(json.dumps({"image_id": f"{i}.jpg", "context": f"c{i}"}) + "\n" for i in (1, 2)))
  joined, _ = contexts.attach_contexts(examples, "twitter2017", "valid", tmp_path,
                                       str(tmp_path / "ctx_{split}.jsonl"))
  assert [e.context for e in joined] == ["c1", "c2"]


def test_missing_context_is_an_error_unless_asked(tmp_path):
  examples = _tiny_twitter(tmp_path)
  path = tmp_path / "twitter2017" / "contexts" / "blip2.txt"
  path.write_text("1.jpg :a dog\n3.jpg :train image\n")
  valid = readers.split_path("twitter2017", "valid", tmp_path)
  with pytest.raises(DataFormatError, match=re.escape(
      f"{path}: 1 of 2 examples have no context, e.g. {valid}:5 (image 2.jpg); expected one per "
      "example (pass missing_context='empty' to count them instead)")):
    contexts.attach_contexts(examples, "twitter2017", "valid", tmp_path, "blip2")
  joined, report = contexts.attach_contexts(examples, "twitter2017", "valid", tmp_path, "blip2",
                                            missing_context="empty")
  assert [e.context for e in joined] == ["a dog", None]
  assert (report.missing, report.coverage) == (1, 0.5)


def test_an_empty_context_is_an_error_unless_asked(tmp_path):
  examples = _tiny_twitter(tmp_path)
  path = tmp_path / "twitter2017" / "contexts" / "blip2.txt"
  path.write_text("1.jpg :a dog\n3.jpg :train image\n2.jpg : \n")
  valid = readers.split_path("twitter2017", "valid", tmp_path)
  with pytest.raises(DataFormatError, match=re.escape(
      f"{path}:3: the context of {valid}:5 (image 2.jpg) is empty; expected text (pass "
      "missing_context='empty' to count empty contexts instead)")):
    contexts.attach_contexts(examples, "twitter2017", "valid", tmp_path, "blip2")
  joined, report = contexts.attach_contexts(examples, "twitter2017", "valid", tmp_path, "blip2",
                                            missing_context="empty")
  assert [e.context for e in joined] == ["a dog", ""]
  assert (report.empty_texts, report.missing) == (1, 0)


BAD_CONTEXTS = {
    # name: (source, file name, content, expected message; {path} is the file written)
    "id matching nothing": ("blip2", "twitter2017/contexts/blip2.txt",
                            "1.jpg :a\n2.jpg :b\n3.jpg :c\n99.jpg :stray\n",
                            r"{path}: 1 context ids match no image of the data set, e\.g\. "
                            r"\['99'\]"),
    "caption line without separator": ("blip2", "twitter2017/contexts/blip2.txt",
                                       "1.jpg :a\n2.jpg a caption\n",
                                       r"{path}:2: expected '<image id> :<caption>'"),
    "two captions for one image": ("blip2", "twitter2017/contexts/blip2.txt",
                                   "1.jpg :a\n2.jpg :b\n1.jpg :c\n",
                                   r"{path}:3: image '1' already has a different context at "
                                   r"line 1"),
    "JSONL line not JSON": ("ctx.jsonl", "ctx.jsonl", '{"image_id": "1", "context": "a"}\n{oops\n',
                            r"{path}:2: expected a JSON object"),
    "JSONL without context": ("ctx.jsonl", "ctx.jsonl", '{"image_id": "1", "text": "a"}\n',
                              r"{path}:1: expected string fields 'image_id' and 'context'"),
    "PGIM without EOS": ("pgim", "twitter2017/contexts/pgim/valid.txt", "word1\tO\nctx\tX\n",
                         r"{path}:1: expected a line '<EOS><TAB>X'"),
    "PGIM words of another tweet": ("pgim", "twitter2017/contexts/pgim/valid.txt",
                                    "word1\tO\nB1\tB-PER\n<EOS>\tX\nok\tX\n\n"
                                    "word9\tO\nB2\tB-PER\n<EOS>\tX\nno\tX\n",
                                    r"{path}:6: expected the words of the tweet at .*valid\.txt:5, "
                                    r"got 'word9 B2'"),
    "PGIM more entries than tweets": ("pgim", "twitter2017/contexts/pgim/valid.txt",
                                      "word1\tO\nB1\tB-PER\n<EOS>\tX\n\nword2\tO\nB2\tB-PER\n"
                                      "<EOS>\tX\n\nx\tO\n<EOS>\tX\n",
                                      r"{path}:9: entry 3 has no tweet"),
    "not UTF-8": ("blip2", "twitter2017/contexts/blip2.txt", b"1.jpg :a\n2.jpg :\xe9t\xe9\n",
                  r"{path}:2: expected UTF-8 text"),
    "JSONL line nested too deep": ("ctx.jsonl", "ctx.jsonl",
                                   '{"image_id": "1", "context": "a"}\n' + "[" * 100_000 + "\n",
                                   r"{path}:2: brackets nest more than 100 levels deep"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONTEXTS))
def test_bad_context_input_names_file_line_and_expectation(tmp_path, case):
  source, name, content, message = BAD_CONTEXTS[case]
  examples = _tiny_twitter(tmp_path)
  path = tmp_path / name
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
  source = str(path) if source.endswith(".jsonl") else source
  with pytest.raises(DataFormatError, match=message.format(path=re.escape(str(path)))):
    contexts.attach_contexts(examples, "twitter2017", "valid", tmp_path, source,
                             missing_context="empty")


def test_unreadable_context_file_is_named(tmp_path):
  examples = _tiny_twitter(tmp_path)
  path = tmp_path / "twitter2017" / "contexts" / "blip2.txt"
  with pytest.raises(DataFormatError, match=re.escape(f"{path}: cannot read the file")):
    contexts.attach_contexts(examples, "twitter2017", "valid", tmp_path, "blip2")


def test_unknown_source_lists_the_choices(tmp_path):
  with pytest.raises(ValueError, match="expected one of BLIP, instruct, llavanext, caption, "
                                       "minicpm or a path ending in .jsonl"):
    contexts.resolve_source("mnre", "blip2")


def test_image_key_drops_only_image_extensions():
  assert contexts.image_key("17_06_12483.jpg") == "17_06_12483"
  assert contexts.image_key("inf.png") == "inf"
  assert contexts.image_key("O_997") == "O_997"
  assert contexts.image_key("v1.5") == "v1.5"
