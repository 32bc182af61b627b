"""Tests for shapca_jax.contextgen.store: resumable JSONL, partial-line repair, atomic sort."""

import json

import pytest

from shapca_jax.contextgen import store


def line(image_id, context="a context", generator="g", sha="s"):
  return json.dumps({"image_id": image_id, "context": context, "generator": generator,
                     "prompt_sha": sha}, ensure_ascii=False) + "\n"


def test_missing_file_has_nothing_done(tmp_path):
  assert store.scan_contexts(tmp_path / "none.jsonl") == store.Scan({})


def test_scan_reads_ids_lines_and_provenance(tmp_path):
  path = tmp_path / "c.jsonl"
  path.write_text(line("a.jpg", generator="openai:m", sha="1") + "\n" + line("b.jpg", sha="2"))
  scan = store.scan_contexts(path)
  assert scan.repair is None
  assert scan.done == {"a.jpg": store.DoneRecord(1, "openai:m", "1"),
                       "b.jpg": store.DoneRecord(3, "g", "2")}


def test_partial_last_line_is_cut_off_and_saved(tmp_path):
  path = tmp_path / "c.jsonl"
  complete = line("a.jpg") + line("b.jpg")
  fragment = line("c.jpg", context="é" * 50)[:37]  # Cut inside the record, as a kill would.
  path.write_bytes(complete.encode() + fragment.encode())
  scan = store.scan_contexts(path)
  assert set(scan.done) == {"a.jpg", "b.jpg"}
  assert "partial line" in scan.repair
  assert path.read_bytes() == complete.encode()
  (saved,) = tmp_path.glob("c.jsonl.partial-*")
  assert saved.read_bytes() == fragment.encode()
  assert str(saved) in scan.repair


def test_partial_line_cut_inside_a_multibyte_character_is_cut_off(tmp_path):
  path = tmp_path / "c.jsonl"
  data = (line("a.jpg") + line("b.jpg", context="é")).encode()
  cut = data.rindex("é".encode()) + 1  # Half of the two-byte character.
  path.write_bytes(data[:cut])
  assert set(store.scan_contexts(path).done) == {"a.jpg"}
  assert path.read_bytes() == line("a.jpg").encode()


def test_complete_last_record_without_newline_is_kept(tmp_path):
  path = tmp_path / "c.jsonl"
  path.write_text(line("a.jpg") + line("b.jpg").rstrip("\n"))
  scan = store.scan_contexts(path)
  assert set(scan.done) == {"a.jpg", "b.jpg"}
  assert "newline" in scan.repair
  assert path.read_text() == line("a.jpg") + line("b.jpg")
  assert not list(tmp_path.glob("*.partial-*"))


@pytest.mark.parametrize("bad,match", [
    ("{not json\n", "not valid JSON"),
    ('["a.jpg"]\n', "JSON object"),
    ('{"image_id": "x.jpg", "context": "c", "generator": "g"}\n', "prompt_sha"),
    ('{"image_id": 3, "context": "c", "generator": "g", "prompt_sha": "s"}\n', "image_id"),
])
def test_malformed_complete_line_is_an_error_naming_file_and_line(tmp_path, bad, match):
  path = tmp_path / "c.jsonl"
  path.write_text(line("a.jpg") + bad + line("b.jpg"))
  with pytest.raises(ValueError, match=f"c.jsonl:2: .*{match}"):
    store.scan_contexts(path)


def test_duplicate_id_is_an_error_naming_both_lines(tmp_path):
  path = tmp_path / "c.jsonl"
  path.write_text(line("a.jpg") + line("b.jpg") + line("a.jpg"))
  with pytest.raises(ValueError, match="c.jsonl:3: .*'a.jpg' already appears on line 1"):
    store.scan_contexts(path)


def test_sort_orders_by_id_and_keeps_every_line(tmp_path):
  path = tmp_path / "c.jsonl"
  lines = [line(i, context=f"text of {i}") for i in ("b.jpg", "c.png", "a.jpg", "B.jpg")]
  path.write_text("".join(lines))
  store.sort_contexts(path)
  result = path.read_text().splitlines(keepends=True)
  assert sorted(result) == sorted(lines)
  ids = [json.loads(text)["image_id"] for text in result]
  assert ids == ["B.jpg", "a.jpg", "b.jpg", "c.png"]
  assert [p.name for p in tmp_path.iterdir()] == ["c.jsonl"]  # No temporary file left.


def test_appender_writes_whole_lines_and_truncates_on_request(tmp_path):
  path = tmp_path / "f.jsonl"
  path.write_text("old\n")
  with store.JsonlAppender(path) as appender:
    appender.write({"image_id": "é.jpg", "error": "x"})
    assert path.read_text(encoding="utf-8") == 'old\n{"image_id": "é.jpg", "error": "x"}\n'
  with store.JsonlAppender(path, truncate=True) as appender:
    appender.write({"a": "b"})
  assert path.read_text() == '{"a": "b"}\n'


@pytest.mark.parametrize("name,expected", [("c.jsonl", "c.failures.jsonl"),
                                           ("ctx.txt", "ctx.txt.failures.jsonl")])
def test_default_failures_path_is_beside_the_contexts(tmp_path, name, expected):
  assert store.default_failures_path(tmp_path / name) == tmp_path / expected
