"""Qwen2 dense and MoE models."""

from megatron_qwen2.model.qwen2 import LossOutput, Qwen2Model

__all__ = ["LossOutput", "Qwen2Model"]
