"""TFDS builders on slices of the real files: prepared without TensorFlow, read back with
`tfds.data_source`, equal to what the readers and context joins give."""

import ast
import dataclasses
import json
import re
import shutil
import sys

import numpy as np
import pytest

from shapca_jax.data import builders, contexts, readers
from shapca_jax.data.errors import DataFormatError
from shapca_jax.data.pipeline import BatchPipeline
from shapca_jax.data.tokenization import Encoder

SLICE = 25


def _slice_twitter(src, dst, dataset):
  keys = set()
  for split in readers.available_splits(dataset, src):
    blocks = readers.split_path(dataset, split, src).read_text(encoding="utf-8").split("\n\n")
    out = readers.split_path(dataset, split, dst)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n\n".join(blocks[:SLICE]) + "\n", encoding="utf-8")
    keys |= {b.split("\n")[0][len("IMGID:"):] for b in blocks[:SLICE]}
  captions = (src / dataset / "contexts" / "blip2.txt").read_text(encoding="utf-8").splitlines()
  (dst / dataset / "contexts").mkdir()
  (dst / dataset / "contexts" / "blip2.txt").write_text(
      "".join(c + "\n" for c in captions if contexts.image_key(c.split(" :")[0]) in keys))


def _slice_mnre(src, dst):
  for split in readers.SPLITS:
    name = readers.SPLIT_NAMES["mnre"][split]
    lines = readers.split_path("mnre", split, src).read_text(encoding="utf-8").splitlines()[:SLICE]
    out = readers.split_path("mnre", split, dst)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(line + "\n" for line in lines))
    ids = {ast.literal_eval(line)["img_id"] for line in lines} | {"inf.png"}
    captions = (src / "mnre" / "contexts" / f"BLIP_{name}.txt").read_text().splitlines()
    (dst / "mnre" / "contexts").mkdir(exist_ok=True)
    (dst / "mnre" / "contexts" / f"BLIP_{name}.txt").write_text(
        "".join(c + "\n" for c in captions if ast.literal_eval(c)["img_id"] in ids))
    shutil.copytree(src / "mnre" / "images" / name, dst / "mnre" / "images" / name)


def _slice_jmere(src, dst):
  (dst / "jmere").mkdir()
  for split in readers.SPLITS:
    samples = json.loads(readers.split_path("jmere", split, src).read_text())
    # JMERE samples whose MNRE image is among the MNRE slice, so BLIP contexts cover them.
    mnre_ids = {e.image_id for e in readers.read_split("mnre", split, dst)}
    kept = [s for s in samples if s["img_id"] in mnre_ids][:SLICE]
    readers.split_path("jmere", split, dst).write_text(json.dumps(kept))


@pytest.fixture(scope="module")
def raw_dir(shared_data_dir, tmp_path_factory):
  root = tmp_path_factory.mktemp("raw")
  for dataset in ("twitter2015", "twitter2017"):
    _slice_twitter(shared_data_dir, root, dataset)
  _slice_mnre(shared_data_dir, root)
  _slice_jmere(shared_data_dir, root)
  return root


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


def _expected(dataset, split, raw_dir, source, missing_context="error"):
  examples = readers.read_split(dataset, split, raw_dir)
  if source is not None:
    examples, _ = contexts.attach_contexts(examples, dataset, split, raw_dir, source,
                                           missing_context=missing_context)
  find = lambda image_id: builders.find_image(raw_dir, dataset, split, image_id)
  return [dataclasses.replace(e, image_path=find(e.image_id)) for e in examples]


@pytest.mark.parametrize("dataset,source", [("twitter2017", "blip2"), ("twitter2015", "blip2"),
                                            ("mnre", "BLIP"), ("jmere", "BLIP"),
                                            ("twitter2017", None)])
def test_prepared_splits_read_back_equal_to_the_readers(raw_dir, build_dir, dataset, source):
  builder = builders.prepare(dataset, raw_dir, build_dir, source)
  assert builder.info.splits.keys() == set(readers.available_splits(dataset, raw_dir))
  for split in readers.available_splits(dataset, raw_dir):
    loaded = builders.load_split(dataset, split, build_dir, source)
    expected = _expected(dataset, split, raw_dir, source)
    assert len(loaded) == len(expected) > 0
    assert list(loaded) == expected  # same order as the raw file, every field equal
  assert "tensorflow" not in sys.modules


