"""The named experiment suites: which runs answer which question (docs/results/PROTOCOL.md).

A suite is a list of rows; a row is a dataset, config overrides on top of that dataset's
experiment config (experiments/configs/) and the seeds to run. `comparisons` name the
(row, reference) pairs whose paired test-F1 difference the report shows with a bootstrap
interval. Run one with `python experiments/suite.py run SUITE`.
"""

import dataclasses
from typing import Any

# The training script of each dataset (experiments/train_<name>.py).
SCRIPTS = {"twitter2015": "train_twitter15.py", "twitter2017": "train_twitter17.py",
           "mnre": "train_mnre.py", "jmere": "train_mjere.py"}


# The transformers token-classification recipe (a baseline, not our model): plain flags.
RECIPE = "baselines/hf_token_classification.py"


@dataclasses.dataclass(frozen=True)
class Row:
  """One setting of a suite. ``same_as`` ("suite/row") names a row of another suite with the
  same dataset and overrides: its recorded runs are this row's, not trained twice. ``script``
  (a path under experiments/) trains the row instead of the dataset's training script: a
  baseline that takes plain ``--key=value`` flags, ``--seed`` and ``--workdir``, and writes
  the same results files."""
  name: str
  overrides: dict[str, Any]
  seeds: tuple[int, ...]
  dataset: str = "twitter2017"
  same_as: str = ""
  script: str = ""


@dataclasses.dataclass(frozen=True)
class Suite:
  name: str
  question: str
  rows: tuple[Row, ...]
  comparisons: tuple[tuple[str, str], ...] = ()
  # ((a, b), (c, d)): does a - b differ from c - d? The report bootstraps (a - b) - (c - d).
  interactions: tuple[tuple[tuple[str, str], tuple[str, str]], ...] = ()
  # A suite that chooses a setting: its report shows dev F1 only, and test F1 of the ``chosen``
  # row once one has been chosen (on dev), so that no choice can lean on test.
  dev_only: bool = False
  chosen: str = ""

  def row(self, name: str) -> Row:
    for row in self.rows:
      if row.name == name:
        return row
    raise KeyError(f"suite {self.name!r} has no row {name!r}; rows: {[r.name for r in self.rows]}")


# Twitter-2017 protocol (PROTOCOL.md), fixed by the `protocol-t17` dev-curve study (on a 10-epoch
# schedule the main config's dev F1 peaked at epoch 6 and had not improved by 7): every row
# trains the first 7 epochs of the 10-epoch schedule, scores dev every half epoch and keeps the
# best dev checkpoint.
# The suites keep the fixed 64/128/256 buckets they were started with (the main config has taken
# the bucket ladder since `ladder-t17`), so that the rows of a suite share their batching.
T17 = {"num_epochs": 10, "evals_per_epoch": 2, "stop_after_epochs": 7, "max_buckets": 0}
TEXT_ONLY = {"use_context": False, "align.kind": "none"}
# PGIM contexts put the entity list first; 256 tokens hold 99 % of joint inputs. They are not in
# the embedded data: they come from the shared data folder (relative to the checkout, as suite.py
# runs every row from there), whose Twitter-2017 texts are the embedded ones byte for byte.
PGIM = {"contexts": "pgim", "max_length": 256, "data_dir": "../shared/data"}
SEEDS3 = (0, 1, 2)
# MNRE protocol, fixed by the `protocol-mnre` dev-curve study the same way (dev F1 peaked at
# epoch 2.0 and had not improved by 3.0): the first 3 epochs of the 10-epoch schedule. The MNRE
# config's 288-token length and bucket ladder hold 99 % of MiniCPM-V joint inputs.
MNRE = {"num_epochs": 10, "evals_per_epoch": 2, "stop_after_epochs": 3}

