"""Label vocabularies of the four data sets and the BIO span convention.

The vocabularies are module constants so that heads, metrics and data agree on ids without
reading any file: MNER BIO tags, the 23 MNRE relations in the order of `ours_rel2id.json`, and
the 26 JMERE word-pair grid classes of METHOD §1.
"""

from collections.abc import Sequence
from typing import NamedTuple


class Span(NamedTuple):
  """A labelled word span `[start, end)`; `label` is an entity type or a name."""
  start: int
  end: int
  label: str


class Quintuple(NamedTuple):
  """A JMERE relation: head and tail spans labelled with their entity types, and the relation."""
  head: Span
  tail: Span
  relation: str


MNER_LABELS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-MISC", "I-MISC")

# Twitter-2015 spells the MISC type `OTHER`.
MNER_TYPE_ALIASES = {"OTHER": "MISC"}

MNRE_RELATIONS = (
    "None",
    "/per/per/parent",
    "/per/per/siblings",
    "/per/per/couple",
    "/per/per/neighbor",
    "/per/per/peer",
    "/per/per/charges",
    "/per/per/alumi",
    "/per/per/alternate_names",
    "/per/org/member_of",
    "/per/loc/place_of_residence",
    "/per/loc/place_of_birth",
    "/org/org/alternate_names",
    "/org/org/subsidiary",
    "/org/loc/locate_at",
    "/loc/loc/contain",
    "/per/misc/present_in",
    "/per/misc/awarded",
    "/per/misc/race",
    "/per/misc/religion",
    "/per/misc/nationality",
    "/misc/misc/part_of",
    "/misc/loc/held_on",
)

ENTITY_TYPES = ("per", "org", "misc", "loc")


def relation_name(mnre_relation: str) -> str:
  """`/per/org/member_of` -> `member_of`: the JMERE spelling of an MNRE relation."""
  return mnre_relation.rsplit("/", 1)[-1]


# The 21 distinct relation names, in order of first occurrence in MNRE_RELATIONS.
JMERE_RELATIONS = tuple(dict.fromkeys(relation_name(r) for r in MNRE_RELATIONS[1:]))

# Grid classes: 0 none, 1-4 entity types, 5-25 relations (METHOD §1).
GRID_LABELS = ("none",) + ENTITY_TYPES + JMERE_RELATIONS
GRID_IGNORE = -1

MNER_LABEL_IDS = {name: i for i, name in enumerate(MNER_LABELS)}
MNRE_RELATION_IDS = {name: i for i, name in enumerate(MNRE_RELATIONS)}
GRID_LABEL_IDS = {name: i for i, name in enumerate(GRID_LABELS)}


def bio_spans(tags: Sequence[str], where: str = "tags") -> list[Span]:
  """Entity spans of a BIO tag sequence, the conlleval / seqeval-default way.

  `B-X` starts an entity, and so does an `I-X` that does not continue an entity of type X:
  stray `I-` tags (Twitter-2015 has a few hundred) are entities, as the metric counts them. An
  entity ends at `O`, at `B-`, at a type change and at the end of the sequence.
  A tag other than `O`, `B-<type>` or `I-<type>` raises ValueError naming `where` and the word.
  """
  spans = []
  start, kind = None, None
  for i, tag in enumerate(tuple(tags) + ("O",)):
    prefix, _, tag_kind = str(tag).partition("-")
    if tag != "O" and (prefix not in ("B", "I") or not tag_kind):
      raise ValueError(f"{where}, word {i}: tag {tag!r} is not O, B-<type> or I-<type>")
    continues = prefix == "I" and kind == tag_kind
    if start is not None and not continues:
      spans.append(Span(start, i, kind))
      start, kind = None, None
    if prefix in ("B", "I") and not continues:
      start, kind = i, tag_kind
  return spans
