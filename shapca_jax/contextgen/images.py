"""Which images to describe, and their bytes ready for a multimodal model.

An image is named by its file name as the data set spells it (`twitter_19_31_16_6.jpg`); the
data layer joins contexts on that id with or without the extension. Inputs are either every
image under a folder, or a data set's image ids looked up in a folder.
"""

import dataclasses
import io
import pathlib
from collections.abc import Iterable, Sequence

from PIL import Image

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"})
# Formats that chat-completions servers (OpenAI, vLLM, SGLang) accept as they are; anything
# else PIL can read is re-encoded as PNG.
_PASSTHROUGH_MIME = {"JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png",
                     "WEBP": "image/webp", "GIF": "image/gif"}


class ImageError(Exception):
  """An image file is missing or cannot be decoded; the message is the reason (without the path,
  so that one reason groups many images)."""


@dataclasses.dataclass(frozen=True)
class ImageRef:
  """One image to describe: its id (file name) and where its file should be."""
  image_id: str
  path: pathlib.Path


@dataclasses.dataclass(frozen=True)
class LoadedImage:
  """A decodable image: the bytes to send and their MIME type."""
  image_id: str
  data: bytes
  mime: str


def index_folder(folder: str | pathlib.Path) -> dict[str, pathlib.Path]:
  """Maps file name -> path for every image under `folder`, searched recursively.

  Raises ValueError when the folder is missing, holds no image, or holds two images with one
  name in different subfolders (their contexts would share an id).
  """
  folder = pathlib.Path(folder)
  if not folder.is_dir():
    raise ValueError(f"image folder {folder} does not exist")
  index: dict[str, pathlib.Path] = {}
  for path in sorted(folder.rglob("*")):
    if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
      continue
    if path.name in index:
      raise ValueError(f"two images named {path.name!r} under {folder}: {index[path.name]} and "
                       f"{path}; an image id must name one file")
    index[path.name] = path
  if not index:
    raise ValueError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folder}")
  return index


def refs_from_folder(folder: str | pathlib.Path) -> list[ImageRef]:
  """Every image under `folder`, ordered by id."""
  return [ImageRef(image_id, path) for image_id, path in sorted(index_folder(folder).items())]


def refs_from_ids(image_ids: Iterable[str], folder: str | pathlib.Path) -> list[ImageRef]:
  """The given ids (first occurrence order, repeats dropped) looked up under `folder`.

  An id may lack its extension (Twitter-2015/2017 spell `16_05_01_10` for `16_05_01_10.jpg`);
  the ref then carries the file's full name. An id with no file keeps a path that does not
  exist, so that generation records it as a failure instead of skipping it.
  """
  folder = pathlib.Path(folder)
  index = index_folder(folder)
  by_stem: dict[str, list[str]] = {}
  for name in index:
    by_stem.setdefault(pathlib.PurePath(name).stem, []).append(name)
  refs, seen = [], set()
  for image_id in image_ids:
    if image_id in index:
      ref = ImageRef(image_id, index[image_id])
    elif len(by_stem.get(image_id, [])) == 1:
      name = by_stem[image_id][0]
      ref = ImageRef(name, index[name])
    elif image_id in by_stem:
      raise ValueError(f"image id {image_id!r} matches several files under {folder}: "
                       f"{sorted(by_stem[image_id])}")
    else:
      ref = ImageRef(image_id, folder / image_id)
    if ref.image_id not in seen:
      seen.add(ref.image_id)
      refs.append(ref)
  return refs


def refs_from_dataset(dataset: str, split: str, data_dir: str | pathlib.Path,
                      image_folder: str | pathlib.Path) -> list[ImageRef]:
  """The image ids of one data set split (through the data readers), found under `image_folder`."""
  # Imported here: the data readers pull in the whole data layer, which a folder run never needs.
  from shapca_jax.data import readers  # pylint: disable=g-import-not-at-top
  examples = readers.read_split(dataset, split, data_dir)
  return refs_from_ids((example.image_id for example in examples), image_folder)


def check_unique(refs: Sequence[ImageRef]) -> None:
  """Raises ValueError naming the first id that occurs twice in `refs`."""
  seen: dict[str, pathlib.Path] = {}
  for ref in refs:
    if ref.image_id in seen:
      raise ValueError(f"image id {ref.image_id!r} occurs twice in the input "
                       f"({seen[ref.image_id]} and {ref.path})")
    seen[ref.image_id] = ref.path


def load_image(ref: ImageRef) -> LoadedImage:
  """Reads and fully decodes the image, so a broken file fails here and not at the model.

  Raises ImageError with the reason when the file is missing or cannot be decoded.
  """
  try:
    data = ref.path.read_bytes()
  except FileNotFoundError:
    raise ImageError("image file not found") from None
  except OSError as e:
    raise ImageError(f"cannot read image file: {e.strerror or e}") from None
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()
      mime = _PASSTHROUGH_MIME.get(image.format or "")
      if mime is None:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data, mime = buffer.getvalue(), "image/png"
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise ImageError(f"unreadable image: {type(e).__name__}: {e}") from None
  return LoadedImage(ref.image_id, data, mime)
