"""Parallel layout: topology, communication autograd functions, tensor-parallel layers."""

from megatron_qwen2.parallel.topology import Topology

__all__ = ["Topology"]
