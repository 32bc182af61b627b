"""The instruction sent with every image, and the fingerprint stored beside each context.

Our choice of default is the first of LLaVA's detailed-description instructions (Liu et al.,
"Visual Instruction Tuning", 2023, the list behind the detail_23k data that LLaVA-1.5 keeps):
it asks for the long, object-by-object description the Image-Context-Text paradigm needs.
The paper does not publish its prompt, so this is a reconstruction; pass another prompt to
compare.
"""

import hashlib

DEFAULT_PROMPT = "Describe the following image in detail."


def prompt_sha(prompt: str) -> str:
  """SHA-256 (hex) of the prompt's UTF-8 text: tells contexts made with different prompts apart."""
  return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


def check_prompt(prompt: str) -> str:
  """Returns the prompt unchanged, or raises ValueError when it is blank."""
  if not prompt.strip():
    raise ValueError("the context prompt is empty")
  return prompt
