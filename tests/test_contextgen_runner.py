"""Tests for shapca_jax.contextgen.runner and experiments/generate_contexts.py.

The 12 real MNRE images are described through a real chat-completions server on 127.0.0.1
(tests/fake_chat_server.py) that misbehaves on purpose; the expected contexts are computed from
the image files, the expected prompt fingerprint with hashlib. A run killed with SIGKILL and
restarted must end with every id exactly once.
"""

import hashlib
import importlib.util
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

import fake_chat_server as fake
from shapca_jax.contextgen import backends
from shapca_jax.contextgen import images as images_lib
from shapca_jax.contextgen import runner

KEY_ENV = fake.KEY_ENV
PROMPT = fake.PROMPT
PROMPT_SHA = hashlib.sha256(PROMPT.encode()).hexdigest()
REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "generate_contexts.py"


@pytest.fixture(autouse=True)
def local_only(monkeypatch):
  fake.isolate_env(monkeypatch)


@pytest.fixture(scope="module")
def image_dir(shared_data_dir):
  return shared_data_dir / "mnre" / "images"


@pytest.fixture(scope="module")
def image_bytes(image_dir):
  return {p.name: p.read_bytes() for p in sorted(image_dir.glob("*/*.jpg"))}


def openai_backend(url, concurrency=4, prompt=PROMPT):
  config = backends.OpenAIConfig(base_url=url, model=fake.MODEL, api_key_env=KEY_ENV,
                                 timeout_s=0.3, max_retries=3, concurrency=concurrency)
  return backends.OpenAIBackend(config, prompt)


