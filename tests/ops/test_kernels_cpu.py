"""The reference definitions of the kernels' ops on the CPU (what every kernel is tested
against), the doors' input checks, the implementation switch and the custom-op registration."""

import pytest
import torch

from megatron_qwen2 import ops
from megatron_qwen2.ops import extension, library, reference


def _routing(tokens, k, experts, gen):
    return torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)])


@pytest.mark.parametrize("tokens,k,experts", [(1, 1, 1), (6, 2, 8), (13, 4, 64), (9, 3, 3)])
def test_permute_reference_groups_by_expert(tokens, k, experts):
    gen = torch.Generator().manual_seed(tokens * 7 + k)
    x = torch.randn(tokens, 5, dtype=torch.float64, generator=gen)
    routing = _routing(tokens, k, experts, gen)
    permuted, row_map, counts = ops.permute(x, routing, experts)
    assert permuted.shape == (tokens * k, 5) and row_map.dtype == torch.int32 and counts.shape == (experts,)
    assert counts.tolist() == [int((routing == e).sum()) for e in range(experts)]
    # by hand: walk experts in order, tokens in order, choices in order
    rows = [(t, j) for e in range(experts) for t in range(tokens) for j in range(k) if routing[t, j] == e]
    for i, (t, j) in enumerate(rows):
        assert row_map[t, j] == i
        assert torch.equal(permuted[i], x[t])


def test_unpermute_reference_and_gradients():
    gen = torch.Generator().manual_seed(0)
    tokens, k, experts, h = 7, 3, 5, 4
    routing = _routing(tokens, k, experts, gen)
    x = torch.randn(tokens, h, dtype=torch.float64, requires_grad=True)
    probs = torch.rand(tokens, k, dtype=torch.float64, generator=gen, requires_grad=True)
    permuted, row_map, _ = ops.permute(x, routing, experts)
    y = ops.unpermute(permuted * 2.0, row_map, probs)
    torch.testing.assert_close(y, 2.0 * x * probs.sum(1, keepdim=True))  # every copy comes back to its token
    assert torch.autograd.gradcheck(lambda a, p: ops.unpermute(ops.permute(a, routing, experts)[0] ** 2, row_map, p),
                                    (x, probs))


@pytest.mark.parametrize("multiple", [4, 16])
def test_permute_pads_each_expert_group(multiple):
    """With `multiple` each expert's group is padded with zero rows to a multiple of it: the same
    rows in the same order at each group's padded start, counts padded, unpermute and gradients as
    without padding."""
    gen = torch.Generator().manual_seed(multiple)
    tokens, k, experts, h = 13, 3, 6, 5
    routing = _routing(tokens, k, experts, gen)
    x = torch.randn(tokens, h, dtype=torch.float64, generator=gen, requires_grad=True)
    probs = torch.rand(tokens, k, dtype=torch.float64, generator=gen, requires_grad=True)
    plain, row_map, counts = ops.permute(x, routing, experts)
    padded, padded_map, groups = ops.permute(x, routing, experts, multiple)
    assert groups.tolist() == [-(-c // multiple) * multiple for c in counts.tolist()]
    assert padded.shape == (sum(groups.tolist()), h) and padded_map.dtype == torch.int32
    start = padded_start = 0
    for c, g in zip(counts.tolist(), groups.tolist()):
        assert torch.equal(padded[padded_start:padded_start + c], plain[start:start + c])
        assert not padded[padded_start + c:padded_start + g].any()
        start, padded_start = start + c, padded_start + g
    torch.testing.assert_close(ops.unpermute(padded, padded_map, probs), ops.unpermute(plain, row_map, probs))
    assert torch.autograd.gradcheck(
        lambda a, p: ops.unpermute(ops.permute(a, routing, experts, multiple)[0] ** 2, padded_map, p), (x, probs))


def test_permute_rejects_bad_input():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="routing_map"):
        ops.permute(x, torch.tensor([[0], [1], [2], [8]]), 8)
    with pytest.raises(ValueError, match="routing_map"):
        ops.permute(x, torch.tensor([[0], [-1], [2], [3]]), 8)
    with pytest.raises(ValueError, match="num_experts"):
        ops.permute(x, torch.zeros(4, 1, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="expert_out"):
        ops.unpermute(torch.randn(3, 3), torch.zeros(4, 1, dtype=torch.int32), torch.rand(4, 1))
    with pytest.raises(ValueError, match="multiple"):
        ops.permute(x, torch.zeros(4, 1, dtype=torch.long), 8, 0)


def test_add_rms_norm_reference_and_checks():
    x, res, w = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64), torch.rand(8)
    y, s = ops.add_rms_norm(x, res, w.double(), 1e-6)
    torch.testing.assert_close(s, x + res)
    torch.testing.assert_close(y, reference.rms_norm(x + res, w.double(), 1e-6))
    with pytest.raises(ValueError, match="residual"):
        ops.add_rms_norm(x, res[:2], w, 1e-6)
    with pytest.raises(ValueError, match="weight"):
        ops.rms_norm(x, w[:3], 1e-6)


def test_cross_entropy_reference():
    logits = torch.randn(2, 3, 17, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 17, (2, 3))
    loss = ops.cross_entropy(logits, labels)
    by_hand = torch.logsumexp(logits, -1) - logits.gather(-1, labels[..., None]).squeeze(-1)
    torch.testing.assert_close(loss, by_hand)
    assert torch.autograd.gradcheck(lambda a: ops.cross_entropy(a, labels), (logits,))
    with pytest.raises(ValueError, match="labels"):
        ops.cross_entropy(logits, labels[:1])


def test_ops_mode_switch(monkeypatch):
    monkeypatch.setenv("MEGATRON_QWEN2_OPS", "fastest")
    with pytest.raises(ValueError, match="MEGATRON_QWEN2_OPS"):
        extension.mode()
    monkeypatch.setenv("MEGATRON_QWEN2_OPS", "reference")
    assert extension.mode() == "reference" and not extension.use_kernel(torch.randn(2))
    monkeypatch.setenv("MEGATRON_QWEN2_OPS", "kernel")
    assert not extension.use_kernel(torch.randn(2))  # CPU tensors always take the reference


def test_custom_ops_are_registered_with_fake_kernels():
    from torch._subclasses.fake_tensor import FakeTensorMode

    for name in ["swiglu", "rms_norm", "add_rms_norm", "rms_norm_backward", "expert_rows", "permute", "unpermute", "rope",
                 "cross_entropy_stats", "cross_entropy_backward"]:
        assert hasattr(torch.ops.megatron_qwen2, name), name
    with FakeTensorMode():
        x = torch.empty(6, 32)
        y, rstd = library.rms_norm(x, torch.empty(32), 1e-6)
        assert y.shape == (6, 32) and rstd.shape == (6,) and rstd.dtype == torch.float32
        assert library.permute(x, torch.empty(12, dtype=torch.int32), 2, 16).shape == (16, 32)
        assert library.unpermute(torch.empty(12, 32), torch.empty(12, dtype=torch.int32),
                                 torch.empty(6, 2)).shape == (6, 32)
        assert library.swiglu(x).shape == (6, 16)
        row_map, counts = library.expert_rows(torch.empty(6, 2, dtype=torch.long), 4)
        assert row_map.shape == (12,) and row_map.dtype == torch.int32 and counts.shape == (4,)