def test_mnre_records_carry_the_image_paths_found(raw_dir, build_dir):
  builders.prepare("mnre", raw_dir, build_dir, "BLIP")
  loaded = builders.load_split("mnre", "train", build_dir, "BLIP")
  found = [e.image_path for e in loaded if e.image_path]
  assert found and all(p.startswith(str(raw_dir / "mnre" / "images" / "train")) for p in found)


def test_custom_configs_for_jsonl_and_missing_contexts(raw_dir, build_dir, tmp_path):
  examples = readers.read_split("twitter2017", "valid", raw_dir)
  path = tmp_path / "gen_{split}.jsonl"
  for split in readers.SPLITS:
    ids = [e.image_id for e in readers.read_split("twitter2017", split, raw_dir)]
    (tmp_path / f"gen_{split}.jsonl").write_text("".join(
        json.dumps({"image_id": i, "context": f"ctx {i}", "generator": "test"}) + "\n"
        for i in ids[1:]))  # the first image of each split has no context
  with pytest.raises(DataFormatError, match="1 of 25 examples have no context"):
    builders.prepare("twitter2017", raw_dir, build_dir, str(path))
  builder = builders.prepare("twitter2017", raw_dir, build_dir, str(path), missing_context="empty")
  assert re.fullmatch(r"jsonl-gen_split-[0-9a-f]{12}-missing_empty",
                      builder.builder_config.name)
  loaded = builders.load_split("twitter2017", "valid", build_dir, str(path),
                               missing_context="empty")
  assert [e.context for e in loaded] == [None] + [f"ctx {e.image_id}" for e in examples[1:]]


def test_a_rewritten_jsonl_is_prepared_again_not_read_from_the_old_records(raw_dir, tmp_path):
  path, build_dir = tmp_path / "gen.jsonl", tmp_path / "build"

  def write(prefix):
    ids = {e.image_id for s in readers.SPLITS for e in readers.read_split("twitter2017", s,
                                                                           raw_dir)}
    path.write_text("".join(json.dumps({"image_id": i, "context": f"{prefix} {i}"}) + "\n"
                            for i in sorted(ids)))

  for prefix in ("first", "second"):
    write(prefix)
    builders.prepare("twitter2017", raw_dir, build_dir, str(path))
    loaded = builders.load_split("twitter2017", "test", build_dir, str(path))
    assert [e.context for e in loaded] == [f"{prefix} {e.image_id}" for e in loaded]


def test_bad_raw_file_stops_the_build_with_its_line(raw_dir, build_dir, tmp_path):
  bad = tmp_path / "raw"
  shutil.copytree(raw_dir / "twitter2017", bad / "twitter2017")
  path = bad / "twitter2017" / "test.txt"
  path.write_text(path.read_text().replace("\tO\n", "\tO-X\n", 1))
  with pytest.raises(DataFormatError, match=rf"{path}:\d+: unknown tag 'O-X'"):
    builders.prepare("twitter2017", bad, tmp_path / "out", "blip2")


def test_pipeline_over_a_data_source_gives_the_same_batches(raw_dir, build_dir, minilm_dir):
  builders.prepare("jmere", raw_dir, build_dir, "BLIP")
  source = builders.load_split("jmere", "valid", build_dir, "BLIP")
  examples = _expected("jmere", "valid", raw_dir, "BLIP")
  encoder = Encoder(minilm_dir, "jmere")
  from_source = list(BatchPipeline(source, encoder, batch_size=4, shuffle=True, seed=1))
  from_list = list(BatchPipeline(examples, encoder, batch_size=4, shuffle=True, seed=1))
  assert len(from_source) == len(from_list) > 1
  for a, b in zip(from_source, from_list):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_unknown_dataset_is_named(tmp_path):
  with pytest.raises(ValueError, match="unknown dataset 'conll2003'"):
    builders.prepare("conll2003", tmp_path, tmp_path, None)
