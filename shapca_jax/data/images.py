"""Image files -> normalised float32 NHWC arrays for the CLIP/ViT encoders.

`ImageProcessor` reproduces transformers' PIL image processors (`CLIPImageProcessorPil`,
`ViTImageProcessorPil`, which `CLIPImageProcessor` falls back to without torchvision)
bit for bit: EXIF orientation, RGB conversion (transparency composited onto white), resize
with PIL and the checkpoint's resampling filter, center crop, rescale, normalise. Its
settings come from the checkpoint's `preprocessor_config.json`; without one, the OpenAI
CLIP settings apply. The torchvision backend of transformers resizes with a slightly
different kernel, so its output differs from this one by a few 1/255 steps.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from shapca_jax.data.errors import DataFormatError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, the code stored in preprocessor configs
MISSING_IMAGE_MODES = ("error", "blank")
# Larger images are refused from their header, before decoding: Pillow's own limit (179
# megapixels, a warning from 89) would let a 13,000 x 13,000 PNG take almost 1 GB.
DEFAULT_MAX_PIXELS = 50_000_000

# Preprocessor switches we do not implement; a config that turns one on is rejected.
_UNSUPPORTED_SWITCHES = ("do_pad", "do_reduce_labels", "do_flip_channel_order")


class ImageReadError(DataFormatError):
  """An image file is missing, unreadable or not an image."""


@dataclasses.dataclass(frozen=True)
class ImageProcessor:
  """Settings of a transformers image processor; call it on a file path.

  Exactly one of `shortest_edge` (resize keeping the aspect ratio) or `resize_hw`
  (resize to a fixed height and width) is set when `do_resize` is true. Files of more than
  `max_pixels` pixels are refused (`ImageReadError`) before they are decoded.
  """
  do_convert_rgb: bool = True
  do_resize: bool = True
  shortest_edge: int | None = 224
  resize_hw: tuple[int, int] | None = None
  resample: int = BICUBIC
  do_center_crop: bool = True
  crop_hw: tuple[int, int] = (224, 224)
  do_rescale: bool = True
  rescale_factor: float = 1 / 255
  do_normalize: bool = True
  image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
  image_std: tuple[float, float, float] = OPENAI_CLIP_STD
  max_pixels: int = DEFAULT_MAX_PIXELS

  def __post_init__(self):
    if self.do_resize and (self.shortest_edge is None) == (self.resize_hw is None):
      raise ValueError("set exactly one of shortest_edge and resize_hw when do_resize is true")

  @classmethod
  def from_checkpoint(cls, folder: str | pathlib.Path,
                      max_pixels: int = DEFAULT_MAX_PIXELS) -> "ImageProcessor":
    """Reads `preprocessor_config.json` from a checkpoint folder (CLIP defaults when absent)."""
    path = pathlib.Path(folder) / "preprocessor_config.json"
    if not path.is_file():
      if not pathlib.Path(folder).is_dir():
        raise FileNotFoundError(f"{folder}: checkpoint folder not found")
      return cls(max_pixels=max_pixels)
    try:
      values = json.loads(path.read_text())
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e
    return dataclasses.replace(cls.from_dict(values, str(path)), max_pixels=max_pixels)

  @classmethod
  def from_dict(cls, values: Mapping[str, Any],
                source: str = "preprocessor config") -> "ImageProcessor":
    """Builds the processor from a transformers preprocessor config dict."""
    for key in _UNSUPPORTED_SWITCHES:
      if values.get(key):
        raise ValueError(f"{source}: {key}=true is not supported")
    kind = values.get("image_processor_type") or values.get("feature_extractor_type") or "CLIP"
    fields: dict[str, Any] = {}
    for key in ("do_convert_rgb", "do_resize", "resample", "do_center_crop", "do_rescale",
                "rescale_factor", "do_normalize"):
      if values.get(key) is not None:
        fields[key] = values[key]
    for key in ("image_mean", "image_std"):
      if values.get(key) is not None:
        fields[key] = _per_channel(values[key], key, source)
    if "size" in values:
      # transformers reads a bare int as the shortest edge for CLIP, as a square otherwise.
      shortest, hw = _size(values["size"], square_int=not kind.startswith("CLIP"),
                           key="size", source=source)
      fields.update(shortest_edge=shortest, resize_hw=hw)
    if values.get("crop_size") is not None:
      fields["crop_hw"] = _size(values["crop_size"], square_int=True, key="crop_size",
                                source=source)[1]
    try:
      return cls(**fields)
    except (TypeError, ValueError) as e:
      raise ValueError(f"{source}: {e}") from e

  @property
  def output_hw(self) -> tuple[int, int] | None:
    """Height and width of every output, or None when it depends on the input's aspect."""
    if self.do_center_crop:
      return self.crop_hw
    if self.do_resize and self.resize_hw is not None:
      return self.resize_hw
    return None

  def __call__(self, path: str | pathlib.Path) -> np.ndarray:
    """Decodes and preprocesses one image file into float32 [H, W, 3].

    Raises:
      ImageReadError: naming the file when it is missing, truncated or not an image.
    """
    return self.preprocess(_decode(path, self.max_pixels))

  def preprocess(self, image: Image.Image) -> np.ndarray:
    """Preprocesses a decoded PIL image into float32 [H, W, C]."""
    if self.do_convert_rgb:
      image = _to_rgb(image)
    if self.do_resize:
      height, width = self.resize_hw or _shortest_edge_size(image.height, image.width,
                                                             self.shortest_edge)
      image = image.resize((width, height), resample=self.resample)
    pixels = np.asarray(image)
    if pixels.ndim == 2:
      pixels = pixels[:, :, None]
    if self.do_center_crop:
      pixels = _center_crop(pixels, self.crop_hw)
    # Same arithmetic as transformers: rescale in float64, then float32 normalisation.
    out = pixels.astype(np.float64) * self.rescale_factor if self.do_rescale else pixels
    out = out.astype(np.float32)
    if self.do_normalize:
      out = (out - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
    return out


def _per_channel(value: Any, key: str, source: str) -> tuple[float, float, float]:
  if isinstance(value, (int, float)):
    return (float(value),) * 3
  if isinstance(value, list) and len(value) == 3:
    return tuple(float(v) for v in value)
  raise ValueError(f"{source}: {key}={value!r} must be a number or a list of 3 numbers")


def _size(value: Any, square_int: bool, key: str,
          source: str) -> tuple[int | None, tuple[int, int] | None]:
  """(shortest_edge, (height, width)) from a transformers size value; one of them is None."""
  if isinstance(value, int):
    return (None, (value, value)) if square_int else (value, None)
  if isinstance(value, dict) and set(value) == {"shortest_edge"}:
    return value["shortest_edge"], None
  if isinstance(value, dict) and set(value) == {"height", "width"}:
    return None, (value["height"], value["width"])
  raise ValueError(f"{source}: {key}={value!r} is not supported; expected an int, "
                   "{'shortest_edge': n} or {'height': h, 'width': w}")


def _shortest_edge_size(height: int, width: int, size: int) -> tuple[int, int]:
  """transformers' `get_resize_output_image_size(default_to_square=False)`."""
  short, long = (width, height) if width <= height else (height, width)
  new_short, new_long = size, int(size * long / short)
  return (new_long, new_short) if width <= height else (new_short, new_long)


def _center_crop(pixels: np.ndarray, crop_hw: tuple[int, int]) -> np.ndarray:
  """transformers' `center_crop`: zero-pads images smaller than the crop."""
  height, width = pixels.shape[:2]
  crop_h, crop_w = crop_hw
  if height < crop_h or width < crop_w:
    padded = np.zeros((max(height, crop_h), max(width, crop_w), pixels.shape[2]), pixels.dtype)
    top, left = -(-(padded.shape[0] - height) // 2), -(-(padded.shape[1] - width) // 2)
    padded[top:top + height, left:left + width] = pixels
    pixels, height, width = padded, padded.shape[0], padded.shape[1]
  top, left = (height - crop_h) // 2, (width - crop_w) // 2
  return pixels[top:top + crop_h, left:left + crop_w]


def _to_rgb(image: Image.Image) -> Image.Image:
  """RGB, compositing any transparency onto white (transformers' `convert_to_rgb`)."""
  if "A" in image.getbands() or image.info.get("transparency") is not None:
    image = image.convert("RGBA")
    background = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, image).convert("RGB")
  return image.convert("RGB")


def _decode(path: str | pathlib.Path, max_pixels: int) -> Image.Image:
  """Opens and fully decodes an image of at most `max_pixels` pixels, applying its EXIF
  orientation."""
  try:
    with Image.open(path) as image:  # reads the header only
      if image.width * image.height > max_pixels:
        raise ImageReadError(f"{path}: {image.width} x {image.height} = "
                             f"{image.width * image.height:,} pixels is over the limit of "
                             f"{max_pixels:,} (config.max_image_pixels); refusing to decode it")
      image.load()  # Image.open is lazy: truncated data only fails here
      return ImageOps.exif_transpose(image)
  except ImageReadError:
    raise
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise ImageReadError(f"{path}: cannot read the image ({e})") from e


def load_images(paths: Sequence[str | pathlib.Path], processor: ImageProcessor,
                missing_image: str = "error") -> tuple[np.ndarray, int]:
  """Preprocesses image files into one float32 batch [B, H, W, 3].

  Args:
    paths: image files.
    processor: the checkpoint's preprocessing.
    missing_image: "error" raises `ImageReadError` naming the first unreadable file; "blank"
      puts an all-zero image in its place (zero after normalisation, i.e. the dataset-mean
      colour) and counts it.

  Returns:
    (images, number of blank images used).
  """
  if missing_image not in MISSING_IMAGE_MODES:
    raise ValueError(f"missing_image={missing_image!r} must be one of {MISSING_IMAGE_MODES}")
  out_hw = processor.output_hw
  if out_hw is None:
    raise ValueError("the processor's output size depends on the image (no center crop, "
                     "shortest-edge resize), so images cannot be stacked into a batch")
  batch = np.zeros((len(paths), *out_hw, 3), np.float32)
  num_blank = 0
  for i, path in enumerate(paths):
    try:
      batch[i] = processor(path)
    except ImageReadError as e:
      if missing_image == "error":
        raise
      logging.warning("%s; using a blank image", e)
      num_blank += 1
  return batch, num_blank
