"""Multimodal models that turn an image into a context: an OpenAI-compatible server or LLaVA.

A backend describes a batch of images with one prompt. `generator` names it in the output,
`batch_size` is how many images one `generate` call takes and `concurrency` how many calls may
run at once. `generate` returns, per image, its context or the `GenerationError` that says why
it has none; it raises `GenerationError` when the whole batch failed, and `FatalBackendError`
when no request can succeed (bad key, wrong URL or model), which stops the run.

- `OpenAIBackend`: any chat-completions endpoint (vLLM or SGLang serving LLaVA-1.5, or a hosted
  GPT-4-class model). One image per request, sent as a base64 data URL; requests time out,
  and 429, 5xx, timeouts, dropped connections and malformed bodies are retried with
  exponential backoff and jitter, honouring Retry-After. Other 4xx are not retried.
- `TransformersBackend`: a local LLaVA-1.5 checkpoint folder (`llava-hf` layout) through
  transformers + torch, generating a batch at once (greedy decoding).
"""

import base64
import dataclasses
import email.utils
import http.client
import io
import json
import logging
import os
import pathlib
import random
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from PIL import Image

from shapca_jax.contextgen import images as images_lib
from shapca_jax.contextgen import prompts

# Statuses that say the request itself is refused for good, whatever the image.
_FATAL_STATUSES = {401: "unauthorised (is the API key right?)", 403: "forbidden",
                   404: "not found (check the base URL and the model name)"}
_MAX_REASON_CHARS = 300


class GenerationError(Exception):
  """The images of one `generate` call got no context; the message is the reason."""


class FatalBackendError(Exception):
  """The backend cannot describe any image (bad key, wrong URL or model): stop the run."""


class Backend(Protocol):
  generator: str
  prompt: str
  batch_size: int
  concurrency: int

  def generate(self, batch: Sequence[images_lib.LoadedImage]) -> list[str | GenerationError]:
    """Per image of `batch`, in order, its context or the reason it has none."""


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
  """How often and how patiently to retry a request that failed for a transient reason."""
  max_attempts: int = 6
  backoff_base_s: float = 1.0
  backoff_max_s: float = 60.0

  def __post_init__(self):
    if self.max_attempts < 1:
      raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
    if not 0 <= self.backoff_base_s <= self.backoff_max_s:
      raise ValueError(f"need 0 <= backoff_base_s <= backoff_max_s, got {self.backoff_base_s} "
                       f"and {self.backoff_max_s}")

  def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
    """Seconds to wait after failed attempt number `attempt` (1-based).

    The server's Retry-After when it sent one (up to `backoff_max_s`); otherwise an exponential
    backoff with "equal jitter": half of min(max, base * 2^(attempt-1)) plus a uniform random
    part of up to the other half, so concurrent clients do not retry in lockstep.
    """
    if retry_after is not None:
      return min(retry_after, self.backoff_max_s)
    ceiling = min(self.backoff_max_s, self.backoff_base_s * 2.0 ** (attempt - 1))
    return ceiling / 2 + rng.uniform(0, ceiling / 2)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
  """Seconds from a Retry-After header (delay-seconds or HTTP date); None if absent or invalid."""
  if not value:
    return None
  value = value.strip()
  try:
    return max(0.0, float(value))
  except ValueError:
    pass
  try:
    when = email.utils.parsedate_to_datetime(value)
  except (TypeError, ValueError):
    return None
  if when.tzinfo is None:
    return None
  return max(0.0, when.timestamp() - (time.time() if now is None else now))


def retry_after_of(headers: Any) -> float | None:
  """The wait a response asks for: `retry-after-ms` (Azure OpenAI) or `Retry-After`."""
  try:
    return max(0.0, float(headers.get("retry-after-ms")) / 1000)
  except (TypeError, ValueError):
    return parse_retry_after(headers.get("Retry-After"))


class _Transient(Exception):
  """One attempt failed in a way worth retrying."""

  def __init__(self, reason: str, retry_after: float | None = None):
    super().__init__(reason)
    self.retry_after = retry_after


def _shorten(text: str) -> str:
  text = " ".join(text.split())
  return text if len(text) <= _MAX_REASON_CHARS else text[:_MAX_REASON_CHARS] + "..."


def _error_message(body: bytes) -> str:
  """The `error.message` of an OpenAI-style error body, else the body itself."""
  text = body.decode("utf-8", errors="replace")
  try:
    error = json.loads(text).get("error")
    message = error.get("message") if isinstance(error, dict) else error
    if message:
      return _shorten(str(message))
  except (ValueError, AttributeError):
    pass
  return _shorten(text)


