"""Tests for shapca_jax.contextgen.backends.

The OpenAI backend (the openai package's client) talks to a real HTTP server on 127.0.0.1
(tests/fake_chat_server.py) that answers from the image bytes it decodes, so a right answer
proves the request was right. The transformers backend runs a tiny randomly initialised LLaVA
built here (no weights can be downloaded); its batched output is compared with
one-image-at-a-time greedy generation done directly with transformers. Real LLaVA-1.5 weights
are not exercised.
"""

import asyncio
import io
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


def openai_backend(url, max_retries=3):
  config = backends.OpenAIConfig(base_url=url, model=fake.MODEL, api_key_env=KEY_ENV,
                                 timeout_s=CLIENT_TIMEOUT_S, max_retries=max_retries,
                                 concurrency=1)
  return backends.OpenAIBackend(config, PROMPT)


def describe(backend, image):
  """`backend.describe(image)` in a run of its own."""
  async def run():
    async with backend:
      return await backend.describe(image)
  return asyncio.run(run())


def generate(backend, images):
  """`backend.generate(images)` in a run of its own."""
  async def run():
    async with backend:
      return await backend.generate(images)
  return asyncio.run(run())


def test_request_carries_model_prompt_key_and_image_bytes(mnre_images):
  image = mnre_images[0]
  with serve(mnre_images) as server:
    context = describe(openai_backend(server.url), image)
  assert context == fake.expected_context(image.data)
  assert server.actions() == ["ok"]


@pytest.mark.parametrize("script", [["429"], ["500", "503"], ["timeout"], ["drop"], ["malformed"],
                                    ["500", "timeout", "malformed"]])
def test_transient_failures_are_retried_until_an_answer(mnre_images, script):
  image = mnre_images[0]
  with serve(mnre_images, script={image.image_id: script}, retry_after="0") as server:
    context = describe(openai_backend(server.url), image)
  assert context == fake.expected_context(image.data)
  assert server.actions() == script + ["ok"]


def test_retry_after_is_honoured(mnre_images):
  image = mnre_images[0]
  with serve(mnre_images, script={image.image_id: ["429"]}, retry_after="0.4") as server:
    describe(openai_backend(server.url), image)
  first, second = server.attempts(image.image_id)
  assert second.start - first.end >= 0.4 - 0.02  # Clock granularity only.


# Malformed bodies, retried here, and the client's own retries share one budget.
@pytest.mark.parametrize("script,last", [(["503"] * 3, "HTTP 503"),
                                         (["malformed", "503", "503"], "HTTP 503"),
                                         (["503", "malformed", "503"], "HTTP 503"),
                                         (["503", "503", "malformed"], "malformed response")])
def test_gives_up_after_max_retries_with_the_last_reason(mnre_images, script, last):
  image = mnre_images[0]
  with serve(mnre_images, script={image.image_id: script}, retry_after="0") as server:
    with pytest.raises(backends.GenerationError, match=f"gave up after 3 attempt\\(s\\).*{last}"):
      describe(openai_backend(server.url, max_retries=2), image)
  assert server.actions() == script


@pytest.mark.parametrize("action,match", [("400", "HTTP 400: scripted 400"),
                                          ("refuse", "refused: finish_reason=content_filter")])
def test_client_errors_and_refusals_are_not_retried(mnre_images, action, match):
  image = mnre_images[0]
  with serve(mnre_images, script={image.image_id: [action]}) as server:
    with pytest.raises(backends.GenerationError, match=match):
      describe(openai_backend(server.url), image)
  assert server.actions() == [action]


def test_unauthorised_is_fatal_and_not_retried(mnre_images):
  image = mnre_images[0]
  with serve(mnre_images, script={image.image_id: ["401"]}) as server:
    with pytest.raises(backends.FatalBackendError, match="HTTP 401"):
      describe(openai_backend(server.url), image)
  assert server.actions() == ["401"]


def test_no_authorization_header_without_the_key_variable(mnre_images, monkeypatch):
  monkeypatch.delenv(KEY_ENV)
  with serve(mnre_images) as server:
    with pytest.raises(backends.GenerationError, match="HTTP 422.*authorization None"):
      describe(openai_backend(server.url), mnre_images[0])


def test_refused_connection_is_retried_then_reported(mnre_images):
  with socket.socket() as probe:  # A port that nothing listens on once closed.
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
  backend = openai_backend(f"http://127.0.0.1:{port}/v1", max_retries=3)
  start = time.monotonic()
  with pytest.raises(backends.GenerationError, match="gave up after 4 attempt\\(s\\).*connection"):
    describe(backend, mnre_images[0])
  assert time.monotonic() - start > 1.0  # The client backed off between the attempts.


def test_generate_reports_failures_per_image(mnre_images):
  good, bad = mnre_images
  with serve(mnre_images, script={bad.image_id: ["400"]}) as server:
    outcomes = generate(openai_backend(server.url), [good, bad])
  assert outcomes[0] == fake.expected_context(good.data)
  assert isinstance(outcomes[1], backends.GenerationError)


@pytest.mark.parametrize("kwargs,match", [({"base_url": "localhost:8000/v1"}, "http"),
                                          ({"model": ""}, "model"),
                                          ({"concurrency": 0}, "concurrency"),
                                          ({"max_retries": -1}, "max_retries")])
def test_openai_config_rejects_bad_values(kwargs, match):
  with pytest.raises(ValueError, match=match):
    backends.OpenAIConfig(**{"base_url": "http://127.0.0.1:1/v1", "model": "m"} | kwargs)


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
  assert generate(backend, four_images) == expected


def test_transformers_from_pretrained_loads_a_llava_hf_folder(tiny_llava, four_images, tmp_path):
  model, processor = tiny_llava
  model.save_pretrained(tmp_path)
  processor.save_pretrained(tmp_path)
  backend = backends.TransformersBackend.from_pretrained(
      backends.TransformersConfig(str(tmp_path), batch_size=2, max_new_tokens=3, device="cpu"),
      PROMPT)
  assert backend.generator == f"transformers:{tmp_path.name}"
  assert backend.batch_size == 2 and backend.concurrency == 1
  assert generate(backend, four_images[:2]) == [
      one_at_a_time(model, processor, image, 3) for image in four_images[:2]]


def test_transformers_device_failure_fails_the_batch(tiny_llava, four_images, monkeypatch):
  model, processor = tiny_llava
  backend = backends.TransformersBackend(model, processor, PROMPT, generator="t", max_new_tokens=2)

  def out_of_memory(**kwargs):
    raise RuntimeError("CUDA out of memory")

  monkeypatch.setattr(model, "generate", out_of_memory)
  with pytest.raises(backends.GenerationError, match="CUDA out of memory"):
    generate(backend, four_images[:2])


def test_transformers_rejects_a_folder_without_config(tmp_path):
  with pytest.raises(ValueError, match="config.json"):
    backends.TransformersBackend.from_pretrained(backends.TransformersConfig(str(tmp_path)))
