"""The door to the fused operations (DESIGN principle 5).

Model code calls these functions only. Each picks the compiled kernel from
`megatron_qwen2._C` when it is built and the inputs live on CUDA, else the plain-PyTorch
reference in `reference.py`, which is the definition every kernel is tested against.
"""

from megatron_qwen2.ops.attention import attention
from megatron_qwen2.ops.rms_norm import rms_norm
from megatron_qwen2.ops.rope import rope
from megatron_qwen2.ops.swiglu import swiglu

__all__ = ["attention", "rms_norm", "rope", "swiglu"]
