"""A chat-completions server on 127.0.0.1 that misbehaves on purpose, for the contextgen tests.

It knows the test images by the SHA-256 of their bytes, so it recognises which image a request
carries only when the client sent that image's exact bytes as a base64 data URL. For each image
a script says how to answer the successive attempts ("ok" once the script runs out):

  ok          200 with the expected context (`expected_context(image bytes)`)
  429         429 with `Retry-After: <retry_after>`
  500 / 503   server errors
  timeout     sleeps `hang_s` before answering, longer than the client's timeout
  drop        closes the connection without an answer
  malformed   200 whose body is not JSON
  400 / 401   client errors that must not be retried
  refuse      200 whose choice has finish_reason "content_filter"

The server accepts one prompt, or several. Every request is logged (image id, action, start
and end times); a request the server could not validate (wrong path, key, model, prompt or
image) is answered 422 and logged as "invalid".
"""

import base64
import dataclasses
import hashlib
import http.server
import json
import threading
import time
from collections.abc import Mapping, Sequence

API_KEY = "test-key"
KEY_ENV = "CONTEXTGEN_TEST_API_KEY"
MODEL = "llava-test"
PROMPT = "Describe the following image in detail."
PROXY_VARS = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


def isolate_env(monkeypatch) -> None:
  """Clients find the key in KEY_ENV and reach 127.0.0.1 directly, never through a proxy."""
  for var in PROXY_VARS:
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv(KEY_ENV, API_KEY)


def expected_context(data: bytes) -> str:
  """The context the server answers for an image: computed from the bytes, not by the client."""
  return f"An image whose SHA-256 starts with {hashlib.sha256(data).hexdigest()[:16]}."


@dataclasses.dataclass
class Attempt:
  image_id: str
  action: str
  start: float
  end: float = 0.0


class ChatServer:
  """Serves chat completions in threads; use as a context manager."""

  def __init__(self, images: Mapping[str, bytes], prompt: str | Sequence[str],
               script: Mapping[str, Sequence[str]] | None = None, retry_after: str = "0.3",
               hang_s: float = 1.0, delay_s: float = 0.0):
    self.images = dict(images)
    self.by_sha = {hashlib.sha256(data).hexdigest(): image_id for image_id, data in images.items()}
    self.prompts = {prompt} if isinstance(prompt, str) else set(prompt)
    self.script = {image_id: list(actions) for image_id, actions in (script or {}).items()}
    self.retry_after = retry_after
    self.hang_s = hang_s
    self.delay_s = delay_s
    self.log: list[Attempt] = []
    self._lock = threading.Lock()
    self._counts: dict[str, int] = {}
    self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
    self._httpd.daemon_threads = True
    self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,),
                                    daemon=True)

  @property
  def url(self) -> str:
    return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

  def __enter__(self) -> "ChatServer":
    self._thread.start()
    return self

  def __exit__(self, *exc_info) -> None:
    self._httpd.shutdown()
    self._httpd.server_close()

  def attempts(self, image_id: str) -> list[Attempt]:
    with self._lock:
      return [a for a in self.log if a.image_id == image_id]

  def actions(self) -> list[str]:
    with self._lock:
      return [a.action for a in self.log]

  def _next_action(self, image_id: str) -> str:
    with self._lock:
      n = self._counts.get(image_id, 0)
      self._counts[image_id] = n + 1
      actions = self.script.get(image_id, [])
      return actions[n] if n < len(actions) else "ok"

  def _validate(self, handler: http.server.BaseHTTPRequestHandler, body: bytes) -> str:
    """The image id the request is about; ValueError saying what is wrong with it."""
    if handler.path != "/v1/chat/completions":
      raise ValueError(f"path {handler.path}")
    if handler.headers.get("Authorization") != f"Bearer {API_KEY}":
      raise ValueError(f"authorization {handler.headers.get('Authorization')!r}")
    request = json.loads(body)
    if request["model"] != MODEL:
      raise ValueError(f"model {request['model']!r}")
    (message,) = request["messages"]
    parts = {part["type"]: part for part in message["content"]}
    if message["role"] != "user" or parts["text"]["text"] not in self.prompts:
      raise ValueError(f"message {message!r}")
    url = parts["image_url"]["image_url"]["url"]
    header, encoded = url.split(",", 1)
    if header not in ("data:image/jpeg;base64", "data:image/png;base64"):
      raise ValueError(f"data URL header {header!r}")
    sha = hashlib.sha256(base64.b64decode(encoded, validate=True)).hexdigest()
    if sha not in self.by_sha:
      raise ValueError("unknown image bytes")
    return self.by_sha[sha]

  def _handler_class(self) -> type[http.server.BaseHTTPRequestHandler]:
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"

      def log_message(self, *args) -> None:  # Keep the test output clean.
        pass

      def _send(self, status: int, payload: bytes, headers: Mapping[str, str] = {}) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for key, value in headers.items():
          self.send_header(key, value)
        self.end_headers()
        self.wfile.write(payload)

      def do_POST(self) -> None:  # pylint: disable=invalid-name
        start = time.monotonic()
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        try:
          image_id = server._validate(self, body)
        except (ValueError, KeyError, TypeError) as e:
          attempt = Attempt("?", "invalid", start)
          with server._lock:
            server.log.append(attempt)
          self._send(422, json.dumps({"error": {"message": f"invalid request: {e}"}}).encode())
          attempt.end = time.monotonic()
          return
        action = server._next_action(image_id)
        attempt = Attempt(image_id, action, start)
        with server._lock:
          server.log.append(attempt)
        try:
          self._act(action, image_id)
        except (BrokenPipeError, ConnectionResetError):
          pass  # The client gave up (timeout) or was killed.
        attempt.end = time.monotonic()

      def _act(self, action: str, image_id: str) -> None:
        time.sleep(server.delay_s)
        error = lambda msg: json.dumps({"error": {"message": msg}}).encode()
        if action in ("ok", "timeout", "refuse"):
          if action == "timeout":
            time.sleep(server.hang_s)
          context = expected_context(server.images[image_id])
          choice = {"index": 0, "message": {"role": "assistant", "content": context},
                    "finish_reason": "stop"}
          if action == "refuse":
            choice = {"index": 0, "message": {"role": "assistant", "content": ""},
                      "finish_reason": "content_filter"}
          self._send(200, json.dumps({"id": "x", "object": "chat.completion", "model": MODEL,
                                      "choices": [choice]}).encode())
        elif action == "429":
          self._send(429, error("rate limited"), {"Retry-After": server.retry_after})
        elif action in ("500", "503", "400", "401"):
          self._send(int(action), error(f"scripted {action}"))
        elif action == "malformed":
          self._send(200, b'{"choices": [{"message": ')
        elif action == "drop":
          self.close_connection = True
          self.connection.shutdown(2)
        else:
          raise AssertionError(f"unknown scripted action {action!r}")

    return Handler
