"""Export of a run's best checkpoint into a model folder, and loading it without the run."""

import json
import logging
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from shapca_jax import checkpoint, export, train
from shapca_jax import config as config_lib
from shapca_jax.data import images, tokenization
from shapca_jax.data.readers import Example
from shapca_jax.models.bert import BertConfig
from shapca_jax.models.shapca import ShapCA
from shapca_jax.models.vision import VisionConfig
import train_fixtures

TINY_CLIP = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 image_size=32, patch_size=16)
TINY_PREPROCESSOR = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 32},
                     "crop_size": {"height": 32, "width": 32}, "do_center_crop": True}


def write_tiny_clip(folder: pathlib.Path) -> pathlib.Path:
  """A randomly initialised CLIP vision tower saved by transformers, with a 32-pixel processor."""
  import torch
  import transformers
  torch.manual_seed(0)
  transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY_CLIP)).save_pretrained(
      folder, safe_serialization=True)
  (folder / "preprocessor_config.json").write_text(json.dumps(TINY_PREPROCESSOR))
  return folder


def write_finished_run(workdir: pathlib.Path, config, seed: int = 0):
  """A workdir as a finished run leaves it (best checkpoint + results.json), without training.

  The saved params are the pretrained encoder weights and zeros elsewhere, all moved by noise:
  they differ from anything the model would load by itself. Returns them, as the oracle of
  what an export must hold.
  """
  encoder = tokenization.Encoder(train.text_encoder_dir(config), export.data_task(config),
                                 train.input_layout(config))
  model, pretrained = train.build_model(config, encoder.tokenizer.vocab_size)
  shapes = export.param_shapes(model, encoder, export.buckets(config)[0])
  base = {**jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes), **pretrained}
  rng = np.random.default_rng(seed)
  params = jax.tree.map(
      lambda x: np.asarray(x) + rng.normal(0.0, 0.05, x.shape).astype(x.dtype), base)
  scores = {"precision": 0.5, "recall": 0.25, "f1": 1 / 3}
  with checkpoint.TrainCheckpointer(workdir, config.to_dict(), save_every_steps=10) as ckpt:
    ckpt.save_best(7, params, scores)
  (workdir / train.RESULTS_FILE).write_text(json.dumps(
      {"config": config.to_dict(), "best_step": 7, "dev": scores, "test": scores}))
  return params


@pytest.fixture(scope="module")
def encoders(tmp_path_factory, minilm_dir):
  root = tmp_path_factory.mktemp("encoders")
  return (train_fixtures.write_tiny_bert(root / "bert", minilm_dir),
          write_tiny_clip(root / "clip"))


def _config(root: pathlib.Path, bert_dir, clip_dir=None):
  config = train_fixtures.tiny_config(root / "data", bert_dir)
  if clip_dir is not None:
    config.use_image = True
    config.image_encoder = str(clip_dir)
    config.image_dir = str(root / "images")
  return config


@pytest.fixture(scope="module")
def run(tmp_path_factory, encoders):
  """A text-only finished run with its own encoder folder, and the params it saved."""
  root = tmp_path_factory.mktemp("run")
  bert = shutil.copytree(encoders[0], root / "bert")
  config = _config(root, bert)
  saved = write_finished_run(root / "run", config)
  return root, config, saved


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
  root, config, saved = run
  out = tmp_path_factory.mktemp("exported") / "model"
  summary = export.export_run(root / "run", out)
  return out, summary


def test_export_is_self_contained(run, exported):
  root, config, saved = run
  model_dir, summary = exported
  assert summary["best_step"] == 7 and summary["test_f1"] == pytest.approx(1 / 3)
  original_model, _ = train.build_model(config, 30522)
  example = Example("1.jpg", ("Obama", "visits", "Paris", "#G20"), "test",
                    context="a man waves a flag")
  original_pieces = tokenization.Encoder(config.text_encoder, "mner", "joint").pieces([example])

  # Neither the run nor the encoder folder may be needed any more.
  hidden = [(root / name, root / f"hidden_{name}") for name in ("run", "bert")]
  for folder, away in hidden:
    folder.rename(away)
  try:
    loaded = export.load_model(model_dir)
    pieces = loaded.encoder().pieces([example])
  finally:
    for folder, away in hidden:
      away.rename(folder)
  assert loaded.model == original_model
  assert loaded.labels == original_model.labels
  assert loaded.image_processor() is None
  assert jax.tree.structure(loaded.params) == jax.tree.structure(saved)
  equal = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), b), loaded.params, saved)
  assert all(jax.tree.leaves(equal))
  for new, old in zip(pieces[0], original_pieces[0]):
    np.testing.assert_array_equal(new, old)
  info = json.loads((model_dir / export.MODEL_FILE).read_text())
  assert info["scores"]["dev"]["f1"] == pytest.approx(1 / 3)