SUITES = {s.name: s for s in (
    Suite(
        "protocol-t17",
        "How many epochs until Twitter-2017 dev F1 stops improving? (main config, one seed, dev "
        "every half epoch, stop after 2 evaluations without a new best)",
        rows=(Row("blip2-shapley", {"num_epochs": 10, "evals_per_epoch": 2,
                                    "early_stop_patience": 2}, seeds=(0,)),)),
    Suite(
        "protocol-mnre",
        "How many epochs until MNRE dev F1 stops improving? (MiniCPM-V contexts, Shapley "
        "alignment, one seed, dev every half epoch, stop after 2 evaluations without a new best)",
        rows=(Row("minicpm-shapley", {"num_epochs": 10, "evals_per_epoch": 2,
                                      "early_stop_patience": 2}, seeds=(0,), dataset="mnre"),)),
    Suite(
        "ablation-mnre",
        "On MNRE (MiniCPM-V contexts), what does each alignment add over none?",
        rows=(Row("minicpm-none", {**MNRE, "align.kind": "none"}, (0, 1), dataset="mnre"),
              Row("minicpm-infonce", {**MNRE, "align.kind": "infonce"}, (0, 1), dataset="mnre"),
              Row("minicpm-shapley", dict(MNRE), (0, 1), dataset="mnre")),
        comparisons=(("minicpm-infonce", "minicpm-none"), ("minicpm-shapley", "minicpm-none"),
                     ("minicpm-shapley", "minicpm-infonce"))),
    Suite(
        "ablation-t17",
        "On Twitter-2017, what do contexts and each alignment add over text only?",
        rows=(Row("text-only", {**T17, **TEXT_ONLY}, SEEDS3),
              Row("blip2-none", {**T17, "align.kind": "none"}, SEEDS3),
              Row("blip2-infonce", {**T17, "align.kind": "infonce"}, SEEDS3),
              Row("blip2-shapley", dict(T17), SEEDS3),
              Row("pgim-none", {**T17, **PGIM, "align.kind": "none"}, (0, 1)),
              Row("pgim-shapley", {**T17, **PGIM}, (0, 1)),
              # The recipe users would pick instead, on the same protocol (BLIP-2 contexts).
              Row("hf-recipe", {"epochs": 10, "stop_after_epochs": 7, "evals_per_epoch": 2},
                  SEEDS3, script=RECIPE)),
        comparisons=(("blip2-none", "text-only"), ("blip2-infonce", "blip2-none"),
                     ("blip2-shapley", "blip2-none"), ("blip2-shapley", "blip2-infonce"),
                     ("pgim-none", "blip2-none"), ("pgim-shapley", "blip2-shapley"),
                     ("pgim-shapley", "pgim-none"), ("blip2-shapley", "hf-recipe")),
        # Does what PGIM contexts add depend on the alignment?
        interactions=((("pgim-shapley", "blip2-shapley"), ("pgim-none", "blip2-none")),)),
    Suite(
        "align-sweep-t17",
        "Which alignment setting does Twitter-2017 dev F1 prefer, and does any keep a "
        "non-trivial alignment signal? (one seed; defaults chosen on dev only)",
        rows=(Row("joint-0.1", dict(T17), (0,), same_as="ablation-t17/blip2-shapley"),
              Row("joint-1.0", {**T17, "align.lambda_ct": 1.0}, (0,)),
              Row("separate-0.1", {**T17, "align.views": "separate"}, (0,)),
              Row("separate-1.0", {**T17, "align.views": "separate", "align.lambda_ct": 1.0},
                  (0,)),
              # Then the utility and the loss at the better view (only that view's rows run).
              Row("joint-logsumexp", {**T17, "align.utility": "logsumexp"}, (0,)),
              Row("joint-infonce", {**T17, "align.kind": "infonce"}, (0,),
                  same_as="ablation-t17/blip2-infonce"),
              Row("separate-logsumexp", {**T17, "align.views": "separate",
                                         "align.utility": "logsumexp"}, (0,)),
              Row("separate-infonce", {**T17, "align.views": "separate", "align.kind": "infonce"},
                  (0,)),
              Row("none", {**T17, "align.kind": "none"}, (0,), same_as="ablation-t17/blip2-none")),
        comparisons=(("joint-0.1", "none"), ("separate-0.1", "none"), ("separate-0.1", "joint-0.1"),
                     ("joint-1.0", "joint-0.1"), ("separate-1.0", "separate-0.1"),
                     ("separate-logsumexp", "separate-0.1"), ("separate-infonce", "separate-0.1"),
                     ("separate-logsumexp", "joint-0.1")),
        # docs/alignment.md's rule: no Shapley setting beat the defaults by more than 0.3 dev F1.
        dev_only=True, chosen="joint-0.1"),
    Suite(
        "msens-t17",
        "How do Twitter-2017 F1 and step time depend on the number M of Monte Carlo "
        "permutations? (the estimator's error against exact Shapley is msens-t17-estimator.md; "
        "the step time per M, timed on a quiet CPU, is cost-t17.md: this table's steps/s come "
        "from runs that shared the CPU)",
        rows=(Row("m1", {**T17, "align.num_permutations": 1}, (0, 1)),
              Row("m4", {**T17, "align.num_permutations": 4}, (0, 1)),
              Row("m32", dict(T17), (0, 1), same_as="ablation-t17/blip2-shapley")),
        comparisons=(("m1", "m32"), ("m4", "m32"))),
    Suite(
        "ladder-t17",
        "Does the bucket ladder (max_buckets=4: less padding, a different grouping of examples "
        "into batches, so other in-batch negatives) change the main config's Twitter-2017 F1?",
        rows=(Row("fixed", dict(T17), SEEDS3, same_as="ablation-t17/blip2-shapley"),
              Row("ladder-4", {**T17, "max_buckets": 4}, SEEDS3)),
        comparisons=(("ladder-4", "fixed"),)),
)}
