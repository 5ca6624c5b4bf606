"""The door to the fused operations (docs/architecture.md, "Rooms").

Model code calls these functions only. Each picks the compiled kernel from
`megatron_qwen2._C` (registered as torch custom ops in `library.py`) when it is built and the
inputs live on CUDA, else the plain-PyTorch reference in `reference.py`, which is the definition
every kernel is tested against. MEGATRON_QWEN2_OPS=reference|kernel|auto forces the choice
(extension.py).
"""

from megatron_qwen2.ops.attention import (PackedDocuments, attention, document_bounds, document_ranges,
                                          flash_attention_backward, flash_attention_forward, packed_documents)
from megatron_qwen2.ops.cross_entropy import cross_entropy
from megatron_qwen2.ops.moe_permute import permute, unpermute
from megatron_qwen2.ops.rms_norm import add_rms_norm, add_rms_norm_fp8, rms_norm, rms_norm_fp8
from megatron_qwen2.ops.rope import rope
from megatron_qwen2.ops.swiglu import swiglu, swiglu_fp8

__all__ = ["PackedDocuments", "add_rms_norm", "add_rms_norm_fp8", "attention", "cross_entropy", "document_bounds",
           "document_ranges", "flash_attention_backward", "flash_attention_forward", "packed_documents", "permute",
           "rms_norm", "rms_norm_fp8", "rope", "swiglu", "swiglu_fp8", "unpermute"]
