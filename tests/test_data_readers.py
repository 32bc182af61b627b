"""Readers: the published counts of the real files, and a clear error for each kind of bad input."""

import ast
import json
import pathlib
import re

import pytest
from seqeval.metrics.sequence_labeling import get_entities

from shapca_jax.data import readers
from shapca_jax.data.errors import DataFormatError
from shapca_jax.data.labels import Quintuple, Span

# data/README.md of the shared copy: examples and entities (MNER) or quintuples (JMERE).
PUBLISHED = {
    ("twitter2017", "train"): (3373, 6049), ("twitter2017", "valid"): (723, 1324),
    ("twitter2017", "test"): (723, 1351),
    ("mnre", "train"): (12247, None), ("mnre", "valid"): (1624, None),
    ("mnre", "test"): (1614, None),
    ("jmere", "train"): (3618, 4503), ("jmere", "valid"): (496, 624), ("jmere", "test"): (475, 640),
    ("twitter2015", "train"): (4000, None), ("twitter2015", "valid"): (1000, None),
}


@pytest.mark.parametrize("dataset,split", sorted(PUBLISHED))
def test_real_files_have_the_published_counts(shared_data_dir, dataset, split):
  examples = readers.read_split(dataset, split, shared_data_dir)
  num_examples, num_items = PUBLISHED[dataset, split]
  assert len(examples) == num_examples
  if dataset == "twitter2017":
    assert sum(len(get_entities(list(e.tags))) for e in examples) == num_items
  if dataset == "jmere":
    assert sum(len(e.quintuples) for e in examples) == num_items


def test_embedded_twitter2017_is_the_shared_copy(shared_data_dir, embedded_data_dir):
  for name in ("train.txt", "valid.txt", "test.txt", "contexts/blip2.txt"):
    embedded = (embedded_data_dir / "twitter2017" / name).read_bytes()
    assert embedded == (shared_data_dir / "twitter2017" / name).read_bytes(), name


def test_conll_reader_matches_a_plain_parse(embedded_data_dir):
  path = embedded_data_dir / "twitter2017" / "valid.txt"
  blocks = [b.split("\n") for b in path.read_text(encoding="utf-8").strip().split("\n\n")]
  expected = [(b[0][len("IMGID:"):] + ".jpg", tuple(l.split("\t")[0] for l in b[1:]),
               tuple(l.split("\t")[1] for l in b[1:])) for b in blocks]
  examples = readers.read_split("twitter2017", "valid", embedded_data_dir)
  assert [(e.image_id, e.words, e.tags) for e in examples] == expected
  assert examples[0].source == f"{path}:1"


def test_twitter2015_other_is_read_as_misc(shared_data_dir):
  raw = (shared_data_dir / "twitter2015" / "valid.txt").read_text(encoding="utf-8")
  examples = readers.read_split("twitter2015", "valid", shared_data_dir)
  tags = [t for e in examples for t in e.tags]
  assert "B-OTHER" not in tags and tags.count("B-MISC") == raw.count("\tB-OTHER\n") > 0


def test_twitter2015_has_no_test_split(shared_data_dir):
  assert readers.available_splits("twitter2015", shared_data_dir) == ("train", "valid")
  with pytest.raises(DataFormatError, match=r"twitter2015/test\.txt: cannot read the file"):
    readers.read_split("twitter2015", "test", shared_data_dir)


def test_mnre_spans_and_types_come_from_the_line(shared_data_dir):
  path = shared_data_dir / "mnre" / "ours_val.txt"
  lines = [ast.literal_eval(l) for l in path.read_text(encoding="utf-8").split("\n")[:50]]
  examples = readers.read_split("mnre", "valid", shared_data_dir)
  for number, (line, example) in enumerate(zip(lines, examples), 1):
    types = line["relation"].split("/")[1:3] if line["relation"] != "None" else ["", ""]
    assert example.head == Span(*line["h"]["pos"], types[0])
    assert example.tail == Span(*line["t"]["pos"], types[1])
    assert (example.relation, example.image_id, example.source) == (
        line["relation"], line["img_id"], f"{path}:{number}")
  assert {e.relation for e in examples[:50]} > {"None"}


