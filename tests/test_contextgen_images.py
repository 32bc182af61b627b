"""Tests for shapca_jax.contextgen.images, on the 12 real MNRE images."""

import ast
import importlib.util
import io
import shutil

import numpy as np
import pytest
from PIL import Image

from shapca_jax.contextgen import images


@pytest.fixture(scope="module")
def mnre_image_dir(shared_data_dir):
  return shared_data_dir / "mnre" / "images"


def test_folder_lists_every_image_by_file_name(mnre_image_dir):
  paths = sorted(mnre_image_dir.glob("*/*.jpg"), key=lambda p: p.name)
  refs = images.refs_from_folder(mnre_image_dir)
  assert len(refs) == 12
  assert [(r.image_id, r.path) for r in refs] == [(p.name, p) for p in paths]


def test_folder_with_one_name_twice_is_refused(tmp_path, mnre_image_dir):
  source = next(mnre_image_dir.glob("train/*.jpg"))
  for sub in ("a", "b"):
    (tmp_path / sub).mkdir()
    shutil.copy(source, tmp_path / sub / source.name)
  with pytest.raises(ValueError, match=f"two images named '{source.name}'"):
    images.index_folder(tmp_path)


def test_missing_or_empty_folder_is_refused(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    images.index_folder(tmp_path / "nope")
  (tmp_path / "notes.txt").write_text("no images here")
  with pytest.raises(ValueError, match="no image files"):
    images.index_folder(tmp_path)


def test_ids_resolve_with_or_without_extension_and_missing_ones_are_kept(mnre_image_dir):
  refs = images.refs_from_ids(
      ["twitter_19_31_16_6", "twitter_19_31_16_6.jpg", "twitter_19_31_22_54.jpg", "absent.jpg"],
      mnre_image_dir)
  assert [r.image_id for r in refs] == [
      "twitter_19_31_16_6.jpg", "twitter_19_31_22_54.jpg", "absent.jpg"]
  assert refs[0].path == mnre_image_dir / "train" / "twitter_19_31_16_6.jpg"
  assert refs[1].path == mnre_image_dir / "test" / "twitter_19_31_22_54.jpg"
  assert not refs[2].path.exists()


def test_duplicate_refs_are_refused(mnre_image_dir):
  ref = images.refs_from_folder(mnre_image_dir)[0]
  with pytest.raises(ValueError, match="occurs twice"):
    images.check_unique([ref, ref])


def test_jpeg_is_sent_as_its_own_bytes(mnre_image_dir):
  ref = images.refs_from_folder(mnre_image_dir)[0]
  loaded = images.load_image(ref)
  assert (loaded.image_id, loaded.data, loaded.mime) == (
      ref.image_id, ref.path.read_bytes(), "image/jpeg")


def test_other_formats_are_reencoded_as_lossless_png(tmp_path, mnre_image_dir):
  source = Image.open(next(mnre_image_dir.glob("val/*.jpg"))).convert("RGB")
  source.save(tmp_path / "x.bmp")
  loaded = images.load_image(images.ImageRef("x.bmp", tmp_path / "x.bmp"))
  assert loaded.mime == "image/png"
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(loaded.data))),
                                np.asarray(source))


def test_missing_truncated_and_non_image_files_raise_with_the_reason(tmp_path, mnre_image_dir):
  data = next(mnre_image_dir.glob("test/*.jpg")).read_bytes()
  (tmp_path / "cut.jpg").write_bytes(data[:len(data) // 2])
  (tmp_path / "text.jpg").write_text("not an image")
  for name, match in [("gone.jpg", "not found"), ("cut.jpg", "unreadable.*truncated"),
                      ("text.jpg", "unreadable")]:
    with pytest.raises(images.ImageError, match=match):
      images.load_image(images.ImageRef(name, tmp_path / name))


@pytest.mark.skipif(importlib.util.find_spec("shapca_jax.data.readers") is None,
                    reason="the data readers (shapca_jax.data.readers) are not in this checkout")
def test_dataset_ids_come_from_the_split(shared_data_dir, mnre_image_dir):
  with open(shared_data_dir / "mnre" / "ours_test.txt", encoding="utf-8") as f:
    expected = list(dict.fromkeys(ast.literal_eval(line)["img_id"] for line in f if line.strip()))
  refs = images.refs_from_dataset("mnre", "test", shared_data_dir, mnre_image_dir)
  assert [r.image_id for r in refs] == expected
  present = {p.name for p in mnre_image_dir.glob("test/*.jpg")}
  assert {r.image_id for r in refs if r.path.exists()} == present
