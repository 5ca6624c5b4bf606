"""ops.swiglu: the door equals the reference on the CPU; the CUDA kernel equals it on the GPU."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from megatron_qwen2 import ops
from megatron_qwen2.ops import extension, reference


def _by_hand(x):
    gate, up = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return gate * torch.sigmoid(gate) * up


@pytest.mark.parametrize("shape", [(3, 8), (2, 5, 14), (1, 2)])
def test_cpu_door_matches_definition_with_gradients(shape):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    y = ops.swiglu(x)
    torch.testing.assert_close(y, _by_hand(x.detach()))
    assert torch.autograd.gradcheck(ops.swiglu, (x,))


def test_missing_extension_warns_once(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ext(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "megatron_qwen2" and fromlist and "_C" in fromlist:
            raise ImportError("not built")
        return real_import(name, globals, locals, fromlist, level)

    extension.load.cache_clear()
    monkeypatch.setattr(builtins, "__import__", no_ext)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert extension.load() is None and extension.load() is None
    extension.load.cache_clear()
    assert len([w for w in caught if "megatron_qwen2._C" in str(w.message)]) == 1


def test_reference_mode_forces_fallback(monkeypatch):
    monkeypatch.setenv("MEGATRON_QWEN2_OPS", "reference")
    extension.load.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a forced fallback is a choice, not a problem to warn about
            assert extension.load() is None
    finally:
        extension.load.cache_clear()


def test_cpu_door_matches_reference_on_odd_shapes():
    for shape in [(0, 6), (5, 0), (1, 1, 2), (7, 2 * 4097)]:
        x = torch.randn(shape, dtype=torch.float64)
        torch.testing.assert_close(ops.swiglu(x), reference.swiglu(x))


def _ext():
    ext = extension.load()
    if ext is None:
        pytest.fail("the CUDA extension megatron_qwen2._C is not built on this GPU machine")
    return ext


TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
       torch.float16: dict(rtol=2e-3, atol=1e-3)}


@pytest.mark.gpu
def test_extension_version():
    assert "megatron_qwen2._C" in _ext().version()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(4, 2 * 1), (3, 7, 2 * 4097), (128, 2 * 4096), (2, 3, 2 * 24), (5, 2 * 12),
                                   (600, 2 * 18944)])
def test_kernel_matches_reference(dtype, shape):
    _ext()
    x = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
    xr = x.detach().double().requires_grad_(True)
    y = ops.swiglu(x)
    ref = reference.swiglu(xr)
    torch.testing.assert_close(y.double(), ref, **TOL[dtype])
    dy = torch.randn_like(y)
    y.backward(dy)
    ref.backward(dy.double())
    torch.testing.assert_close(x.grad.double(), xr.grad, **TOL[dtype])


@pytest.mark.gpu
def test_kernel_unaligned_view_and_empty():
    ext = _ext()
    base = torch.randn(2 * 8 * 2 + 1, device="cuda", dtype=torch.bfloat16)
    x = base[1:].view(2, 16)  # contiguous but not 16-byte aligned: the scalar path
    torch.testing.assert_close(ext.swiglu_forward(x).float(), F.silu(x[:, :8].float()) * x[:, 8:].float(),
                               rtol=1.6e-2, atol=1e-2)
    empty = torch.empty(0, 6, device="cuda")
    assert ext.swiglu_forward(empty).shape == (0, 3)


@pytest.mark.gpu
def test_door_on_gpu_handles_views_empty_and_fp64():
    _ext()
    x = torch.randn(6, 2 * 40, device="cuda", dtype=torch.bfloat16)[:, 8:72]  # non-contiguous view
    torch.testing.assert_close(ops.swiglu(x).float(), reference.swiglu(x.float()), rtol=1.6e-2, atol=1e-2)
    e = torch.empty(0, 3, 2 * 8, device="cuda", requires_grad=True)
    ops.swiglu(e).sum().backward()
    assert e.grad.shape == e.shape
    x64 = torch.randn(3, 2 * 5, device="cuda", dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ops.swiglu, (x64,))  # fp64 takes the reference


@pytest.mark.gpu
def test_kernel_runs_on_current_stream():
    ext = _ext()
    x = torch.randn(256, 2 * 4096, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y = ext.swiglu_forward(x)
        dx = ext.swiglu_backward(x, y)
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(y, reference.swiglu(x), rtol=1e-5, atol=1e-6)
    assert torch.isfinite(dx).all()


@pytest.mark.gpu
def test_kernel_rejects_bad_input():
    ext = _ext()
    with pytest.raises(RuntimeError, match="even"):
        ext.swiglu_forward(torch.randn(4, 7, device="cuda"))
    with pytest.raises(RuntimeError, match="contiguous"):
        ext.swiglu_forward(torch.randn(8, 4, device="cuda").t())
    with pytest.raises(RuntimeError, match="CUDA"):
        ext.swiglu_forward(torch.randn(4, 8))
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        ext.swiglu_forward(torch.randn(4, 8, device="cuda", dtype=torch.float64))
    x = torch.randn(4, 8, device="cuda")
    with pytest.raises(RuntimeError, match="dy"):
        ext.swiglu_backward(x, torch.randn(4, 4, device="cuda", dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="shape"):
        ext.swiglu_backward(x, torch.randn(4, 8, device="cuda"))


@pytest.mark.gpu
def test_kernel_second_derivative_is_refused():
    _ext()
    x = torch.randn(4, 16, device="cuda", requires_grad=True)
    (g,) = torch.autograd.grad(ops.swiglu(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()