def test_jmere_quintuples_come_from_the_json(shared_data_dir):
  sample = json.loads((shared_data_dir / "jmere" / "test.json").read_text())[0]
  expected = tuple(Quintuple(Span(*r["beg_ent"]["pos"], r["beg_ent"]["tags"]),
                             Span(*r["sec_ent"]["pos"], r["sec_ent"]["tags"]), r["relation"])
                   for group in sample["label_list"] for r in group)
  assert readers.read_split("jmere", "test", shared_data_dir)[0].quintuples == expected


MNRE_LINE = ("{'token': ['Ann', 'met', 'Bob', 'in', 'Rome'], 'h': {'name': 'Ann', 'pos': [0, 1]}, "
             "'t': {'name': 'Bob', 'pos': [2, 3]}, 'img_id': 'a.jpg', 'relation': '/per/per/peer'}")
JMERE_SAMPLE = {"token": ["Ann", "met", "Bob"], "img_id": "a.jpg", "label_list": [[{
    "beg_ent": {"name": "Ann", "pos": [0, 1], "tags": "per"},
    "sec_ent": {"name": "Bob", "pos": [2, 3], "tags": "per"}, "relation": "peer"}]]}


def _jmere(**changes):
  sample = json.loads(json.dumps(JMERE_SAMPLE))
  relation = sample["label_list"][0][0]
  for key, value in changes.items():
    target, _, field = key.partition("__")
    (relation[target] if field else relation)[field or target] = value
  return json.dumps([JMERE_SAMPLE, sample])


