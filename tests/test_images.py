"""ImageProcessor and load_images against transformers' image processors on real MNRE images."""

import json

import numpy as np
import pytest
from PIL import Image, ImageOps
from transformers import CLIPImageProcessorPil, ViTImageProcessorPil

from shapca_jax.data.images import ImageProcessor, ImageReadError, load_images


@pytest.fixture(scope="module")
def mnre_images(shared_data_dir):
  paths = sorted((shared_data_dir / "mnre" / "images").glob("*/*.jpg"))
  assert len(paths) == 12
  return paths


def _reference(processor, path) -> np.ndarray:
  """transformers' output for the decoded file, NHWC like ours."""
  image = ImageOps.exif_transpose(Image.open(path))
  return processor(image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)


def _max_diff(ours_processor, reference_processor, paths) -> float:
  return max(float(np.abs(ours_processor(p) - _reference(reference_processor, p)).max())
             for p in paths)


def test_clip_defaults_equal_transformers_on_the_real_mnre_images(mnre_images, tmp_path):
  ours = ImageProcessor.from_checkpoint(tmp_path)  # no preprocessor_config.json: CLIP defaults
  max_diff = _max_diff(ours, CLIPImageProcessorPil(), mnre_images)
  print(f"12 MNRE images, CLIP preprocessing max |diff| vs transformers: {max_diff:.1e}")
  assert ours(mnre_images[0]).shape == (224, 224, 3)
  assert max_diff <= 1e-6


@pytest.mark.parametrize("reference", [
    CLIPImageProcessorPil(size={"shortest_edge": 256}, crop_size={"height": 240, "width": 200}),
    ViTImageProcessorPil(),  # fixed 224x224 bilinear resize, no crop, mean/std 0.5
], ids=["clip-custom", "vit"])
def test_saved_preprocessor_config_is_followed(reference, mnre_images, tmp_path):
  reference.save_pretrained(tmp_path)
  ours = ImageProcessor.from_checkpoint(tmp_path)
  assert _max_diff(ours, reference, mnre_images[:4]) <= 1e-6


def test_legacy_int_sizes_and_small_images(tmp_path):
  """Old CLIP configs store bare ints; images smaller than the crop are zero-padded."""
  (tmp_path / "preprocessor_config.json").write_text(json.dumps(
      {"feature_extractor_type": "CLIPFeatureExtractor", "size": 40, "crop_size": 48}))
  ours = ImageProcessor.from_checkpoint(tmp_path)
  assert (ours.shortest_edge, ours.crop_hw) == (40, (48, 48))
  path = tmp_path / "wide.png"
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 90, 3), np.uint8)).save(path)
  reference = CLIPImageProcessorPil(size={"shortest_edge": 40},
                                    crop_size={"height": 48, "width": 48})
  np.testing.assert_allclose(ours(path), _reference(reference, path), atol=1e-6)


@pytest.mark.parametrize("mode", ["RGBA", "L", "P"])
def test_non_rgb_modes_convert_like_transformers(mode, tmp_path):
  rng = np.random.default_rng(1)
  image = Image.fromarray(rng.integers(0, 256, (50, 70, 4), np.uint8), "RGBA").convert(mode)
  path = tmp_path / f"image_{mode}.png"
  image.save(path)
  np.testing.assert_allclose(ImageProcessor()(path), _reference(CLIPImageProcessorPil(), path),
                             atol=1e-6)


def test_unsupported_preprocessor_settings_name_the_key(tmp_path):
  with pytest.raises(ValueError, match="do_pad"):
    ImageProcessor.from_dict({"do_pad": True})
  with pytest.raises(ValueError, match="size="):
    ImageProcessor.from_dict({"size": {"longest_edge": 300}})
  (tmp_path / "preprocessor_config.json").write_text("{\n  'size': 3\n}")
  with pytest.raises(ValueError, match="preprocessor_config.json: invalid JSON at line 2"):
    ImageProcessor.from_checkpoint(tmp_path)


@pytest.fixture()
def bad_files(mnre_images, tmp_path):
  truncated = tmp_path / "truncated.jpg"
  truncated.write_bytes(mnre_images[0].read_bytes()[:3000])
  not_an_image = tmp_path / "text.jpg"
  not_an_image.write_text("hello")
  return [tmp_path / "missing.jpg", truncated, not_an_image]


def test_unreadable_images_raise_naming_the_file(bad_files):
  for path in bad_files:
    with pytest.raises(ImageReadError, match=path.name):
      ImageProcessor()(path)


def test_load_images_blank_mode_counts_blanks(mnre_images, bad_files):
  processor = ImageProcessor()
  paths = [mnre_images[0], *bad_files, mnre_images[1]]
  with pytest.raises(ImageReadError, match="missing.jpg"):
    load_images(paths, processor)
  batch, num_blank = load_images(paths, processor, missing_image="blank")
  assert batch.shape == (5, 224, 224, 3) and batch.dtype == np.float32
  assert num_blank == 3
  assert not batch[1:4].any()
  np.testing.assert_array_equal(batch[4], processor(mnre_images[1]))
  with pytest.raises(ValueError, match="missing_image"):
    load_images(paths, processor, missing_image="skip")


def test_variable_output_size_cannot_be_batched():
  processor = ImageProcessor(do_center_crop=False)
  assert processor.output_hw is None
  with pytest.raises(ValueError, match="stacked"):
    load_images([], processor)


def test_images_over_the_pixel_limit_are_refused_before_decoding(tmp_path, monkeypatch):
  # 13,000 x 13,000 one-bit pixels compress to a small PNG that would decode to 169 megapixels.
  huge = tmp_path / "huge.png"
  Image.new("1", (13_000, 13_000)).save(huge)
  small = tmp_path / "small.png"
  Image.new("RGB", (30, 20), (255, 0, 0)).save(small)

  def no_decoding(self, *args):
    raise AssertionError(f"decoded {self.size}")

  with monkeypatch.context() as patch:
    patch.setattr(Image.Image, "load", no_decoding)
    patch.setattr(getattr(Image, "core"), "decoder", no_decoding, raising=False)
    with pytest.raises(ImageReadError, match=r"huge\.png: 13000 x 13000 = 169,000,000 pixels is "
                                             r"over the limit of 50,000,000 "
                                             r"\(config\.max_image_pixels\)"):
      ImageProcessor()(huge)
    with pytest.raises(ImageReadError, match=r"small\.png: 30 x 20 = 600 pixels is over the "
                                             r"limit of 599"):
      ImageProcessor(max_pixels=599)(small)
  assert ImageProcessor(max_pixels=600)(small).shape == (224, 224, 3)
  assert ImageProcessor.from_checkpoint(tmp_path, max_pixels=600).max_pixels == 600
