"""Tests for shapca_jax.wordpair: grid decoding against a local encoder and brute force."""

import collections
import json
import random

import numpy as np
import pytest

from shapca_jax import metrics, wordpair

SIGNATURES = {
    "peer": frozenset({("per", "per")}),
    "member_of": frozenset({("per", "org")}),
    "contain": frozenset({("loc", "loc")}),
    "locate_at": frozenset({("org", "loc")}),
    "alternate_names": frozenset({("per", "per"), ("org", "org")}),
}
VOCAB = wordpair.GridVocab(
    entity_types=("per", "org", "misc", "loc"),
    relations=tuple(SIGNATURES),
    signatures=SIGNATURES,
    head_follows_tail=frozenset({"contain"}),
)
REL = {name: 5 + i for i, name in enumerate(VOCAB.relations)}
ENT = {name: 1 + i for i, name in enumerate(VOCAB.entity_types)}


def encode(num_words, entities, quintuples, vocab=VOCAB, pad=2):
  """METHOD §1 gold grid, written cell by cell: entities first, then relations."""
  ent = {name: 1 + i for i, name in enumerate(vocab.entity_types)}
  rel = {name: 1 + len(ent) + i for i, name in enumerate(vocab.relations)}
  size = num_words + pad
  grid = np.full((size, size), -1, np.int32)
  for i in range(num_words):
    for j in range(i, num_words):
      grid[i, j] = 0
  for (start, end), entity_type in entities:
    for i in range(start, end):
      for j in range(i, end):
        grid[i, j] = ent[entity_type]
  for (hs, he), _, (ts, te), _, relation in quintuples:
    for a in range(hs, he):
      for p in range(ts, te):
        grid[min(a, p), max(a, p)] = rel[relation]
  return grid


def written_order(earlier, later, relation):
  """The test vocabulary's orientation, stated directly: types first, then `contain` backwards."""
  (_, earlier_type), (_, later_type) = earlier, later
  forward = (earlier_type, later_type) in SIGNATURES[relation]
  backward = (later_type, earlier_type) in SIGNATURES[relation]
  if forward != backward:
    return (earlier, later) if forward else (later, earlier)
  return (later, earlier) if relation == "contain" else (earlier, later)


def quintuple(head, tail, relation):
  return (head[0], head[1], tail[0], tail[1], relation)


def random_representable_example(rng):
  num_words = rng.randint(1, 16)
  entities, position = [], rng.randint(0, 2)
  while position < num_words:
    end = min(num_words, position + rng.randint(1, 3))
    entity_type = rng.choice(VOCAB.entity_types)
    if entities and entities[-1][0][1] == position and entities[-1][1] == entity_type:
      entity_type = "misc" if entity_type != "misc" else "per"
    entities.append(((position, end), entity_type))
    position = end + rng.randint(0, 2)
  quintuples = []
  for i, earlier in enumerate(entities):
    for later in entities[i + 1:]:
      candidates = [r for r, allowed in SIGNATURES.items()
                    if {(earlier[1], later[1]), (later[1], earlier[1])} & allowed]
      if candidates and rng.random() < 0.5:
        relation = rng.choice(candidates)
        quintuples.append(quintuple(*written_order(earlier, later, relation), relation))
  return num_words, entities, quintuples


def test_round_trip_of_random_representable_sentences():
  rng = random.Random(0)
  num_quintuples = 0
  for _ in range(300):
    num_words, entities, quintuples = random_representable_example(rng)
    decoded = wordpair.decode_grid(encode(num_words, entities, quintuples), VOCAB)
    assert decoded.entities == sorted(entities)
    assert decoded.quintuples == sorted(quintuples)
    assert wordpair.unrepresentable(entities, quintuples, VOCAB) == ({}, {})
    num_quintuples += len(quintuples)
  assert num_quintuples > 200


PER_A, PER_B, PER_C = ((0, 1), "per"), ((1, 2), "per"), ((4, 6), "per")
LOC_A, LOC_B, ORG = ((0, 2), "loc"), ((3, 4), "loc"), ((7, 9), "org")


