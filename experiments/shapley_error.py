"""Error of the Monte Carlo Shapley estimator against exact Shapley values on real batches.

The games are those of training (METHOD §4): the alignment vectors of the first training
batches of a run (k = config.batch_size players; 16 in the main config, where the 2^16
coalitions can still be enumerated), in both context-text directions. Each batch's exact
values (``shapley.exact_shapley``) are compared with ``shapley.mc_shapley`` at each M, over
several permutation keys. Per estimate:

  rel_rmse        ||phi_hat - phi|| / ||phi||   (Frobenius norm over the k x k games)
  max_abs         max |phi_hat - phi|
  loss_diff       L(phi_hat) - L(phi), L the direction's contrastive loss (tau_c, groups);
                  its mean is the bias of the loss training sees
  loss_abs        |L(phi_hat) - L(phi)|
  loss_rel        loss_abs / L(phi)
  argmax_agree    share of anchors j with argmax_i phi_hat_ij = argmax_i phi_ij
  seconds         one jitted mc_shapley call (CPU wall time, dispatch included)

The model is the one training starts from (pretrained encoder, projection heads initialised
from config.seed, exactly as ``train.train_and_evaluate`` does), or with --workdir the best
checkpoint of a run, whose config then comes from its results.json (or, for a run still
training, from beside that checkpoint). The vectors come from ``ShapCA.encode`` without
dropout. Exact values are float32 sums over the 2^k coalitions.

  python experiments/shapley_error.py --json results/msens_t17_init.json
  python experiments/shapley_error.py --workdir /path/to/run --json results/msens_t17_best.json
  python experiments/shapley_error.py --config.align.tau_u=0.05 (any config key; not with
      --workdir)
"""

import dataclasses
import functools
import json
import os
import pathlib
import statistics
import time
from typing import Any, Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np

from shapca_jax import checkpoint, losses, shapley, steps, train
from shapca_jax.config import default_config
from shapca_jax.models.shapca import ShapCA

EXPERIMENTS = pathlib.Path(__file__).resolve().parent
# direction name -> (players, anchors), as losses.alignment_loss pairs them.
DIRECTIONS = {"c2t": ("context_vec", "text_vec"), "t2c": ("text_vec", "context_vec")}
METRICS = ("rel_rmse", "max_abs", "loss_diff", "loss_abs", "loss_rel", "argmax_agree", "seconds")


@dataclasses.dataclass
class Game:
  """One direction of one batch: the similarities, their exact values and exact loss."""
  batch: int
  direction: str
  sim: np.ndarray          # [k, k], players on axis 0
  players: np.ndarray      # [k, d] player vectors (the mean_embedding utility needs them)
  valid: np.ndarray        # [k] bool
  same_group: np.ndarray   # [k] image groups
  exact: np.ndarray        # [k, k]
  exact_loss: float
  exact_seconds: float     # one jitted exact_shapley call (the first includes compilation)


def run_config(workdir: pathlib.Path) -> tuple[ml_collections.ConfigDict, str]:
  """The config of the run in ``workdir`` over today's defaults, and which params are used.

  A finished run's config comes from its results.json; a run still training has it beside
  its best checkpoint.
  """
  results = workdir / train.RESULTS_FILE
  if results.is_file():
    flat = checkpoint.flatten_config(json.loads(results.read_text())["config"])
    what = f"best checkpoint of the finished run {workdir}"
  else:
    meta = checkpoint.best_metadata(workdir)
    flat = meta["config"]
    what = (f"best checkpoint so far of {workdir} (step {meta['step']}, dev F1 "
            f"{meta['metrics']['f1']:.4f}; run not finished)")
  config = default_config()
  config.update_from_flattened_dict(flat)
  return config, what


def game_settings(config: ml_collections.ConfigDict) -> losses.AlignmentConfig:
  """The Shapley settings of ``config.align`` (utility, tau_u, tau_c, antithetic), also for a
  run trained without Shapley alignment (align.kind "none" or "infonce")."""
  align = ml_collections.ConfigDict(config.align.to_dict())
  align.kind = "shapley"
  return steps.alignment_config(align)


def model_and_params(config: ml_collections.ConfigDict, data: train.Data):
  """The model and the params its training starts from, as ``train.train_and_evaluate``
  makes them."""
  model, pretrained = train.build_model(config, data.vocab_size)
  init_rng, _ = jax.random.split(jax.random.key(config.seed))
  return model, train.init_params(model, pretrained, data.train.batch(0), init_rng)