def test_export_with_an_image_encoder_keeps_its_preprocessing(encoders, tmp_path):
  clip = shutil.copytree(encoders[1], tmp_path / "clip")
  config = _config(tmp_path, encoders[0], clip)
  write_finished_run(tmp_path / "run", config)
  original_model, _ = train.build_model(config, 30522)
  original_processor = images.ImageProcessor.from_checkpoint(clip)
  export.export_run(tmp_path / "run", tmp_path / "model")
  shutil.rmtree(clip)

  loaded = export.load_model(tmp_path / "model")
  assert loaded.model == original_model
  assert loaded.model.vision_config.image_hw == (32, 32)
  assert loaded.image_processor() == original_processor
  assert original_processor.crop_hw == (32, 32)  # the file was read, not the CLIP defaults


def test_unfinished_run_and_existing_folder_are_refused(run, tmp_path):
  workdir = run[0] / "run"
  results = workdir / train.RESULTS_FILE
  results.rename(tmp_path / "results.json")
  try:
    with pytest.raises(export.ExportError, match="results.json not found"):
      export.export_run(workdir, tmp_path / "model")
  finally:
    (tmp_path / "results.json").rename(results)

  (tmp_path / "model").mkdir()
  args = ["--workdir", str(workdir), "--out", str(tmp_path / "model")]
  assert export.main(args) == 2
  assert export.main(args + ["--overwrite"]) == 0
  assert (tmp_path / "model" / export.PARAMS_FILE).is_file()
  assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left


def test_params_that_do_not_fit_the_architecture_are_listed(exported, tmp_path):
  model_dir = shutil.copytree(exported[0], tmp_path / "model")
  path = model_dir / export.PARAMS_FILE
  flat = load_file(str(path))
  del flat["crf/transitions"]
  flat["tagger/emissions/bias"] = np.zeros(3, np.float32)
  save_file(flat, str(path))
  with pytest.raises(export.ExportError) as err:
    export.load_model(model_dir)
  assert "missing crf/transitions" in str(err.value)
  assert "tagger/emissions/bias: stored ((3,), 'float32'), the model needs ((9,)" in str(err.value)


def test_folders_exported_before_align_views_load(exported, tmp_path):
  """Their model.json names the removed field text_context="joint", the same model."""
  model_dir = shutil.copytree(exported[0], tmp_path / "model")
  info = json.loads((model_dir / export.MODEL_FILE).read_text())
  fields = info["architecture"]["fields"]
  assert fields.pop("align_views") == "joint"
  fields["text_context"] = "joint"
  (model_dir / export.MODEL_FILE).write_text(json.dumps(info))
  assert export.load_model(model_dir).model == export.load_model(exported[0]).model


def test_architecture_round_trip():
  model = ShapCA(BertConfig(hidden_size=64, num_attention_heads=4),
                 ("O", "B-PER", "I-PER"), vision_config=VisionConfig.vit(image_size=(64, 32)),
                 fusion_mode="plain", dtype=jnp.bfloat16)
  data = json.loads(json.dumps(export.encode_architecture(model)))
  assert export.decode_architecture(data) == model
  data["__class__"] = "os.system"
  with pytest.raises(export.ExportError, match="expected a shapca_jax class"):
    export.decode_architecture(data)


def test_configs_of_older_runs_get_the_defaults_of_newer_keys(caplog):
  stored = config_lib.default_config().to_dict()
  del stored["pair_dim"], stored["align"]["tau_c"]
  stored["batch_size"] = 7
  with caplog.at_level(logging.WARNING):
    config = export.run_config(stored)
  assert config.batch_size == 7
  assert config.pair_dim == config_lib.default_config().pair_dim
  assert config.align.tau_c == config_lib.default_config().align.tau_c
  assert "['align.tau_c', 'pair_dim']" in caplog.text
