"""validate_config: unknown keys and impossible values fail before any work, naming the key."""

import pytest

from shapca_jax.config import ConfigError, default_config, separate_views, validate_config


def _valid():
  config = default_config()
  config.data_dir = "data"
  return config


def test_defaults_with_a_data_dir_are_valid():
  validate_config(_valid())


@pytest.mark.parametrize("key, value, pattern", [
    ("learning_rate.encoder", -1e-3, "learning_rate.encoder"),
    ("align.num_permutations", 0, "align.num_permutations"),
    ("batch_size", 1, "batch_size"),
    ("align.kind", "cosine", "align.kind"),
    ("warmup_ratio", 1.0, "warmup_ratio"),
    ("fusion.mode", "gated", "fusion.mode"),
    ("align.views", "text_only", r"config.align.views='text_only' is not one of"),
    ("align.directions", "context_image", "use_image"),
    ("use_image", True, "image_encoder"),
    ("data_dir", "", "data_dir"),
    ("pair_dim", 0, "pair_dim"),
    ("dataset", "twitter2016", "dataset"),
    ("dataset", "mnre", "config.task='mner' does not fit config.dataset='mnre'"),
    ("task", "mjere", "config.task='mjere' does not fit config.dataset='twitter2017'"),
    ("mesh.data", 0, "config.mesh.data=0"),
    ("mesh.fsdp", -2, "config.mesh.fsdp=-2"),
    ("mesh.data", 3, r"config.batch_size=16 does not split over config.mesh.data x "
                     r"config.mesh.fsdp = 3 devices"),
    ("max_buckets", -1, r"config.max_buckets=-1 must be an int >= 0"),
    ("bucket_multiple", 0, r"config.bucket_multiple=0 must be an int >= 1"),
    ("bucket_multiple", 256, r"config.bucket_multiple=256 exceeds config.max_length=128"),
])
def test_impossible_values_name_the_key(key, value, pattern):
  config = _valid()
  section, _, leaf = key.rpartition(".")
  (config[section] if section else config)[leaf] = value
  with pytest.raises(ConfigError, match=pattern):
    validate_config(config)


@pytest.mark.parametrize("key", ["tensorboard", "progress_bar", "align.antithetic",
                                 "cpu_threefry"])
def test_switches_must_be_booleans(key):
  # A config read from JSON or a dict is not type-checked by ml_collections on the way in.
  config = _valid().to_dict()
  section, _, leaf = key.rpartition(".")
  (config[section] if section else config)[leaf] = "false"
  with pytest.raises(ConfigError, match=rf"config.{key}='false' must be True or False"):
    validate_config(config)


def test_separate_views_only_when_aligning_with_contexts():
  config = _valid()
  assert not separate_views(config)  # the default is joint
  config.align.views = "separate"
  assert separate_views(config)
  config.align.kind = "none"
  assert not separate_views(config)


def test_unknown_key_is_named():
  config = _valid()
  config.unlock()
  config.align.lamda_ct = 0.3
  with pytest.raises(ConfigError, match="align.lamda_ct"):
    validate_config(config)


def test_alignment_needs_contexts():
  config = _valid()
  config.use_context = False
  with pytest.raises(ConfigError, match="use_context"):
    validate_config(config)
  config.align.kind = "none"
  validate_config(config)


@pytest.mark.parametrize("task, dataset", [("mre", "mnre"), ("mjere", "jmere"),
                                           ("mner", "twitter2015")])
def test_each_task_with_its_dataset_is_valid(task, dataset):
  config = _valid()
  config.task, config.dataset = task, dataset
  validate_config(config)


def test_mesh_sizes():
  config = _valid()
  config.mesh.data, config.mesh.fsdp = 2, 4
  validate_config(config)  # 16 and 64 rows split over 8 devices
  config.eval_batch_size = 60
  with pytest.raises(ConfigError, match="config.eval_batch_size=60"):
    validate_config(config)
  config.mesh.data, config.mesh.fsdp = -1, -1
  with pytest.raises(ConfigError, match="only one of config.mesh.data and config.mesh.fsdp"):
    validate_config(config)
