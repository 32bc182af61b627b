"""Tests for shapca_jax.contextgen.backends.

The OpenAI backend talks to a real HTTP server on 127.0.0.1 (tests/fake_chat_server.py) that
answers from the image bytes it decodes, so a right answer proves the request was right. The
transformers backend runs a tiny randomly initialised LLaVA built here (no weights can be
downloaded); its batched output is compared with one-image-at-a-time greedy generation done
directly with transformers. Real LLaVA-1.5 weights are not exercised.
"""

import calendar
import io
import random
import socket
import time

import pytest
from PIL import Image

import fake_chat_server as fake
from shapca_jax.contextgen import backends
from shapca_jax.contextgen import images as images_lib

KEY_ENV = fake.KEY_ENV
PROMPT = fake.PROMPT
CLIENT_TIMEOUT_S = 0.3


@pytest.fixture(autouse=True)
def local_only(monkeypatch):
  fake.isolate_env(monkeypatch)


@pytest.fixture(scope="module")
def mnre_images(shared_data_dir):
  paths = sorted((shared_data_dir / "mnre" / "images").glob("*/*.jpg"))
  return [images_lib.LoadedImage(p.name, p.read_bytes(), "image/jpeg") for p in paths[:2]]


def serve(images, **kwargs):
  return fake.ChatServer({image.image_id: image.data for image in images}, PROMPT, **kwargs)


def openai_backend(url, max_attempts=4, backoff_base_s=0.01, sleep=time.sleep):
  config = backends.OpenAIConfig(
      base_url=url, model=fake.MODEL, api_key_env=KEY_ENV, timeout_s=CLIENT_TIMEOUT_S,
      concurrency=1, retry=backends.RetryPolicy(max_attempts, backoff_base_s, backoff_max_s=2.0))
  return backends.OpenAIBackend(config, PROMPT, sleep=sleep, seed=0)


def test_request_carries_model_prompt_key_and_image_bytes(mnre_images):
  image = mnre_images[0]
  with serve(mnre_images) as server:
    context = openai_backend(server.url).describe(image)
  assert context == fake.expected_context(image.data)
  assert server.actions() == ["ok"]


@pytest.mark.parametrize("script", [["429"], ["500", "503"], ["timeout"], ["drop"], ["malformed"],
                                    ["500", "timeout", "malformed"]])
def test_transient_failures_are_retried_until_an_answer(mnre_images, script):
  image = mnre_images[0]
  with serve(mnre_images, script={image.image_id: script}, retry_after="0") as server:
    context = openai_backend(server.url).describe(image)
  assert context == fake.expected_context(image.data)
  assert server.actions() == script + ["ok"]


def test_retry_after_is_honoured(mnre_images):
  image = mnre_images[0]
  with serve(mnre_images, script={image.image_id: ["429"]}, retry_after="0.4") as server:
    openai_backend(server.url, backoff_base_s=0.0).describe(image)
  first, second = server.attempts(image.image_id)
  assert second.start - first.end >= 0.4 - 0.02  # Clock granularity only.


def test_gives_up_after_max_attempts_with_the_last_reason(mnre_images):
  image = mnre_images[0]
  with serve(mnre_images, script={image.image_id: ["503"] * 3}) as server:
    with pytest.raises(backends.GenerationError, match="gave up after 3 attempt\\(s\\).*HTTP 503"):
      openai_backend(server.url, max_attempts=3).describe(image)
  assert server.actions() == ["503"] * 3


@pytest.mark.parametrize("action,match", [("400", "HTTP 400: scripted 400"),
                                          ("refuse", "refused: finish_reason=content_filter")])
def test_client_errors_and_refusals_are_not_retried(mnre_images, action, match):
  image = mnre_images[0]
  with serve(mnre_images, script={image.image_id: [action]}) as server:
    with pytest.raises(backends.GenerationError, match=match):
      openai_backend(server.url).describe(image)
  assert server.actions() == [action]


def test_unauthorised_is_fatal_and_not_retried(mnre_images):
  image = mnre_images[0]
  with serve(mnre_images, script={image.image_id: ["401"]}) as server:
    with pytest.raises(backends.FatalBackendError, match="HTTP 401"):
      openai_backend(server.url).describe(image)
  assert server.actions() == ["401"]


