"""Tests for shapca_jax.contextgen.prompts."""

import pytest

from shapca_jax.contextgen import prompts


def test_default_prompt_is_llavas_first_detailed_description_instruction():
  assert prompts.DEFAULT_PROMPT == "Describe the following image in detail."


def test_prompt_sha_matches_the_published_sha256_test_vector():
  # FIPS 180-2, appendix B.1: SHA-256("abc").
  assert prompts.prompt_sha("abc") == (
      "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")


def test_prompt_sha_tells_prompts_apart():
  assert prompts.prompt_sha(prompts.DEFAULT_PROMPT) != prompts.prompt_sha(
      prompts.DEFAULT_PROMPT + " ")


@pytest.mark.parametrize("prompt", ["", "  \n\t"])
def test_blank_prompt_is_refused(prompt):
  with pytest.raises(ValueError, match="empty"):
    prompts.check_prompt(prompt)