@pytest.mark.parametrize("entities,quintuples,reason,decoded_quintuples", [
    # Two adjacent persons merge into one span (0, 2), whose pair cells are half 0: no relation.
    ([PER_A, PER_B, PER_C], [quintuple(PER_A, PER_C, "peer"), quintuple(PER_B, ORG, "member_of")],
     "adjacent_same_type", []),
    # A person inside a location: the later write wins the diagonal.
    ([((0, 3), "loc"), ((1, 2), "per")], [quintuple(((1, 2), "per"), ORG, "member_of")],
     "overlapping_entities", []),
    # Head and tail overlap: their cells are entity cells.
    ([((0, 3), "per")], [quintuple(((0, 3), "per"), ((0, 3), "per"), "peer")],
     "overlapping_entities", []),
    # Same type, head written first although the convention says `contain` heads are later.
    ([LOC_A, LOC_B], [quintuple(LOC_A, LOC_B, "contain")],
     "direction", [quintuple(LOC_B, LOC_A, "contain")]),
    ([PER_A, PER_C], [quintuple(PER_C, PER_A, "peer")],
     "direction", [quintuple(PER_A, PER_C, "peer")]),
])
def test_unrepresentable_cases_are_flagged_and_lost(entities, quintuples, reason, decoded_quintuples):
  decoded = wordpair.decode_grid(encode(10, entities, quintuples), VOCAB)
  assert decoded.quintuples == sorted(decoded_quintuples)
  flagged = wordpair.unrepresentable(entities, quintuples, VOCAB)
  assert set(flagged.quintuples) == {reason}
  assert sorted(flagged.quintuples[reason]) == sorted(set(quintuples) - set(decoded.quintuples))


def test_shared_pair_keeps_one_relation():
  quintuples = [quintuple(PER_A, PER_C, "peer"), quintuple(PER_A, PER_C, "alternate_names")]
  decoded = wordpair.decode_grid(encode(10, [PER_A, PER_C], quintuples), VOCAB)
  assert decoded.quintuples == [quintuples[1]]  # the last write
  flagged = wordpair.unrepresentable([], quintuples, VOCAB)
  assert sorted(flagged.quintuples["shared_pair"]) == sorted(quintuples)
  assert flagged.entities == {}


def test_adjacent_same_type_entities_are_flagged():
  flagged = wordpair.unrepresentable([PER_A, PER_B, ((2, 3), "loc")], [], VOCAB)
  assert flagged.entities == {"adjacent_same_type": [PER_A, PER_B]}


def pair_grid(cells):
  """per (0, 2) and org (3, 5); `cells` are the four pair cells (0,3) (0,4) (1,3) (1,4)."""
  grid = encode(6, [((0, 2), "per"), ((3, 5), "org")], [])
  grid[[0, 0, 1, 1], [3, 4, 3, 4]] = cells
  return grid


@pytest.mark.parametrize("cells,expected", [
    ([REL["member_of"]] * 3 + [0], "member_of"),
    ([REL["member_of"], REL["member_of"], REL["peer"], 0], "member_of"),
    ([REL["member_of"], REL["member_of"], 0, 0], None),  # a tie with 0 is no relation
    ([REL["member_of"], REL["peer"], 0, 0], None),
    ([ENT["loc"], ENT["loc"], ENT["loc"], REL["member_of"]], None),
    ([REL["locate_at"], REL["peer"], REL["peer"], -1], "peer"),  # the signature is not enforced
])
def test_relation_is_the_majority_over_pair_cells(cells, expected):
  decoded = wordpair.decode_grid(pair_grid(cells), VOCAB)
  assert [q[-1] for q in decoded.quintuples] == ([expected] if expected else [])


def test_entity_runs_break_at_other_classes():
  grid = np.full((8, 8), 0, np.int32)
  np.fill_diagonal(grid, [1, 1, 2, 2, 5, 1, -1, 4])
  assert wordpair.decode_grid(grid, VOCAB).entities == [
      ((0, 2), "per"), ((2, 4), "org"), ((5, 6), "per"), ((7, 8), "loc")]
  assert wordpair.decode_grid(np.zeros((0, 0), np.int32), VOCAB) == ([], [])