def test_no_authorization_header_without_the_key_variable(mnre_images, monkeypatch):
  monkeypatch.delenv(KEY_ENV)
  with serve(mnre_images) as server:
    with pytest.raises(backends.GenerationError, match="HTTP 422.*authorization None"):
      openai_backend(server.url).describe(mnre_images[0])


def test_refused_connection_is_retried_with_growing_backoff(mnre_images):
  with socket.socket() as probe:  # A port that nothing listens on once closed.
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
  delays = []
  backend = openai_backend(f"http://127.0.0.1:{port}/v1", max_attempts=4, backoff_base_s=1.0,
                           sleep=delays.append)
  with pytest.raises(backends.GenerationError, match="gave up after 4 attempt\\(s\\).*connection"):
    backend.describe(mnre_images[0])
  assert len(delays) == 3
  for attempt, delay in enumerate(delays, start=1):
    ceiling = min(2.0, 1.0 * 2 ** (attempt - 1))  # backoff_max_s=2 in openai_backend().
    assert ceiling / 2 <= delay <= ceiling


def test_generate_reports_failures_per_image(mnre_images):
  good, bad = mnre_images
  with serve(mnre_images, script={bad.image_id: ["400"]}) as server:
    outcomes = openai_backend(server.url).generate([good, bad])
  assert outcomes[0] == fake.expected_context(good.data)
  assert isinstance(outcomes[1], backends.GenerationError)


@pytest.mark.parametrize("attempt", range(1, 9))
def test_backoff_delay_stays_within_the_equal_jitter_bounds(attempt):
  policy = backends.RetryPolicy(max_attempts=10, backoff_base_s=0.5, backoff_max_s=20.0)
  ceiling = min(20.0, 0.5 * 2 ** (attempt - 1))
  rng = random.Random(attempt)
  delays = [policy.delay(attempt, None, rng) for _ in range(200)]
  assert all(ceiling / 2 <= d <= ceiling for d in delays)
  assert max(delays) - min(delays) > ceiling / 4  # Jittered, not constant.


def test_backoff_delay_follows_retry_after_up_to_the_maximum():
  policy = backends.RetryPolicy(backoff_base_s=0.5, backoff_max_s=20.0)
  rng = random.Random(0)
  assert policy.delay(1, 7.5, rng) == 7.5
  assert policy.delay(1, 3600.0, rng) == 20.0


def test_parse_retry_after():
  assert backends.parse_retry_after("7") == 7.0
  assert backends.parse_retry_after(" 1.5 ") == 1.5
  assert backends.parse_retry_after("-3") == 0.0
  date = "Wed, 21 Oct 2015 07:28:00 GMT"
  then = calendar.timegm((2015, 10, 21, 7, 28, 0, 0, 0, 0))
  assert backends.parse_retry_after(date, now=then - 10) == pytest.approx(10.0)
  assert backends.parse_retry_after(date, now=then + 10) == 0.0
  assert backends.parse_retry_after("soon") is None
  assert backends.parse_retry_after(None) is None


def test_retry_after_ms_takes_precedence():
  assert backends.retry_after_of({"retry-after-ms": "250", "Retry-After": "9"}) == 0.25
  assert backends.retry_after_of({"retry-after-ms": "x", "Retry-After": "9"}) == 9.0
  assert backends.retry_after_of({}) is None


@pytest.mark.parametrize("kwargs,match", [({"base_url": "localhost:8000/v1"}, "http"),
                                          ({"model": ""}, "model"),
                                          ({"concurrency": 0}, "concurrency")])
def test_openai_config_rejects_bad_values(kwargs, match):
  with pytest.raises(ValueError, match=match):
    backends.OpenAIConfig(**{"base_url": "http://127.0.0.1:1/v1", "model": "m"} | kwargs)


def test_retry_policy_rejects_bad_values():
  with pytest.raises(ValueError, match="max_attempts"):
    backends.RetryPolicy(max_attempts=0)
  with pytest.raises(ValueError, match="backoff"):
    backends.RetryPolicy(backoff_base_s=5.0, backoff_max_s=1.0)