def read_jsonl(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def assert_complete(path, image_bytes):
  """Every image exactly once, with the context the server derived from its bytes."""
  records = read_jsonl(path)
  ids = [r["image_id"] for r in records]
  assert sorted(ids) == sorted(image_bytes)  # Each id once, none missing, none extra.
  for r in records:
    context = fake.expected_context(image_bytes[r["image_id"]])
    assert r == {"image_id": r["image_id"], "context": context,
                 "generator": f"openai:{fake.MODEL}", "prompt_sha": PROMPT_SHA}
  return ids


def test_misbehaving_server_then_rerun_gives_every_id_once_in_order(tmp_path, image_dir,
                                                                     image_bytes):
  ids = sorted(image_bytes)
  script = {ids[0]: ["429"], ids[1]: ["500", "503"], ids[2]: ["timeout"], ids[3]: ["malformed"],
            ids[4]: ["drop"], ids[5]: ["400"], ids[6]: ["500", "timeout", "malformed"]}
  out = tmp_path / "contexts.jsonl"
  refs = images_lib.refs_from_folder(image_dir)
  with fake.ChatServer(image_bytes, PROMPT, script=script, retry_after="0.3") as server:
    first = runner.generate_contexts(refs, openai_backend(server.url), out, progress=False)
    assert (first.total, first.skipped, first.generated) == (12, 0, 11)
    assert list(first.failures) == [ids[5]] and "HTTP 400" in first.failures[ids[5]]
    assert not first.ok
    (failure,) = read_jsonl(tmp_path / "contexts.failures.jsonl")
    assert failure["image_id"] == ids[5] and "HTTP 400" in failure["error"]
    for image_id, actions in script.items():
      assert [a.action for a in server.attempts(image_id)] == (
          actions if actions == ["400"] else actions + ["ok"])
    rate_limited, retried = server.attempts(ids[0])
    assert retried.start - rate_limited.end >= 0.3 - 0.02
    requests_before = len(server.log)

    second = runner.generate_contexts(refs, openai_backend(server.url), out, sort=True,
                                      progress=False)
    assert (second.skipped, second.generated, second.failures, second.ok) == (11, 1, {}, True)
    assert [a.image_id for a in server.log[requests_before:]] == [ids[5]]
  assert "invalid" not in server.actions()
  assert assert_complete(out, image_bytes) == ids
  assert read_jsonl(tmp_path / "contexts.failures.jsonl") == []
  assert "12 images: 11 already done (skipped), 1 generated, 0 failed" in second.format()


def test_unreadable_image_is_a_failure_with_its_reason(tmp_path, image_dir, image_bytes):
  folder = tmp_path / "images"
  folder.mkdir()
  good = sorted(image_bytes)[:2]
  for name in good:
    (folder / name).write_bytes(image_bytes[name])
  (folder / "broken.jpg").write_bytes(image_bytes[good[0]][:1000])
  with fake.ChatServer(image_bytes, PROMPT) as server:
    summary = runner.generate_contexts(images_lib.refs_from_folder(folder),
                                       openai_backend(server.url), tmp_path / "c.jsonl",
                                       progress=False)
  assert summary.generated == 2 and list(summary.failures) == ["broken.jpg"]
  assert "unreadable" in summary.failures["broken.jpg"]
  assert "1 x unreadable image" in summary.format()
  assert len(server.log) == 2  # The broken image never reached the server.


def test_contexts_from_another_prompt_are_not_mixed_in(tmp_path, image_dir, image_bytes):
  refs = images_lib.refs_from_folder(image_dir)
  out = tmp_path / "c.jsonl"
  brief = "Describe the image briefly."
  with fake.ChatServer(image_bytes, (PROMPT, brief)) as server:
    runner.generate_contexts(refs[:3], openai_backend(server.url), out, progress=False)
    other = openai_backend(server.url, prompt=brief)
    with pytest.raises(ValueError, match="c.jsonl:1: .*prompt_sha"):
      runner.generate_contexts(refs, other, out, progress=False)
    mixed = runner.generate_contexts(refs[:4], other, out, allow_mixed=True, progress=False)
  assert (mixed.skipped, mixed.generated) == (3, 1)


def test_unauthorised_server_aborts_the_run_early(tmp_path, image_dir, image_bytes):
  script = {image_id: ["401"] for image_id in image_bytes}
  with fake.ChatServer(image_bytes, PROMPT, script=script) as server:
    summary = runner.generate_contexts(images_lib.refs_from_folder(image_dir),
                                       openai_backend(server.url, concurrency=2),
                                       tmp_path / "c.jsonl", progress=False)
  assert "HTTP 401" in summary.aborted and not summary.ok
  assert summary.generated == 0 and summary.failures == {}
  assert len(server.log) <= 4  # The two in flight, at most two queued behind them.
  assert "not attempted" in summary.format()


@pytest.mark.skipif(importlib.util.find_spec("shapca_jax.data.contexts") is None,
                    reason="the data layer's context reader is not in this checkout")
def test_data_layer_reads_the_generated_file(tmp_path, image_dir, image_bytes):
  from shapca_jax.data import contexts
  out = tmp_path / "c.jsonl"
  with fake.ChatServer(image_bytes, PROMPT) as server:
    runner.generate_contexts(images_lib.refs_from_folder(image_dir), openai_backend(server.url),
                             out, progress=False)
  entries = contexts.read_jsonl(out)
  assert {(e.key, e.text) for e in entries} == {
      (name[:-len(".jpg")], fake.expected_context(data)) for name, data in image_bytes.items()}


def command(server, image_dir, out, *extra):
  env = {k: v for k, v in os.environ.items() if k not in fake.PROXY_VARS}
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
  args = [sys.executable, str(SCRIPT), "--images", str(image_dir), "--out", str(out),
          "--base_url", server.url, "--model", fake.MODEL, "--api_key_env", KEY_ENV,
          "--timeout_s", "5", "--no_progress", *extra]
  return args, env


def complete_lines(path):
  data = path.read_bytes() if path.exists() else b""
  return data.count(b"\n")


def _wait_until_idle(server, quiet_s=0.5, timeout_s=30.0):
  """Returns once the server has taken no new request and finished every one it took for
  ``quiet_s``: requests a killed client had already sent can still reach a busy server's
  handler threads after the kill, and must not be counted as the next run's."""
  deadline = time.monotonic() + timeout_s
  seen, since = -1, time.monotonic()
  while time.monotonic() < deadline:
    busy = len(server.log) != seen or any(a.end == 0.0 for a in server.log)
    if busy:
      seen, since = len(server.log), time.monotonic()
    elif time.monotonic() - since >= quiet_s:
      return
    time.sleep(0.01)
  raise AssertionError("the server never went idle after the kill")


def test_killed_run_restarted_ends_with_every_id_once(tmp_path, image_dir, image_bytes):
  out = tmp_path / "contexts.jsonl"
  with fake.ChatServer(image_bytes, PROMPT, delay_s=0.1) as server:
    args, env = command(server, image_dir, out, "--concurrency", "2")
    process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while complete_lines(out) < 4:
      assert process.poll() is None, "the run ended before it could be killed"
      assert time.monotonic() < deadline, "no progress within a minute"
      time.sleep(0.005)
    killed_at = time.monotonic()
    process.send_signal(signal.SIGKILL)
    process.wait()
    answered = sum(a.action == "ok" and 0 < a.end <= killed_at for a in server.log)
    kept = complete_lines(out)
    assert 4 <= kept < 12
    assert answered - kept <= 2  # Lost at most the requests in flight (concurrency 2).

    done = {r["image_id"] for r in read_jsonl(out)}
    pending = sorted(set(image_bytes) - done)
    with open(out, "ab") as f:  # What a kill in the middle of a write leaves behind.
      f.write(json.dumps({"image_id": pending[0], "context": "half a con"}).encode()[:-5])
    _wait_until_idle(server)
    requests_before = len(server.log)
    rerun = subprocess.run(args + ["--sort"], env=env, capture_output=True, text=True,
                           timeout=60)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert sorted(a.image_id for a in server.log[requests_before:]) == pending
  assert assert_complete(out, image_bytes) == sorted(image_bytes)
  assert "partial line" in rerun.stdout
  assert f"{len(done)} already done (skipped), {len(pending)} generated, 0 failed" in rerun.stdout


@pytest.mark.skipif(importlib.util.find_spec("shapca_jax.data.readers") is None,
                    reason="the data readers (shapca_jax.data.readers) are not in this checkout")
def test_command_on_a_dataset_split_exits_nonzero_for_missing_images(
    tmp_path, shared_data_dir, image_dir, image_bytes):
  out = tmp_path / "val.jsonl"
  with fake.ChatServer(image_bytes, PROMPT) as server:
    args, env = command(server, image_dir, out, "--dataset", "mnre", "--split", "valid",
                        "--data_dir", str(shared_data_dir))
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
  assert result.returncode == 1, result.stdout + result.stderr
  present = {p.name for p in image_dir.glob("val/*.jpg")}
  assert {r["image_id"] for r in read_jsonl(out)} == present
  failures = read_jsonl(tmp_path / "val.failures.jsonl")
  assert failures and all("image file not found" in f["error"] for f in failures)
  assert not present & {f["image_id"] for f in failures}
  assert f"{len(failures)} failed" in result.stdout
