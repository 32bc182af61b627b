"""The README and docs/ pages: every relative link resolves, and the README stays a short page.

A link target is a path relative to the page that holds it, optionally with `#anchor`; an
anchor must name a heading of the target page, slugged as GitHub does. Absolute URLs are not
fetched. Links inside fenced code blocks and inline code are not links.
"""

import pathlib
import re

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
README_MAX_CHARS = 12_000

_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.MULTILINE)
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def pages() -> list[pathlib.Path]:
  return [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").rglob("*.md"))]


def _prose(text: str) -> str:
  return _INLINE_CODE.sub("", _FENCE.sub("", text))


def slug(heading: str) -> str:
  """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
  text = _INLINE_CODE.sub(lambda m: m.group(0)[1:-1], heading).lower()
  text = re.sub(r"[^\w\- ]", "", text)
  return text.replace(" ", "-")


def anchors(page: pathlib.Path) -> set[str]:
  seen: dict[str, int] = {}
  result = set()
  for heading in _HEADING.findall(_FENCE.sub("", page.read_text(encoding="utf-8"))):
    base = slug(heading)
    count = seen.get(base, 0)
    seen[base] = count + 1
    result.add(base if count == 0 else f"{base}-{count}")
  return result


def broken_links(page: pathlib.Path) -> list[str]:
  """`page: target (why)` for every relative link of `page` that does not resolve."""
  broken = []
  for target in _LINK.findall(_prose(page.read_text(encoding="utf-8"))):
    if _SCHEME.match(target):
      continue
    path, _, anchor = target.partition("#")
    resolved = (page.parent / path).resolve() if path else page
    if not resolved.exists():
      broken.append(f"{page.name}: {target} (no such file)")
    elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
      broken.append(f"{page.name}: {target} (no heading with that anchor)")
  return broken


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_relative_links_resolve(page):
  assert broken_links(page) == []


def test_readme_is_a_short_front_page():
  text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
  assert len(text) <= README_MAX_CHARS, f"README.md has {len(text)} characters"


def test_docs_pages_exist():
  names = {p.name for p in (REPO_ROOT / "docs").glob("*.md")}
  expected = {"data.md", "training.md", "method.md", "shapley.md", "benchmarks.md",
              "relations.md", "inference.md", "contexts.md"}
  assert expected <= names


@pytest.mark.parametrize("heading, expected", [
    ("GPU / TPU, one device", "gpu--tpu-one-device"),
    ("Ablations (§7): one switch each", "ablations-7-one-switch-each"),
    ("Other papers' numbers (for scale only, not ours)",
     "other-papers-numbers-for-scale-only-not-ours"),
    ("Shapley engine and `mc_shapley`", "shapley-engine-and-mc_shapley"),
])
def test_slug_matches_github(heading, expected):
  assert slug(heading) == expected


def test_checker_reports_broken_links(tmp_path):
  (tmp_path / "other.md").write_text("# Real heading\n\ntext\n", encoding="utf-8")
  page = tmp_path / "page.md"
  page.write_text(
      "# Top\n"
      "[ok](other.md) [ok anchor](other.md#real-heading) [self](#top) [web](https://x.org/a)\n"
      "[missing](nowhere.md) [bad anchor](other.md#no-such) ![img](missing.png)\n"
      "`[in code](ignored.md)`\n"
      "```\n[in fence](ignored_too.md)\n```\n", encoding="utf-8")
  assert broken_links(page) == [
      "page.md: nowhere.md (no such file)",
      "page.md: other.md#no-such (no heading with that anchor)",
      "page.md: missing.png (no such file)",
  ]
