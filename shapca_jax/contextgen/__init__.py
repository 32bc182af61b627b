"""Context generation: describe images with a large multimodal model, resumably and at scale.

The Image-Context-Text paradigm needs a context (a descriptive text) per image. `runner`
drives a backend (`backends`: an OpenAI-compatible server or a local LLaVA-1.5) over the images
(`images`), appending `{"image_id", "context", "generator", "prompt_sha"}` lines to a JSONL file
(`store`) that the data layer reads. `experiments/generate_contexts.py` is the command line.
"""
