"""Megatron-style 3D-parallel training for the Qwen2 model family."""

__version__ = "0.1.0"
