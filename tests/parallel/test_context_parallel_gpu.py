"""Context parallelism's block attention on the GPU: the fused kernel pair (KernelBlockAttention,
chosen on CUDA) against the PyTorch definition (MathBlockAttention) on the blocks a ring step
computes — a rank's own causal block and a later query chunk against an earlier K/V chunk — with
packed documents crossing the chunk border, GQA, outputs, log-sum-exp and gradients."""

import pytest
import torch

from megatron_qwen2.parallel.cp import (MATH_BLOCK_ATTENTION, BlockMask, KernelBlockAttention,
                                        default_block_attention)

pytestmark = pytest.mark.gpu


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("docs", [False, True])
def test_kernel_block_matches_math_block(causal, docs):
    torch.manual_seed(0)
    b, s, hq, hkv, d = 2, 192, 14, 2, 128
    sk = s if causal else 160
    q = torch.randn(b, s, hq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, sk, hkv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(b, sk, hkv, d, device="cuda", dtype=torch.bfloat16)
    qpos = torch.arange(s, device="cuda") + (0 if causal else 1000)  # a later chunk sees all of an earlier one
    kpos = torch.arange(sk, device="cuda")
    qdoc = kdoc = None
    if docs:  # documents run across the border: the K/V chunk's last document continues into the queries
        kdoc = (torch.arange(sk, device="cuda") // 50).expand(b, sk).contiguous()
        qdoc = (kdoc[:, -1:] + torch.arange(s, device="cuda") // 70).contiguous()
        if causal:
            qdoc = kdoc
    mask = BlockMask(qpos, kpos, qdoc, kdoc, causal)
    kernel = default_block_attention(q)
    assert isinstance(kernel, KernelBlockAttention)
    scale = d ** -0.5
    out_k, lse_k = kernel.forward(q, k, v, mask, scale)
    out_m, lse_m = MATH_BLOCK_ATTENTION.forward(q, k, v, mask, scale)
    seen = torch.isfinite(lse_m)
    assert torch.equal(torch.isfinite(lse_k), seen)
    assert rel(out_k.float(), out_m) < 1e-2
    assert (lse_k[seen] - lse_m[seen]).abs().max().item() < 2e-2
    do = torch.randn_like(q)
    out = out_m.to(q.dtype)  # the merged output and lse a ring would hand to every block's backward
    lse = torch.where(seen, lse_m, torch.zeros_like(lse_m))
    grads_k = kernel.backward(do, q, k, v, out, lse, mask, scale)
    grads_m = MATH_BLOCK_ATTENTION.backward(do, q, k, v, out, torch.where(seen, lse_m, torch.full_like(lse_m, 1e30)),
                                            mask, scale)
    for name, gk, gm in zip(("dq", "dk", "dv"), grads_k, grads_m):
        assert rel(gk.float(), gm) < 2e-2, name
