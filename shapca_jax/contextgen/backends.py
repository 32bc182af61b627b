"""Multimodal models that turn an image into a context: an OpenAI-compatible server or LLaVA.

A backend describes a batch of images with one prompt. `generator` names it in the output,
`batch_size` is how many images one `generate` call takes and `concurrency` how many calls may
run at once. A backend is an async context manager that holds what a run needs open (the HTTP
client), and `generate` a coroutine that returns, per image, its context or the
`GenerationError` that says why it has none; it raises `GenerationError` when the whole batch
failed, and `FatalBackendError` when no request can succeed (bad key, wrong URL or model),
which stops the run.

- `OpenAIBackend`: any chat-completions endpoint (vLLM or SGLang serving LLaVA-1.5, or a hosted
  GPT-4-class model) through the `openai` package's async client. One image per request, sent
  as a base64 data URL. The client retries connection errors, timeouts, 408, 409, 429 and 5xx
  up to `max_retries` times with exponential backoff, waiting what Retry-After (or
  retry-after-ms) asks for up to two minutes; a 200 whose body is not a chat completion is
  retried here, at once, from the same budget. 401/403/404 are fatal, other 4xx fail the image.
- `TransformersBackend`: a local LLaVA-1.5 checkpoint folder (`llava-hf` layout) through
  transformers + torch, generating a batch at once (greedy decoding).
"""

import base64
import dataclasses
import io
import logging
import os
import pathlib
import urllib.parse
from collections.abc import Sequence
from typing import Any, Protocol, Self

import openai
from PIL import Image

from shapca_jax.contextgen import images as images_lib
from shapca_jax.contextgen import prompts

# Statuses that say the request itself is refused for good, whatever the image.
_FATAL_STATUSES = {401: "unauthorised (is the API key right?)", 403: "forbidden",
                   404: "not found (check the base URL and the model name)"}
_MAX_REASON_CHARS = 300
# The openai client needs some key; without one, its Authorization header is left out.
_NO_KEY = "no-key"


class GenerationError(Exception):
  """The images of one `generate` call got no context; the message is the reason."""


class FatalBackendError(Exception):
  """The backend cannot describe any image (bad key, wrong URL or model): stop the run."""


class Backend(Protocol):
  generator: str
  prompt: str
  batch_size: int
  concurrency: int

  async def __aenter__(self) -> Self:
    """Opens what `generate` needs, for one run."""

  async def __aexit__(self, *exc_info) -> None:
    """Closes it."""

  async def generate(self, batch: Sequence[images_lib.LoadedImage]
                     ) -> list[str | GenerationError]:
    """Per image of `batch`, in order, its context or the reason it has none."""


def _shorten(text: str) -> str:
  text = " ".join(text.split())
  return text if len(text) <= _MAX_REASON_CHARS else text[:_MAX_REASON_CHARS] + "..."


class _MalformedResponse(Exception):
  """A 200 whose body is not a chat completion (a proxy or server hiccup worth retrying)."""


def _context_of(response: Any) -> str:
  """The generated text of a raw chat-completions response.

  Raises _MalformedResponse for a body that is not a chat completion and GenerationError for a
  refusal or an empty answer.
  """
  try:
    choice = response.parse().choices[0]
    message = choice.message
    content = message.content
  except (ValueError, AttributeError, IndexError, TypeError) as e:
    raise _MalformedResponse(f"malformed response body ({type(e).__name__}: {e}): "
                             f"{_shorten(response.text)}") from None
  if getattr(message, "refusal", None):
    raise GenerationError(f"refused: {_shorten(str(message.refusal))}")
  if choice.finish_reason == "content_filter":
    raise GenerationError("refused: finish_reason=content_filter")
  if isinstance(content, list):  # Some servers return content parts.
    content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
  if not isinstance(content, str):
    raise _MalformedResponse(f"malformed response body: message content is "
                             f"{type(content).__name__}")
  content = content.strip()
  if not content:
    raise GenerationError(f"empty context (finish_reason={choice.finish_reason})")
  return content


def _status_message(error: openai.APIStatusError) -> str:
  """The `error.message` of an OpenAI-style error body, else the body itself."""
  body = error.body
  message = body.get("message") if isinstance(body, dict) else body
  return _shorten(str(message or error.response.text))


def _retries_taken(error: openai.APIError) -> int:
  """How often the client retried the request that ended in `error` (it numbers its tries)."""
  request = getattr(error, "request", None)
  try:
    return int(request.headers.get("x-stainless-retry-count", 0)) if request else 0
  except ValueError:
    return 0