def brute_force_decode(grid):
  """Loops over words and span pairs; independent of the vectorised decoder."""
  spans, i = [], 0
  while i < len(grid):
    value, j = grid[i, i], i
    while j < len(grid) and grid[j, j] == value:
      j += 1
    if 1 <= value <= 4:
      spans.append(((i, j), VOCAB.entity_types[value - 1]))
    i = j
  quintuples = []
  for k, earlier in enumerate(spans):
    for later in spans[k + 1:]:
      votes = collections.Counter(
          int(grid[a, p]) for a in range(*earlier[0]) for p in range(*later[0]) if grid[a, p] >= 0)
      if votes:
        top = max(votes.values())
        winner = min(c for c, n in votes.items() if n == top)
        if winner >= 5:
          relation = VOCAB.relations[winner - 5]
          quintuples.append(quintuple(*written_order(earlier, later, relation), relation))
  return sorted(spans), sorted(quintuples)


def test_decode_noisy_grids_equals_brute_force():
  rng = np.random.default_rng(0)
  num_quintuples = 0
  for _ in range(200):
    size = int(rng.integers(1, 14))
    diagonal = rng.choice([0, 1, 2, 3, 4, 5, -1], size=size, p=[.2, .25, .25, .1, .1, .05, .05])
    grid = rng.choice(np.arange(-1, VOCAB.num_classes), size=(size, size),
                      p=[.05, .4] + [.05] * 4 + [.35 / 5] * 5)
    np.fill_diagonal(grid, diagonal)
    decoded = wordpair.decode_grid(grid, VOCAB)
    assert (decoded.entities, decoded.quintuples) == brute_force_decode(grid)
    num_quintuples += len(decoded.quintuples)
  assert num_quintuples > 50


@pytest.mark.parametrize("grid,match", [
    (np.zeros((3, 4), np.int32), "square"),
    (np.full((3, 3), 10), r"\[-1, 9\]"),
    (np.full((3, 3), -2), r"\[-1, 9\]"),
])
def test_decode_rejects_bad_grids(grid, match):
  with pytest.raises(ValueError, match=match):
    wordpair.decode_grid(grid, VOCAB)


def test_predict_grid_matches_numpy():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(3, 7, 7, VOCAB.num_classes)).astype(np.float32)
  logits[..., 5] += 2.0  # make the first relation win often, also on the diagonal
  num_words = np.array([7, 4, 0])
  predicted = np.asarray(wordpair.predict_grid(logits, wordpair.valid_cells(num_words, 7), 4))
  for b, n in enumerate(num_words):
    for i in range(7):
      for j in range(7):
        if i <= j < n:
          allowed = 5 if i == j else VOCAB.num_classes
          assert predicted[b, i, j] == np.argmax(logits[b, i, j, :allowed])
        else:
          assert predicted[b, i, j] == -1
  decoded = wordpair.decode_grids(predicted, VOCAB)
  assert len(decoded) == 3 and decoded[2] == ([], [])


def test_later_head_relations_majority():
  quintuples = [quintuple(LOC_B, LOC_A, "contain")] * 2 + [quintuple(LOC_A, LOC_B, "contain")]
  quintuples += [quintuple(PER_C, PER_A, "peer"), quintuple(PER_A, PER_C, "peer")]
  # The types decide member_of, so its order is never counted.
  quintuples += [quintuple(((5, 6), "per"), ((1, 2), "org"), "member_of")] * 3
  assert wordpair.later_head_relations(quintuples, SIGNATURES) == {"contain"}


def test_signatures_from_mnre_labels(shared_data_dir):
  labels = json.loads((shared_data_dir / "mnre" / "ours_rel2id.json").read_text())
  signatures = wordpair.signatures_from_mnre_labels(labels)
  assert len(signatures) == 21
  assert signatures["alternate_names"] == {("per", "per"), ("org", "org")}
  assert signatures["held_on"] == {("misc", "loc")}
  with pytest.raises(ValueError, match="'/per/peer'"):
    wordpair.signatures_from_mnre_labels(["/per/peer"])


