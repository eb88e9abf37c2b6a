"""llava: train LLaVA-style vision-language models from a CLIP-like tower and any causal LM."""

__version__ = "0.1.0"
