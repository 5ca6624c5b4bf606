"""The parallel building blocks the model is written on: topology, communication autograd functions,
tensor-parallel layers, context-parallel attention, expert dispatch."""

from megatron_qwen2.parallel.topology import Topology

__all__ = ["Topology"]
