"""Label vocabularies against the data set's own files, and BIO spans against seqeval."""

import json

import numpy as np
import pytest
from seqeval.metrics.sequence_labeling import get_entities

from shapca_jax.data import labels


def test_mnre_relations_are_rel2id_in_order(shared_data_dir):
  rel2id = json.loads((shared_data_dir / "mnre" / "ours_rel2id.json").read_text())
  assert labels.MNRE_RELATIONS == tuple(sorted(rel2id, key=rel2id.get))
  assert rel2id["None"] == 0 and len(labels.MNRE_RELATIONS) == 23


def test_grid_labels_follow_method_section_1(shared_data_dir):
  assert len(labels.GRID_LABELS) == 26
  assert labels.GRID_LABELS[:5] == ("none", "per", "org", "misc", "loc")
  # 5-25: the relation names of the JMERE files, each once.
  names = set()
  for split in ("train", "val", "test"):
    for sample in json.loads((shared_data_dir / "jmere" / f"{split}.json").read_text()):
      names.update(r["relation"] for group in sample["label_list"] for r in group)
  assert set(labels.GRID_LABELS[5:]) == names and len(names) == 21
  assert labels.GRID_LABELS[5:8] == ("parent", "siblings", "couple")


def test_relation_name_drops_the_type_prefix():
  assert labels.relation_name("/per/org/member_of") == "member_of"


@pytest.mark.parametrize("seed", range(5))
def test_bio_spans_match_seqeval_on_random_tags(seed):
  rng = np.random.default_rng(seed)
  tags = list(rng.choice(labels.MNER_LABELS, size=200))  # plenty of stray I- tags
  expected = [(kind, start, end + 1) for kind, start, end in get_entities(tags)]
  assert [(s.label, s.start, s.end) for s in labels.bio_spans(tags)] == expected


def test_bio_spans_count_stray_inside_tags_as_entities():
  tags = ["I-PER", "I-PER", "O", "B-LOC", "I-ORG", "I-ORG"]
  assert labels.bio_spans(tags) == [labels.Span(0, 2, "PER"), labels.Span(3, 4, "LOC"),
                                    labels.Span(4, 6, "ORG")]
  tags = ["I-PER", "I-PER", "B-PER", "I-LOC", "O", "I-ORG", "B-ORG", "I-ORG"]
  assert labels.bio_spans(tags) == [labels.Span(0, 2, "PER"), labels.Span(2, 3, "PER"),
                                    labels.Span(3, 4, "LOC"), labels.Span(5, 6, "ORG"),
                                    labels.Span(6, 8, "ORG")]
  assert labels.bio_spans([]) == []


@pytest.mark.parametrize("bad", ["B", "X-PER", "I-", "per", "", "O-PER"])
def test_bio_spans_reject_malformed_tags_naming_the_word(bad):
  with pytest.raises(ValueError, match=r"gold sentence 3, word 2: tag"):
    labels.bio_spans(["O", "B-PER", bad], "gold sentence 3")