# --- transformers backend, on a tiny random LLaVA --------------------------------------------

@pytest.fixture(scope="module")
def tiny_llava(minilm_dir):
  """A 1-layer LLaVA (CLIP vision tower + Llama) with random weights, and its processor.

  The MiniLM tokenizer stands in for LLaVA's (plus the `<image>` token); 28-pixel images give
  4 image tokens.
  """
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir)
  tokenizer.model_input_names = ["input_ids", "attention_mask"]  # As LLaVA's Llama tokenizer.
  tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
  chat_template = ("{% for m in messages %}USER: {% for c in m['content'] %}"
                   "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}"
                   "{% endfor %}{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}")
  processor = transformers.LlavaProcessor(
      image_processor=transformers.CLIPImageProcessor(
          size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}),
      tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
      num_additional_image_tokens=1, chat_template=chat_template)
  config = transformers.LlavaConfig(
      vision_config=transformers.CLIPVisionConfig(
          hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
          image_size=28, patch_size=14, projection_dim=16),
      text_config=transformers.LlamaConfig(
          hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
          num_key_value_heads=2, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
          bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id),
      image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
      vision_feature_select_strategy="default", vision_feature_layer=-1)
  torch.manual_seed(0)
  return transformers.LlavaForConditionalGeneration(config).eval(), processor


@pytest.fixture(scope="module")
def four_images(shared_data_dir):
  paths = sorted((shared_data_dir / "mnre" / "images").glob("*/*.jpg"))[:4]
  return [images_lib.LoadedImage(p.name, p.read_bytes(), "image/jpeg") for p in paths]


def one_at_a_time(model, processor, image, max_new_tokens):
  """Greedy generation for one image, written out with transformers directly."""
  conversation = [{"role": "user", "content": [{"type": "image"},
                                               {"type": "text", "text": PROMPT}]}]
  text = processor.apply_chat_template(conversation, add_generation_prompt=True)
  inputs = processor(images=Image.open(io.BytesIO(image.data)).convert("RGB"), text=text,
                     return_tensors="pt")
  tokens = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
  return processor.decode(tokens[0, inputs["input_ids"].shape[1]:],
                          skip_special_tokens=True).strip()


def test_transformers_batch_matches_one_image_at_a_time(tiny_llava, four_images):
  model, processor = tiny_llava
  backend = backends.TransformersBackend(model, processor, PROMPT, generator="transformers:tiny",
                                         batch_size=4, max_new_tokens=6)
  expected = [one_at_a_time(model, processor, image, 6) for image in four_images]
  assert len(set(expected)) > 1  # Else the comparison could not see a mixed-up order.
  assert backend.generate(four_images) == expected


def test_transformers_from_pretrained_loads_a_llava_hf_folder(tiny_llava, four_images, tmp_path):
  model, processor = tiny_llava
  model.save_pretrained(tmp_path)
  processor.save_pretrained(tmp_path)
  backend = backends.TransformersBackend.from_pretrained(
      backends.TransformersConfig(str(tmp_path), batch_size=2, max_new_tokens=3, device="cpu"),
      PROMPT)
  assert backend.generator == f"transformers:{tmp_path.name}"
  assert backend.batch_size == 2 and backend.concurrency == 1
  assert backend.generate(four_images[:2]) == [
      one_at_a_time(model, processor, image, 3) for image in four_images[:2]]


def test_transformers_device_failure_fails_the_batch(tiny_llava, four_images, monkeypatch):
  model, processor = tiny_llava
  backend = backends.TransformersBackend(model, processor, PROMPT, generator="t", max_new_tokens=2)

  def out_of_memory(**kwargs):
    raise RuntimeError("CUDA out of memory")

  monkeypatch.setattr(model, "generate", out_of_memory)
  with pytest.raises(backends.GenerationError, match="CUDA out of memory"):
    backend.generate(four_images[:2])


def test_transformers_rejects_a_folder_without_config(tmp_path):
  with pytest.raises(ValueError, match="config.json"):
    backends.TransformersBackend.from_pretrained(backends.TransformersConfig(str(tmp_path)))