BAD_INPUT = {
    # name: (dataset, file content, expected message; {path} is the file written)
    "tweet without IMGID": ("twitter2017", "IMGID:1\nA\tO\n\nB\tO\n",
                            r"{path}:4: expected 'IMGID:<image id>'"),
    "token line without tab": ("twitter2017", "IMGID:1\nA\tO\nB O\n",
                               r"{path}:3: expected 'token<TAB>tag', got 'B O'"),
    "unknown tag": ("twitter2017", "IMGID:1\nA\tO\nB\tB-FOO\n",
                    r"{path}:3: unknown tag 'B-FOO'; expected one of O, B-PER"),
    "tweet without tokens": ("twitter2017", "IMGID:1\n\nIMGID:2\nA\tO\n",
                             r"{path}:1: expected token lines after 'IMGID:1'"),
    "not UTF-8": ("twitter2017", b"IMGID:1\nA\tO\n\nIMGID:2\n\xff\tO\n",
                  r"{path}:5: expected UTF-8 text"),
    "MNRE line not a dict": ("mnre", MNRE_LINE + "\n{'token': ['x'\n",
                             r"{path}:2: expected a Python dict literal"),
    "MNRE unknown relation": ("mnre", MNRE_LINE.replace("/per/per/peer", "/per/per/friend"),
                              r"{path}:1: unknown relation '/per/per/friend'; "
                              r"expected one of None"),
    "MNRE span outside": ("mnre", MNRE_LINE.replace("[2, 3]", "[4, 6]"),
                          r"{path}:1: 't': span \[4, 6\] is outside the sentence of 5 words"),
    "MNRE span not the name": ("mnre", MNRE_LINE.replace("[2, 3]", "[1, 2]"),
                               r"{path}:1: 't': span \[1, 2\] covers 'met', expected .* 'Bob'"),
    "MNRE missing field": ("mnre", MNRE_LINE.replace("'img_id'", "'image'"),
                           r"{path}:1: expected a field 'img_id'"),
    "JMERE not JSON": ("jmere", '[{"token": ["a"],\n "img_id": }]',
                       r"{path}:2: expected JSON"),
    "JMERE unknown type": ("jmere", _jmere(beg_ent__tags="person"),
                           r"{path}:item 1: label_list\[0\]\[0\].beg_ent: unknown entity type "
                           r"'person'; expected one of per, org, misc, loc"),
    "JMERE span outside": ("jmere", _jmere(sec_ent__pos=[2, 4]),
                           r"{path}:item 1: label_list\[0\]\[0\].sec_ent: span \[2, 4\] is "
                           r"outside the sentence of 3 words"),
    "JMERE unknown relation": ("jmere", _jmere(relation="friend"),
                               r"{path}:item 1: label_list\[0\]\[0\]: unknown relation 'friend'"),
    # Pathological lines: without bounds, a bare RecursionError or MemoryError.
    "MNRE nested brackets": ("mnre", MNRE_LINE + "\n" + "[" * 100_000 + "\n",
                             r"{path}:2: brackets nest more than 100 levels deep"),
    "MNRE chain of minus signs": ("mnre", MNRE_LINE + "\n" + "-" * 100_000 + "1\n",
                                  r"{path}:2: the line has 100,001 characters; expected at most "
                                  r"100,000"),
    "MNRE shorter chain of minus signs": ("mnre", "-" * 5_000 + "1\n",
                                          r"{path}:1: more than 100 operators outside strings"),
    "MNRE chain of attributes": ("mnre", "a" + ".a" * 20_000 + "\n",
                                 r"{path}:1: expected a Python dict literal"),
    "JMERE nested brackets": ("jmere", "[\n" + "[" * 100_000,
                              r"{path}:2: brackets nest more than 100 levels deep"),
    "empty split": ("twitter2017", "", r"{path}: no examples in the valid split"),
    "split of blank lines": ("twitter2017", "\n\n \n", r"{path}: no examples in the valid split"),
    "JMERE split without samples": ("jmere", "[]", r"{path}: no examples in the valid split"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_names_file_line_and_expectation(tmp_path, case):
  dataset, content, message = BAD_INPUT[case]
  path = readers.split_path(dataset, "valid", tmp_path)
  path.parent.mkdir(parents=True)
  if isinstance(content, str):
    content = content.encode("utf-8")
  path.write_bytes(content)
  with pytest.raises(DataFormatError, match=message.format(path=re.escape(str(path)))):
    readers.read_split(dataset, "valid", tmp_path)


def test_a_byte_order_mark_is_skipped(tmp_path, embedded_data_dir):
  original = readers.split_path("twitter2017", "valid", embedded_data_dir).read_bytes()
  path = readers.split_path("twitter2017", "valid", tmp_path)
  path.parent.mkdir(parents=True)
  path.write_bytes(b"\xef\xbb\xbf" + original)  # as Windows editors save UTF-8
  fields = lambda examples: [(e.image_id, e.words, e.tags) for e in examples]
  assert (fields(readers.read_split("twitter2017", "valid", tmp_path))
          == fields(readers.read_split("twitter2017", "valid", embedded_data_dir)))


@pytest.mark.parametrize("make", ["missing", "directory"])
def test_unreadable_file_is_named(tmp_path, make):
  path = readers.split_path("twitter2017", "train", tmp_path)
  if make == "directory":
    path.mkdir(parents=True)
  with pytest.raises(DataFormatError, match=re.escape(f"{path}: cannot read the file")):
    readers.read_split("twitter2017", "train", tmp_path)


def test_unknown_dataset_or_split_lists_the_choices(tmp_path):
  with pytest.raises(ValueError, match="expected one of twitter2015, twitter2017, mnre, jmere"):
    readers.read_split("twitter2016", "train", tmp_path)
  with pytest.raises(ValueError, match="expected one of train, valid, test"):
    readers.read_split("mnre", "val", tmp_path)


def test_rel2id_that_disagrees_is_an_error(tmp_path):
  path = readers.split_path("mnre", "valid", tmp_path)
  path.parent.mkdir(parents=True)
  path.write_text(MNRE_LINE + "\n")
  (tmp_path / readers.MNRE_REL2ID_FILE).write_text(json.dumps({"None": 0, "/per/per/peer": 1}))
  with pytest.raises(DataFormatError, match=r"ours_rel2id\.json: expected the 23 MNRE relations"):
    readers.read_split("mnre", "valid", tmp_path)
  pathlib.Path(tmp_path / readers.MNRE_REL2ID_FILE).unlink()
  assert readers.read_split("mnre", "valid", tmp_path)[0].relation == "/per/per/peer"