def read_jmere(path):
  """(num_words, entities, quintuples) per sentence of a JMERE json file (read here)."""
  examples = []
  for sample in json.loads(path.read_text()):
    quintuples = {
        (tuple(q["beg_ent"]["pos"]), q["beg_ent"]["tags"], tuple(q["sec_ent"]["pos"]),
         q["sec_ent"]["tags"], q["relation"])
        for group in sample["label_list"] for q in group}
    entities = {e for q in quintuples for e in ((q[0], q[1]), (q[2], q[3]))}
    examples.append((len(sample["token"]), sorted(entities), sorted(quintuples)))
  return examples


def data_layer_encoder():
  """The data layer's `encode_grid` and vocabulary, fed our tuples in its Span/Quintuple form."""
  tokenization = pytest.importorskip(
      "shapca_jax.data.tokenization", reason="the data layer's encode_grid is not written yet")
  from shapca_jax.data import labels

  def encode_fn(num_words, entities, quintuples):
    span = lambda bounds, label: labels.Span(bounds[0], bounds[1], label)  # noqa: E731
    return tokenization.encode_grid(
        num_words, [span(*entity) for entity in entities],
        [labels.Quintuple(span(h, ht), span(t, tt), r) for h, ht, t, tt, r in quintuples])

  return encode_fn, labels


@pytest.mark.parametrize("encoder", ["local", "data_layer"])
def test_jmere_dev_round_trip(shared_data_dir, encoder):
  signatures = wordpair.signatures_from_mnre_labels(
      json.loads((shared_data_dir / "mnre" / "ours_rel2id.json").read_text()))
  train = read_jmere(shared_data_dir / "jmere" / "train.json")
  head_follows_tail = wordpair.later_head_relations(
      [q for _, _, quintuples in train for q in quintuples], signatures)
  assert head_follows_tail == {"contain"}
  if encoder == "local":
    vocab = wordpair.GridVocab(("per", "org", "misc", "loc"), tuple(sorted(signatures)),
                               signatures, head_follows_tail)
    encode_fn = lambda n, entities, quintuples: encode(n, entities, quintuples, vocab)  # noqa: E731
  else:
    encode_fn, labels = data_layer_encoder()
    assert wordpair.signatures_from_mnre_labels(labels.MNRE_RELATIONS) == signatures
    vocab = wordpair.GridVocab(labels.ENTITY_TYPES, labels.JMERE_RELATIONS, signatures,
                               head_follows_tail)

  dev = read_jmere(shared_data_dir / "jmere" / "val.json")
  lost_by_reason = collections.Counter()
  gold_q, pred_q, gold_e, pred_e = [], [], [], []
  for num_words, entities, quintuples in dev:
    decoded = wordpair.decode_grid(np.asarray(encode_fn(num_words, entities, quintuples)), vocab)
    flagged = wordpair.unrepresentable(entities, quintuples, vocab)
    flagged_q = {q for items in flagged.quintuples.values() for q in items}
    flagged_e = {e for items in flagged.entities.values() for e in items}
    # Everything the format can carry comes back exactly, and nothing else appears.
    assert set(quintuples) - flagged_q <= set(decoded.quintuples)
    assert set(entities) - flagged_e <= set(decoded.entities)
    assert len(set(decoded.quintuples) - set(quintuples)) <= len(flagged_q)
    assert len(set(decoded.entities) - set(entities)) <= len(flagged_e)
    # Direction losses are certain, not merely possible.
    assert not set(flagged.quintuples.get("direction", [])) & set(decoded.quintuples)
    lost_by_reason.update({r: len(items) for r, items in flagged.quintuples.items()})
    gold_q.append(quintuples), pred_q.append(decoded.quintuples)
    gold_e.append(entities), pred_e.append(decoded.entities)

  scores = metrics.jmere_f1(gold_e, pred_e, gold_q, pred_q)
  print(f"JMERE dev ({encoder} encoder): {scores['quintuple']['num_gold']} quintuples, "
        f"unrepresentable {dict(lost_by_reason)}, gold-grid quintuple F1 "
        f"{scores['quintuple']['f1']:.4f}, entity F1 {scores['entity']['f1']:.4f}")
  assert scores["quintuple"]["num_gold"] == 624
  assert sum(lost_by_reason.values()) < 0.1 * 624