def _context_from_response(body: bytes) -> str:
  """The generated text of a chat-completions response body.

  Raises _Transient for a body that is not a chat completion (a proxy or server hiccup worth
  retrying) and GenerationError for a refusal or an empty answer.
  """
  try:
    choice = json.loads(body)["choices"][0]
    message = choice["message"]
    content = message.get("content")
  except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
    raise _Transient(f"malformed response body ({type(e).__name__}: {e}): "
                     f"{_shorten(body.decode('utf-8', errors='replace'))}") from None
  if message.get("refusal"):
    raise GenerationError(f"refused: {_shorten(str(message['refusal']))}")
  if choice.get("finish_reason") == "content_filter":
    raise GenerationError("refused: finish_reason=content_filter")
  if isinstance(content, list):  # Some servers return content parts.
    content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
  if not isinstance(content, str):
    raise _Transient(f"malformed response body: message content is {type(content).__name__}")
  content = content.strip()
  if not content:
    raise GenerationError(f"empty context (finish_reason={choice.get('finish_reason')})")
  return content


@dataclasses.dataclass(frozen=True)
class OpenAIConfig:
  """An OpenAI-compatible chat-completions endpoint.

  base_url: the API root, e.g. `http://localhost:8000/v1` (vLLM) or `https://api.openai.com/v1`.
  api_key_env: environment variable holding the key; when unset, no Authorization header is
    sent (local servers need none).
  timeout_s: seconds to wait for the connection and for each read of the answer.
  temperature: 0 makes the contexts reproducible (greedy decoding on vLLM).
  """
  base_url: str
  model: str
  api_key_env: str = "OPENAI_API_KEY"
  timeout_s: float = 120.0
  max_tokens: int = 512
  temperature: float = 0.0
  concurrency: int = 8
  retry: RetryPolicy = RetryPolicy()

  def __post_init__(self):
    scheme = urllib.parse.urlparse(self.base_url).scheme
    if scheme not in ("http", "https"):
      raise ValueError(f"base_url must be an http(s) URL, got {self.base_url!r}")
    if not self.model:
      raise ValueError("model must name the served model")
    if self.concurrency < 1 or self.timeout_s <= 0 or self.max_tokens < 1:
      raise ValueError(f"need concurrency >= 1, timeout_s > 0 and max_tokens >= 1 in {self}")


class OpenAIBackend:
  """Describes images one request at a time through a chat-completions endpoint."""

  batch_size = 1

  def __init__(self, config: OpenAIConfig, prompt: str = prompts.DEFAULT_PROMPT,
               generator: str | None = None, sleep: Callable[[float], None] = time.sleep,
               seed: int | None = None):
    self.config = config
    self.prompt = prompts.check_prompt(prompt)
    self.generator = generator or f"openai:{config.model}"
    self.concurrency = config.concurrency
    self.url = config.base_url.rstrip("/") + "/chat/completions"
    self._api_key = os.environ.get(config.api_key_env)
    self._sleep = sleep
    self._rng = random.Random(seed)

  def request_body(self, image: images_lib.LoadedImage) -> dict[str, Any]:
    """The chat-completions request for one image: the image first, as LLaVA was trained."""
    data_url = f"data:{image.mime};base64,{base64.b64encode(image.data).decode('ascii')}"
    return {
        "model": self.config.model,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url}},
            {"type": "text", "text": self.prompt},
        ]}],
        "max_tokens": self.config.max_tokens,
        "temperature": self.config.temperature,
    }

  def generate(self, batch: Sequence[images_lib.LoadedImage]) -> list[str | GenerationError]:
    return [self._describe_or_error(image) for image in batch]

  def _describe_or_error(self, image: images_lib.LoadedImage) -> str | GenerationError:
    try:
      return self.describe(image)
    except GenerationError as e:
      return e

  def describe(self, image: images_lib.LoadedImage) -> str:
    """The context of one image, retrying transient failures as the retry policy says."""
    body = json.dumps(self.request_body(image)).encode("utf-8")
    policy = self.config.retry
    for attempt in range(1, policy.max_attempts + 1):
      try:
        return _context_from_response(self._post(body))
      except _Transient as e:
        if attempt == policy.max_attempts:
          raise GenerationError(f"gave up after {attempt} attempt(s); last: {e}") from None
        delay = policy.delay(attempt, e.retry_after, self._rng)
        logging.debug("%s: attempt %d failed (%s); retrying in %.2fs", image.image_id, attempt, e,
                      delay)
        self._sleep(delay)
    raise AssertionError("unreachable: the last attempt returns or raises")

  def _post(self, body: bytes) -> bytes:
    """One attempt: the response body of a 2xx answer, else the matching exception."""
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if self._api_key:
      headers["Authorization"] = f"Bearer {self._api_key}"
    request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
    try:
      with urllib.request.urlopen(request, timeout=self.config.timeout_s) as response:
        return response.read()
    except urllib.error.HTTPError as e:
      status, message = e.code, _error_message(e.read())
      if status == 429 or status >= 500:
        raise _Transient(f"HTTP {status}: {message}", retry_after_of(e.headers)) from None
      if status in _FATAL_STATUSES:
        hint = f"; set ${self.config.api_key_env}" if status == 401 and not self._api_key else ""
        raise FatalBackendError(f"{self.url} answered HTTP {status} {_FATAL_STATUSES[status]}"
                                f"{hint}: {message}") from None
      raise GenerationError(f"HTTP {status}: {message}") from None
    except TimeoutError:
      raise _Transient(f"no answer within timeout_s={self.config.timeout_s}") from None
    except urllib.error.URLError as e:
      if isinstance(e.reason, TimeoutError):
        raise _Transient(f"no connection within timeout_s={self.config.timeout_s}") from None
      raise _Transient(f"connection failed: {e.reason}") from None
    except (http.client.HTTPException, OSError) as e:  # Reset, closed early, TLS errors.
      raise _Transient(f"connection broken: {type(e).__name__}: {e}") from None