def alignment_vectors(config: ml_collections.ConfigDict, data_workdir: pathlib.Path,
                      num_batches: int, run_workdir: pathlib.Path | None = None) -> list[dict]:
  """Text and context vectors of the first ``num_batches`` training batches of the run.

  The params are those training starts from or, with ``run_workdir``, its best checkpoint.
  Each item holds ``text_vec``, ``context_vec`` [k, d_a] and the batch's ``valid`` and
  ``image_group`` [k], as numpy arrays.
  """
  if not config.use_context:
    raise ValueError("config.use_context=False: there are no context vectors to align")
  data = train.build_data(config, data_workdir)
  model, params = model_and_params(config, data)
  if run_workdir is not None:
    params = checkpoint.restore_best(run_workdir, params)
  encode = jax.jit(functools.partial(model.apply, method=ShapCA.encode, deterministic=True))
  out = []
  for index in range(min(num_batches, data.train.report.batches_per_epoch)):
    batch = data.train.batch(index)
    vectors = jax.device_get(encode({"params": params}, batch))
    out.append({"text_vec": np.asarray(vectors["text_vec"], np.float32),
                "context_vec": np.asarray(vectors["context_vec"], np.float32),
                "valid": np.asarray(batch["valid"]), "image_group": np.asarray(batch["image_group"])})
  return out


def make_games(vectors: Sequence[dict], align: losses.AlignmentConfig) -> list[Game]:
  """Both directions of every batch with their exact Shapley values and exact loss."""
  games = []
  for index, batch in enumerate(vectors):
    for direction, (player_key, anchor_key) in DIRECTIONS.items():
      players = jnp.asarray(batch[player_key])
      sim = shapley.cosine_similarity(players, jnp.asarray(batch[anchor_key]))
      valid = jnp.asarray(batch["valid"])
      began = time.perf_counter()
      exact = jax.block_until_ready(shapley.exact_shapley(
          sim, utility=align.utility, tau=align.tau_u, players=players, player_mask=valid))
      seconds = time.perf_counter() - began
      loss = losses.contrastive_loss(exact, align.tau_c, jnp.asarray(batch["image_group"]), valid)
      games.append(Game(index, direction, np.asarray(sim), batch[player_key], batch["valid"],
                        batch["image_group"], np.asarray(exact), float(loss), seconds))
  return games


def estimate_errors(estimate: np.ndarray, game: Game, tau_c: float) -> dict[str, float]:
  """The error metrics of one estimate of ``game`` (all but ``seconds``)."""
  estimate, exact = np.asarray(estimate, np.float64), np.asarray(game.exact, np.float64)
  valid = np.asarray(game.valid, bool)
  difference = estimate - exact
  loss = float(losses.contrastive_loss(jnp.asarray(estimate, jnp.float32), tau_c,
                                       jnp.asarray(game.same_group), jnp.asarray(valid)))
  # Invalid players never win an argmax; invalid anchors are not counted.
  masked = lambda phi: np.where(valid[:, None], phi, -np.inf)  # noqa: E731
  agree = np.argmax(masked(estimate), axis=0) == np.argmax(masked(exact), axis=0)
  return {"rel_rmse": float(np.linalg.norm(difference) / np.linalg.norm(exact)),
          "max_abs": float(np.max(np.abs(difference))),
          "loss_diff": loss - game.exact_loss,
          "loss_abs": abs(loss - game.exact_loss),
          "loss_rel": abs(loss - game.exact_loss) / abs(game.exact_loss),
          "argmax_agree": float(np.mean(agree[valid]))}


def measure(games: Sequence[Game], align: losses.AlignmentConfig, permutations: Sequence[int],
            antithetic: Sequence[bool], num_keys: int, seed: int = 0) -> list[dict[str, Any]]:
  """One record per (antithetic, direction, M, game, key): the metrics of that estimate.

  Every setting sees the same keys (common random numbers), so differences between settings
  are not key noise.
  """
  estimator = functools.partial(shapley.mc_shapley, utility=align.utility, tau=align.tau_u)
  records = []
  for game in games:
    keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), game.batch), num_keys)
    sim, players, valid = (jnp.asarray(x) for x in (game.sim, game.players, game.valid))
    for anti in antithetic:
      for m in permutations:
        run = functools.partial(estimator, sim, num_permutations=m, antithetic=anti,
                                players=players, player_mask=valid)
        jax.block_until_ready(run(keys[0]))  # compile outside the timings
        for r in range(num_keys):
          began = time.perf_counter()
          phi = jax.block_until_ready(run(keys[r]))
          seconds = time.perf_counter() - began
          records.append({"antithetic": anti, "direction": game.direction, "M": m,
                          "batch": game.batch, "key": r, "seconds": seconds,
                          **estimate_errors(np.asarray(phi), game, align.tau_c)})
  return records