@dataclasses.dataclass(frozen=True)
class OpenAIConfig:
  """An OpenAI-compatible chat-completions endpoint.

  base_url: the API root, e.g. `http://localhost:8000/v1` (vLLM) or `https://api.openai.com/v1`.
  api_key_env: environment variable holding the key; when unset, no Authorization header is
    sent (local servers need none).
  timeout_s: seconds to wait for the connection, and for each read or write.
  max_retries: retries per image after its first request (the client's `max_retries`).
  temperature: 0 makes the contexts reproducible (greedy decoding on vLLM).
  """
  base_url: str
  model: str
  api_key_env: str = "OPENAI_API_KEY"
  timeout_s: float = 120.0
  max_retries: int = 5
  max_tokens: int = 512
  temperature: float = 0.0
  concurrency: int = 8

  def __post_init__(self):
    scheme = urllib.parse.urlparse(self.base_url).scheme
    if scheme not in ("http", "https"):
      raise ValueError(f"base_url must be an http(s) URL, got {self.base_url!r}")
    if not self.model:
      raise ValueError("model must name the served model")
    if (self.concurrency < 1 or self.timeout_s <= 0 or self.max_tokens < 1
        or self.max_retries < 0):
      raise ValueError("need concurrency >= 1, timeout_s > 0, max_tokens >= 1 and "
                       f"max_retries >= 0 in {self}")


class OpenAIBackend:
  """Describes images one request at a time through a chat-completions endpoint."""

  batch_size = 1

  def __init__(self, config: OpenAIConfig, prompt: str = prompts.DEFAULT_PROMPT,
               generator: str | None = None):
    self.config = config
    self.prompt = prompts.check_prompt(prompt)
    self.generator = generator or f"openai:{config.model}"
    self.concurrency = config.concurrency
    self._api_key = os.environ.get(config.api_key_env)
    self._client: openai.AsyncOpenAI | None = None

  async def __aenter__(self) -> Self:
    # One client per run: its connection pool belongs to the event loop of the run.
    self._client = openai.AsyncOpenAI(
        base_url=self.config.base_url, api_key=self._api_key or _NO_KEY,
        timeout=self.config.timeout_s, max_retries=self.config.max_retries)
    return self

  async def __aexit__(self, *exc_info) -> None:
    await self._client.close()
    self._client = None

  def request(self, image: images_lib.LoadedImage) -> dict[str, Any]:
    """The chat-completions arguments for one image: the image first, as LLaVA was trained."""
    data_url = f"data:{image.mime};base64,{base64.b64encode(image.data).decode('ascii')}"
    return {
        "model": self.config.model,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url}},
            {"type": "text", "text": self.prompt},
        ]}],
        "max_tokens": self.config.max_tokens,
        "temperature": self.config.temperature,
        "extra_headers": {} if self._api_key else {"Authorization": openai.Omit()},
    }

  async def generate(self, batch: Sequence[images_lib.LoadedImage]
                     ) -> list[str | GenerationError]:
    return [await self._describe_or_error(image) for image in batch]

  async def _describe_or_error(self, image: images_lib.LoadedImage) -> str | GenerationError:
    try:
      return await self.describe(image)
    except GenerationError as e:
      return e

  async def describe(self, image: images_lib.LoadedImage) -> str:
    """The context of one image, within `max_retries` retries."""
    retries_left, attempts = self.config.max_retries, 0
    while True:
      client = self._client.with_options(max_retries=retries_left)
      try:
        response = await client.chat.completions.with_raw_response.create(**self.request(image))
      except openai.APIStatusError as e:
        status, message = e.status_code, _status_message(e)
        if status in _FATAL_STATUSES:
          hint = f"; set ${self.config.api_key_env}" if status == 401 and not self._api_key else ""
          raise FatalBackendError(f"{self.config.base_url} answered HTTP {status} "
                                  f"{_FATAL_STATUSES[status]}{hint}: {message}") from None
        attempts += _retries_taken(e) + 1
        raise GenerationError(self._gave_up(attempts, f"HTTP {status}: {message}")) from None
      except openai.APIConnectionError as e:  # Timeouts included (APITimeoutError).
        attempts += _retries_taken(e) + 1
        cause = e.__cause__ or e
        reason = (f"no answer within timeout_s={self.config.timeout_s}"
                  if isinstance(e, openai.APITimeoutError)
                  else f"connection failed: {type(cause).__name__}: {cause}")
        raise GenerationError(self._gave_up(attempts, reason)) from None
      attempts += response.retries_taken + 1
      retries_left -= response.retries_taken
      try:
        return _context_of(response)
      except _MalformedResponse as e:
        if not retries_left:
          raise GenerationError(self._gave_up(attempts, str(e))) from None
        logging.debug("%s: attempt %d: %s; retrying", image.image_id, attempts, e)
        retries_left -= 1

  @staticmethod
  def _gave_up(attempts: int, reason: str) -> str:
    return f"gave up after {attempts} attempt(s); last: {reason}" if attempts > 1 else reason


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
  """Describes a batch of images at once with a LLaVA model and its processor (greedy).

  `generate` blocks the event loop while the model runs: with one model on one device nothing
  else has to run beside it, and Ctrl-C stops the generation at once.
  """

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

  async def __aenter__(self) -> Self:
    return self

  async def __aexit__(self, *exc_info) -> None:
    pass

  async def generate(self, batch: Sequence[images_lib.LoadedImage]
                     ) -> list[str | GenerationError]:
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