@dataclasses.dataclass(frozen=True)
class TransformersConfig:
  """A local LLaVA-1.5 checkpoint folder in the transformers (`llava-hf`) layout.

  device: "auto" picks CUDA when available; dtype "auto" is float16 on CUDA, float32 on CPU.
  """
  model_dir: str
  batch_size: int = 8
  max_new_tokens: int = 512
  device: str = "auto"
  dtype: str = "auto"

  def __post_init__(self):
    if self.batch_size < 1 or self.max_new_tokens < 1:
      raise ValueError(f"need batch_size >= 1 and max_new_tokens >= 1 in {self}")


class TransformersBackend:
  """Describes a batch of images at once with a LLaVA model and its processor (greedy)."""

  concurrency = 1  # One model on one device: batches run one after another.

  def __init__(self, model: Any, processor: Any, prompt: str = prompts.DEFAULT_PROMPT, *,
               generator: str, batch_size: int = 8, max_new_tokens: int = 512):
    self.model = model
    self.processor = processor
    self.prompt = prompts.check_prompt(prompt)
    self.generator = generator
    self.batch_size = batch_size
    self.max_new_tokens = max_new_tokens
    # All prompts in a batch have one length (LLaVA-1.5 gives every image 576 tokens), but a
    # processor with other image sizes would pad, and decoder-only generation needs the padding
    # on the left.
    processor.tokenizer.padding_side = "left"
    conversation = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": self.prompt}]}]
    self.chat_text = processor.apply_chat_template(conversation, add_generation_prompt=True)

  @classmethod
  def from_pretrained(cls, config: TransformersConfig, prompt: str = prompts.DEFAULT_PROMPT,
                      generator: str | None = None) -> "TransformersBackend":
    """Loads model and processor from `config.model_dir` (needs torch; meant for a GPU)."""
    # Imported here: torch and the model code are only needed for this backend.
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top

    model_dir = pathlib.Path(config.model_dir)
    if not (model_dir / "config.json").is_file():
      raise ValueError(f"model_dir {model_dir} has no config.json (expected a llava-hf folder)")
    device = config.device
    if device == "auto":
      device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
      logging.warning("generating contexts with %s on the CPU: expect minutes per image", model_dir)
    dtype = config.dtype
    if dtype == "auto":
      dtype = "float32" if device == "cpu" else "float16"
    processor = transformers.AutoProcessor.from_pretrained(model_dir)
    model = transformers.LlavaForConditionalGeneration.from_pretrained(
        model_dir, dtype=getattr(torch, dtype)).to(device).eval()
    return cls(model, processor, prompt, generator=generator or f"transformers:{model_dir.name}",
               batch_size=config.batch_size, max_new_tokens=config.max_new_tokens)

  def generate(self, batch: Sequence[images_lib.LoadedImage]) -> list[str | GenerationError]:
    pictures = [Image.open(io.BytesIO(image.data)).convert("RGB") for image in batch]
    inputs = self.processor(images=pictures, text=[self.chat_text] * len(pictures),
                            padding=True, return_tensors="pt")
    inputs = inputs.to(self.model.device, self.model.dtype)
    try:
      tokens = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
    except RuntimeError as e:  # CUDA out of memory and other device failures.
      raise GenerationError(f"generation failed: {type(e).__name__}: {_shorten(str(e))}") from None
    new_tokens = tokens[:, inputs["input_ids"].shape[1]:]
    texts = self.processor.batch_decode(new_tokens, skip_special_tokens=True)
    return [text.strip() or GenerationError("empty context") for text in texts]