def summarise(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """Mean (and sample std) of each metric per (antithetic, direction, M), in record order."""
  groups: dict[tuple, list[dict]] = {}
  for record in records:
    groups.setdefault((record["antithetic"], record["direction"], record["M"]), []).append(record)
  rows = []
  for (anti, direction, m), members in groups.items():
    row = {"antithetic": anti, "direction": direction, "M": m, "n": len(members)}
    for metric in METRICS:
      values = [r[metric] for r in members]
      row[metric] = statistics.fmean(values)
      row[metric + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    row["seconds"] = statistics.median(r["seconds"] for r in members)  # robust to load spikes
    rows.append(row)
  return rows


def game_summary(games: Sequence[Game]) -> dict[str, dict[str, float]]:
  """Per direction: the similarity spread and exact loss, which set how hard the games are."""
  out = {}
  for direction in DIRECTIONS:
    mine = [g for g in games if g.direction == direction]
    sims = np.stack([g.sim for g in mine])
    off_diagonal = sims[:, ~np.eye(sims.shape[1], dtype=bool)]
    paired = [np.mean(np.argmax(g.exact, axis=0) == np.arange(len(g.exact))) for g in mine]
    out[direction] = {"sim_paired_mean": float(np.mean(np.diagonal(sims, axis1=1, axis2=2))),
                      "sim_other_mean": float(np.mean(off_diagonal)),
                      "sim_other_std": float(np.std(off_diagonal)),
                      "phi_norm_mean": float(np.mean([np.linalg.norm(g.exact) for g in mine])),
                      "exact_loss_mean": float(np.mean([g.exact_loss for g in mine])),
                      "exact_top1_is_pair": float(np.mean(paired)),
                      "exact_seconds_median": statistics.median(g.exact_seconds for g in mine)}
  return out


def table(rows: Sequence[dict[str, Any]]) -> str:
  lines = ["| antithetic | direction | M | rel. RMSE | rel. RMSE x sqrt(M) | max abs err | "
           "loss bias | loss abs err | loss rel err | argmax agrees | ms / estimate |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(
        f"| {'on' if r['antithetic'] else 'off'} | {r['direction']} | {r['M']} | "
        f"{r['rel_rmse']:.4f} | {r['rel_rmse'] * r['M'] ** 0.5:.3f} | {r['max_abs']:.2e} | "
        f"{r['loss_diff']:+.1e} | {r['loss_abs']:.2e} | {r['loss_rel']:.2e} | "
        f"{r['argmax_agree']:.3f} | "
        f"{1e3 * r['seconds']:.2f} |")
  return "\n".join(lines)


def game_table(summary: dict[str, dict[str, float]]) -> str:
  lines = ["| direction | mean cos (pair) | mean cos (others) +- std | mean norm phi | exact loss | "
           "exact argmax = pair | ms / exact |", "|---|---|---|---|---|---|---|"]
  for direction, s in summary.items():
    lines.append(f"| {direction} | {s['sim_paired_mean']:.4f} | {s['sim_other_mean']:.4f} +- "
                 f"{s['sim_other_std']:.4f} | {s['phi_norm_mean']:.4f} | "
                 f"{s['exact_loss_mean']:.4f} | {s['exact_top1_is_pair']:.3f} | "
                 f"{1e3 * s['exact_seconds_median']:.1f} |")
  return "\n".join(lines)


def _int_list(text: str) -> list[int]:
  return [int(x) for x in text.split(",") if x.strip()]


_CONFIG = config_flags.DEFINE_config_file(
    "config", str(EXPERIMENTS / "configs" / "twitter17.py"),
    "Experiment config (ignored with --workdir, which uses the run's own config).")
_WORKDIR = flags.DEFINE_string("workdir", None, "A finished training run: use its best checkpoint.")
_DATA_WORKDIR = flags.DEFINE_string("data_workdir", "workdirs/shapley_error",
                                    "Where the TFDS records of the data are prepared (once).")
_BATCHES = flags.DEFINE_integer("batches", 20, "The first this many training batches.")
_KEYS = flags.DEFINE_integer("keys", 5, "Permutation keys per game and setting.")
_PERMUTATIONS = flags.DEFINE_string("permutations", "1,4,16,64,256", "Values of M.")
_ANTITHETIC = flags.DEFINE_enum("antithetic", "both", ["both", "config"],
                                "both: antithetic on and off; config: the config's setting.")
_JSON = flags.DEFINE_string("json", None, "Write settings, game summary and rows here.")


def main(argv):
  del argv
  run_workdir = pathlib.Path(_WORKDIR.value) if _WORKDIR.value else None
  if run_workdir:
    config, model = run_config(run_workdir)
  else:
    config, model = _CONFIG.value, f"as initialised for training (seed {_CONFIG.value.seed})"
  align = game_settings(config)
  antithetic = [align.antithetic, not align.antithetic] if _ANTITHETIC.value == "both" else [
      align.antithetic]
  began = time.time()
  vectors = alignment_vectors(config, pathlib.Path(_DATA_WORKDIR.value), _BATCHES.value,
                              run_workdir)
  games = make_games(vectors, align)
  records = measure(games, align, _int_list(_PERMUTATIONS.value), antithetic, _KEYS.value)
  rows, summary = summarise(records), game_summary(games)
  print(f"model: {model}", game_table(summary), "", table(rows), sep="\n")
  if _JSON.value:
    path = pathlib.Path(_JSON.value)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "model": model,
        "k": int(games[0].sim.shape[0]), "batches": len(vectors), "keys": _KEYS.value,
        "align": dataclasses.asdict(align), "games": summary, "rows": rows,
        "wall_seconds": round(time.time() - began, 1),
        "load_average": list(os.getloadavg())}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
