"""Package metadata for llava: a two-stage LLaVA training codebase."""

from setuptools import find_packages, setup

setup(
    name="llava",
    version="0.1.0",
    description="Train LLaVA-style vision-language models: any CLIP-like tower, any causal LM.",
    packages=find_packages(include=["llava", "llava.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",
        # Two supported lines: the default install resolves to the newest 5.x; the habana extra's
        # optimum-habana pins 4.55 (and its accelerate) in the Gaudi environment.
        "transformers>=4.55,<6",
        # 1.13 and later count a DeepSpeed run without GPUs as one process (wrong batch sizes):
        # the CPU runs of the tests and the demo need the 1.12 line.
        "accelerate>=1.0,<1.13",
        "deepspeed>=0.16",
        "peft>=0.13",
        "open_clip_torch>=2.26",
        "pillow",
        "einops",
        "sentencepiece",
        "protobuf",
        "safetensors",
        "numpy",
        "datasets>=2.19",  # local Hugging Face datasets (save_to_disk folders, parquet)
        "av>=12",  # PyAV: video records' frames (wheels carry their own FFmpeg)
    ],
    extras_require={
        "habana": ["optimum-habana>=1.21,<1.22"],
        # num2words: SmolVLM's processor imports it (the tiny SmolVLM in the tests needs it).
        "dev": ["pytest>=8", "ruff>=0.6", "scikit-learn", "matplotlib", "num2words"],
        # `python -m llava.bench --stage vlm` compares against TRL's SFTTrainer. Kept out of
        # dev: TRL needs transformers>=4.56.2, which the habana line (4.55) cannot have; the
        # benchmark says so when it is missing and its tests skip.
        "bench": ["trl>=1.16,<2"],
    },
)
