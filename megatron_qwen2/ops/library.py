"""The compiled kernels registered as torch custom ops (namespace ``megatron_qwen2``).

Registering them (torch.library.custom_op, with fake implementations and autograd formulas)
lets autograd differentiate them and torch.compile trace through them as opaque nodes instead
of breaking the graph. The doors (rms_norm.py, swiglu.py, ...) call these; the ops call the
extension `megatron_qwen2._C` and exist on any machine, but running one needs the extension.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.library import custom_op

from megatron_qwen2.ops import extension


def _ext():
    ext = extension.load()
    if ext is None:
        raise RuntimeError("megatron_qwen2._C is not built: the megatron_qwen2:: custom ops need it")
    return ext


def _none_to_zero(g: Optional[Tensor], like: Tensor) -> Tensor:
    return torch.zeros_like(like) if g is None else g.contiguous()


# ---- SwiGLU: x [..., 2f] = [gate | up] -> silu(gate) * up.

@custom_op("megatron_qwen2::swiglu", mutates_args=())
def swiglu(x: Tensor) -> Tensor:
    return _ext().swiglu_forward(x)


@swiglu.register_fake
def _(x):
    return x.new_empty(*x.shape[:-1], x.shape[-1] // 2)


@custom_op("megatron_qwen2::swiglu_backward", mutates_args=())
def swiglu_backward(x: Tensor, dy: Tensor) -> Tensor:
    return _ext().swiglu_backward(x, dy)


@swiglu_backward.register_fake
def _(x, dy):
    return torch.empty_like(x)


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _swiglu_grad(ctx, dy):
    (x,) = ctx.saved_tensors
    return swiglu_backward(x, dy.contiguous())


swiglu.register_autograd(_swiglu_grad, setup_context=_swiglu_setup)


# ---- RMSNorm: x [rows, h], weight [h] -> y, rstd (fp32 [rows], saved for backward).

@custom_op("megatron_qwen2::rms_norm", mutates_args=())
def rms_norm(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    y, rstd = _ext().rms_norm_forward(x, None, weight, eps)
    return y, rstd


@rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x), x.new_empty(x.shape[0], dtype=torch.float32)


@custom_op("megatron_qwen2::add_rms_norm", mutates_args=())
def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """y = rms_norm(x + residual), rstd, and the sum x + residual (the next residual stream)."""
    y, rstd, s = _ext().rms_norm_forward(x, residual, weight, eps)
    return y, rstd, s


@add_rms_norm.register_fake
def _(x, residual, weight, eps):
    return torch.empty_like(x), x.new_empty(x.shape[0], dtype=torch.float32), torch.empty_like(x)


@custom_op("megatron_qwen2::rms_norm_backward", mutates_args=())
def rms_norm_backward(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor,
                      dsum: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    dx, dw = _ext().rms_norm_backward(dy, x, weight, rstd, dsum)
    return dx, dw


@rms_norm_backward.register_fake
def _(dy, x, weight, rstd, dsum):
    return torch.empty_like(x), torch.empty_like(weight)


def _rms_setup(ctx, inputs, output):
    x, weight = inputs[0], inputs[1]
    ctx.save_for_backward(x, weight, output[1])


def _rms_grad(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = rms_norm_backward(_none_to_zero(dy, x), x, weight, rstd, None)
    return dx, dw, None


rms_norm.register_autograd(_rms_grad, setup_context=_rms_setup)


def _add_rms_setup(ctx, inputs, output):
    ctx.save_for_backward(output[2], inputs[2], output[1])  # the normalised input is the sum


def _add_rms_grad(ctx, dy, _drstd, dsum):
    s, weight, rstd = ctx.saved_tensors
    ds, dw = rms_norm_backward(_none_to_zero(dy, s), s, weight, rstd, None if dsum is None else dsum.contiguous())
    return ds, ds, dw, None


add_rms_norm.register_autograd(_add_rms_grad, setup_context=_add_rms_setup)


# ---- MoE permutation: row_map int32 [tokens * k] from the stable expert sort.

@custom_op("megatron_qwen2::expert_rows", mutates_args=())
def expert_rows(ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """routing ids [T, k] -> row_map int32 [T*k] (stable sort by expert), tokens_per_expert int64 [E]."""
    row_map, counts = _ext().expert_rows(ids, num_experts)
    return row_map, counts


@expert_rows.register_fake
def _(ids, num_experts):
    return ids.new_empty(ids.numel(), dtype=torch.int32), ids.new_empty(num_experts, dtype=torch.int64)


@custom_op("megatron_qwen2::permute", mutates_args=())
def permute(x: Tensor, row_map: Tensor, k: int, rows: int) -> Tensor:
    """out [rows, h] (rows >= T*k): out[row_map[t*k + j]] = x[t]; rows no copy maps to are zero."""
    return _ext().permute_forward(x, row_map, k, rows)


@permute.register_fake
def _(x, row_map, k, rows):
    return x.new_empty(rows, x.shape[1])


@custom_op("megatron_qwen2::permute_backward", mutates_args=())
def permute_backward(dout: Tensor, row_map: Tensor, k: int) -> Tensor:
    return _ext().permute_backward(dout, row_map, k)


@permute_backward.register_fake
def _(dout, row_map, k):
    return dout.new_empty(row_map.numel() // k, dout.shape[1])


def _permute_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])
    ctx.k = inputs[2]


def _permute_grad(ctx, dout):
    (row_map,) = ctx.saved_tensors
    return permute_backward(dout.contiguous(), row_map, ctx.k), None, None, None


permute.register_autograd(_permute_grad, setup_context=_permute_setup)


@custom_op("megatron_qwen2::unpermute", mutates_args=())
def unpermute(y: Tensor, row_map: Tensor, probs: Tensor) -> Tensor:
    return _ext().unpermute_forward(y, row_map, probs)


@unpermute.register_fake
def _(y, row_map, probs):
    return y.new_empty(probs.shape[0], y.shape[1])


@custom_op("megatron_qwen2::unpermute_backward", mutates_args=())
def unpermute_backward(dout: Tensor, y: Tensor, row_map: Tensor, probs: Tensor) -> tuple[Tensor, Tensor]:
    dy, dprobs = _ext().unpermute_backward(dout, y, row_map, probs)
    return dy, dprobs


@unpermute_backward.register_fake
def _(dout, y, row_map, probs):
    return torch.empty_like(y), torch.empty_like(probs)


def _unpermute_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _unpermute_grad(ctx, dout):
    y, row_map, probs = ctx.saved_tensors
    dy, dprobs = unpermute_backward(dout.contiguous(), y, row_map, probs)
    return dy, None, dprobs


unpermute.register_autograd(_unpermute_grad, setup_context=_unpermute_setup)


# ---- RoPE on a 4-D strided x with cos/sin broadcastable to it; the output is contiguous.

def _last_dim_dense(t: Tensor) -> Tensor:
    """t itself when its last dimension is contiguous, else a contiguous copy (e.g. the expanded
    gradient that .sum().backward() sends)."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


@custom_op("megatron_qwen2::rope", mutates_args=())
def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return _ext().rope(_last_dim_dense(x), _last_dim_dense(cos), _last_dim_dense(sin), False)


@rope.register_fake
def _(x, cos, sin):
    return x.new_empty(x.shape)


@custom_op("megatron_qwen2::rope_backward", mutates_args=())
def rope_backward(dy: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return _ext().rope(_last_dim_dense(dy), _last_dim_dense(cos), _last_dim_dense(sin), True)


@rope_backward.register_fake
def _(dy, cos, sin):
    return dy.new_empty(dy.shape)


def _rope_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2])


def _rope_grad(ctx, dy):
    cos, sin = ctx.saved_tensors
    return rope_backward(dy, cos, sin), None, None


rope.register_autograd(_rope_grad, setup_context=_rope_setup)


# ---- Cross-entropy pieces over a vocabulary shard (no autograd here: ops/cross_entropy.py
# wraps them with the tensor-parallel all-reduces in one autograd.Function).

@custom_op("megatron_qwen2::cross_entropy_stats", mutates_args=())
def cross_entropy_stats(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    m, s, t = _ext().cross_entropy_forward(logits, target)
    return m, s, t


@cross_entropy_stats.register_fake
def _(logits, target):
    n = logits.shape[0]
    return tuple(logits.new_empty(n, dtype=torch.float32) for _ in range(3))


@custom_op("megatron_qwen2::cross_entropy_backward", mutates_args=())
def cross_entropy_backward(logits: Tensor, target: Tensor, lse: Tensor, grad: Tensor) -> Tensor:
    return _ext().cross_entropy_backward(logits, target, lse, grad)


@cross_entropy_backward.register_fake
def _(logits, target, lse, grad):
    return torch.empty_like(logits)


# ---- Flash attention: q [b, sq, hq, d], k / v [b, sk, hkv, d] bf16 views (any batch / sequence /
# head strides, contiguous last dimension). Packed documents: key_lo / key_hi int32 [b, sq] (query i
# sees keys key_lo[i] <= j < key_hi[i]) and query_lo / query_hi int32 [b, sk] (key j is seen by
# queries query_lo[j] <= i < query_hi[j]); ops.attention.document_ranges derives them. Returns out
# (q's layout when q is dense, else contiguous) and lse fp32 [b, hq, sq], which the autograd formula
# differentiates too (context parallelism merges partial outputs through it). query_lo / query_hi
# left out with key_lo / key_hi given mean self-attention (the same document bounds serve both).

def _attn_rows_ok(t: Tensor) -> bool:
    """The kernel reads t in place: contiguous last dimension, batch / sequence / head strides in
    whole 16-byte rows (the binding copies other layouts)."""
    return t.stride(-1) == 1 and all(st % 8 == 0 or n == 1 for st, n in zip(t.stride()[:3], t.shape[:3]))


def _attn_like(t: Tensor) -> Tensor:
    """An empty tensor in the layout the binding gives an output shaped like t: t's layout when t
    is dense (empty_like keeps it; a transposed view stays transposed), else contiguous."""
    if not _attn_rows_ok(t):
        return t.new_empty(t.shape)
    out = torch.empty_like(t)
    return out if _attn_rows_ok(out) else t.new_empty(t.shape)


@custom_op("megatron_qwen2::flash_attention", mutates_args=())
def flash_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool, softmax_scale: float,
                    key_lo: Optional[Tensor] = None, key_hi: Optional[Tensor] = None,
                    query_lo: Optional[Tensor] = None, query_hi: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    out, lse = _ext().flash_attention_forward(q, k, v, causal, softmax_scale, key_lo, key_hi)
    return out, lse


def _flash_fake(q, k, v, causal, softmax_scale, key_lo=None, key_hi=None, query_lo=None, query_hi=None):
    return _attn_like(q), q.new_empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32)


flash_attention.register_fake(_flash_fake)


@custom_op("megatron_qwen2::flash_attention_backward", mutates_args=())
def flash_attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                             dlse: Optional[Tensor], causal: bool, softmax_scale: float,
                             query_lo: Optional[Tensor] = None,
                             query_hi: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = _ext().flash_attention_backward(dout, q, k, v, out, lse, dlse, causal, softmax_scale, query_lo,
                                                 query_hi)
    return dq, dk, dv


def _flash_backward_fake(dout, q, k, v, out, lse, dlse, causal, softmax_scale, query_lo=None, query_hi=None):
    dk = _attn_like(k)
    return _attn_like(q), dk, torch.empty_strided(dk.shape, dk.stride(), dtype=dk.dtype, device=dk.device)


flash_attention_backward.register_fake(_flash_backward_fake)


@custom_op("megatron_qwen2::flash_attention_backward_sm90", mutates_args=())
def flash_attention_backward_sm90(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                                  dlse: Optional[Tensor], causal: bool, softmax_scale: float,
                                  query_lo: Optional[Tensor] = None,
                                  query_hi: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """`flash_attention_backward` by the Hopper kernel (csrc/flash_attn_sm90_bwd.cu; compute
    capability 9.0 only): same arguments and results, dq likewise summed with fp32 atomics."""
    dq, dk, dv = _ext().flash_attention_backward_sm90(dout, q, k, v, out, lse, dlse, causal, softmax_scale, query_lo,
                                                      query_hi)
    return dq, dk, dv


flash_attention_backward_sm90.register_fake(_flash_backward_fake)


def _flash_setup(ctx, inputs, output):
    q, k, v, causal, softmax_scale, key_lo, key_hi, query_lo, query_hi = inputs
    if key_lo is not None and query_lo is None:
        if q.shape[1] != k.shape[1]:
            raise ValueError("flash_attention: with sq != sk the backward needs query_lo / query_hi")
        query_lo, query_hi = key_lo, key_hi  # self-attention: a key's queries are its document's
    ctx.save_for_backward(q, k, v, output[0], output[1], query_lo, query_hi)
    ctx.causal, ctx.softmax_scale = causal, softmax_scale


def _flash_grad_by(backward):
    """The autograd backward of a forward op, running the backward op `backward` from out and lse."""
    def grad(ctx, dout, dlse):
        q, k, v, out, lse, query_lo, query_hi = ctx.saved_tensors
        dout = torch.zeros_like(out) if dout is None else dout  # any strides: the kernel reads views
        dq, dk, dv = backward(dout, q, k, v, out, lse, None if dlse is None else dlse.contiguous(), ctx.causal,
                              ctx.softmax_scale, query_lo, query_hi)
        return dq, dk, dv, None, None, None, None, None, None
    return grad


flash_attention.register_autograd(_flash_grad_by(flash_attention_backward), setup_context=_flash_setup)


@custom_op("megatron_qwen2::flash_attention_sm90", mutates_args=())
def flash_attention_sm90(q: Tensor, k: Tensor, v: Tensor, causal: bool, softmax_scale: float,
                         key_lo: Optional[Tensor] = None, key_hi: Optional[Tensor] = None,
                         query_lo: Optional[Tensor] = None, query_hi: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """`flash_attention` by the Hopper kernels (compute capability 9.0 only): the forward of
    csrc/flash_attn_sm90.cu and the backward of csrc/flash_attn_sm90_bwd.cu."""
    out, lse = _ext().flash_attention_forward_sm90(q, k, v, causal, softmax_scale, key_lo, key_hi)
    return out, lse


flash_attention_sm90.register_fake(_flash_fake)
flash_attention_sm90.register_autograd(_flash_grad_by(flash_attention_backward_sm90), setup_context=_flash_setup)


# ---- FP8 (e4m3) quantisation of x [R, C] along its rows, bit for bit as ops.fp8.quantize, and of
# x^T [C, R] along x's columns (no autograd: the quantised operands only enter FP8 GEMMs).

def _fp8_scale_inv_like(x: Tensor, rows: int, cols: int, tiling: str) -> Tensor:
    """scale_inv of a [rows, cols] quantisation: [rows, 1] ("row"), or [rows, ceil(cols/128)]
    column-major ("1x128")."""
    if tiling == "row":
        return x.new_empty(rows, 1, dtype=torch.float32)
    return x.new_empty(-(-cols // 128), rows, dtype=torch.float32).t()


@custom_op("megatron_qwen2::fp8_quantize", mutates_args=())
def fp8_quantize(x: Tensor, tiling: str, with_transpose: bool) -> list[Tensor]:
    """x [R, C] (fp32 / bf16 / fp16) -> [data e4m3 [R, C], scale_inv] with tiling "row" or "1x128",
    and with_transpose also [data_t [C, R], scale_inv_t]: the quantisation of x.t() (x read once,
    or twice for "row", whose column amaxes need every row first)."""
    return _ext().fp8_quantize(x, tiling, with_transpose)


@fp8_quantize.register_fake
def _(x, tiling, with_transpose):
    r, c = x.shape
    out = [x.new_empty(r, c, dtype=torch.float8_e4m3fn), _fp8_scale_inv_like(x, r, c, tiling)]
    if with_transpose:
        out += [x.new_empty(c, r, dtype=torch.float8_e4m3fn), _fp8_scale_inv_like(x, c, r, tiling)]
    return out


@custom_op("megatron_qwen2::fp8_quantize_tensorwise", mutates_args=())
def fp8_quantize_tensorwise(x: Tensor, with_transpose: bool) -> list[Tensor]:
    """x [R, C] -> [data e4m3 [R, C], scale_inv []] with one scale, and with_transpose also data_t
    [C, R] (the same scale). The amax is reduced on the device: no host synchronisation."""
    return _ext().fp8_quantize_tensorwise(x, with_transpose)


@fp8_quantize_tensorwise.register_fake
def _(x, with_transpose):
    r, c = x.shape
    out = [x.new_empty(r, c, dtype=torch.float8_e4m3fn), x.new_empty((), dtype=torch.float32)]
    if with_transpose:
        out.append(x.new_empty(c, r, dtype=torch.float8_e4m3fn))
    return out


@custom_op("megatron_qwen2::fp8_transpose", mutates_args=())
def fp8_transpose(x: Tensor) -> Tensor:
    """The contiguous transpose of FP8 codes x [R, C] (of each matrix of [G, R, C])."""
    return _ext().fp8_transpose(x)


@fp8_transpose.register_fake
def _(x):
    return x.new_empty(*x.shape[:-2], x.shape[-1], x.shape[-2])


@custom_op("megatron_qwen2::fp8_gemm_accumulate", mutates_args=("out",))
def fp8_gemm_accumulate(a: Tensor, a_scale_inv: Tensor, a_tiling: str, b: Tensor, b_scale_inv: Tensor,
                        b_tiling: str, out: Tensor) -> None:
    """out [M, N] (fp32) += a [M, K] @ b [N, K]^T on FP8 codes quantised along K (ops.fp8.Fp8Tensor's
    scale layouts), one cuBLASLt GEMM that reads out as its C (csrc/fp8_gemm.cpp)."""
    _ext().fp8_gemm_accumulate(a, a_scale_inv, a_tiling, b, b_scale_inv, b_tiling, out)


@fp8_gemm_accumulate.register_fake
def _(a, a_scale_inv, a_tiling, b, b_scale_inv, b_tiling, out):
    return None


# ---- Ops whose output goes to an FP8 linear layer already quantised: y [rows, cols] padded with zero
# rows to rows_pad, as fp8_quantize (fp8_quantize_tensorwise for "tensor") with the transpose would give
# it, y itself never written: [data [rows_pad, cols], scale_inv, data_t [cols, rows_pad](, scale_inv_t
# unless "tensor")], then the op's own outputs. No autograd here: the doors (ops/rms_norm.py,
# ops/swiglu.py) wrap them with their op's backward.

def _fp8_pair_fake(x: Tensor, rows_pad: int, cols: int, tiling: str) -> list[Tensor]:
    data = x.new_empty(rows_pad, cols, dtype=torch.float8_e4m3fn)
    data_t = x.new_empty(cols, rows_pad, dtype=torch.float8_e4m3fn)
    if tiling == "tensor":
        return [data, x.new_empty((), dtype=torch.float32), data_t]
    return [data, _fp8_scale_inv_like(x, rows_pad, cols, tiling), data_t, _fp8_scale_inv_like(x, cols, rows_pad, tiling)]


@custom_op("megatron_qwen2::rms_norm_fp8", mutates_args=())
def rms_norm_fp8(x: Tensor, residual: Optional[Tensor], weight: Tensor, eps: float, tiling: str,
                 rows_pad: int) -> list[Tensor]:
    """rms_norm(x (+ residual)) [rows, h] quantised as above, then rstd (and x + residual)."""
    return _ext().rms_norm_fp8_forward(x, residual, weight, eps, tiling, rows_pad)


@rms_norm_fp8.register_fake
def _(x, residual, weight, eps, tiling, rows_pad):
    out = _fp8_pair_fake(x, rows_pad, x.shape[1], tiling) + [x.new_empty(x.shape[0], dtype=torch.float32)]
    return out if residual is None else out + [torch.empty_like(x)]


@custom_op("megatron_qwen2::swiglu_fp8", mutates_args=())
def swiglu_fp8(x: Tensor, tiling: str, rows_pad: int) -> list[Tensor]:
    """swiglu(x) [rows, f] of x [rows, 2f] quantised as above."""
    return _ext().swiglu_fp8_forward(x, tiling, rows_pad)


@swiglu_fp8.register_fake
def _(x, tiling, rows_pad):
    return _fp8_pair_fake(x, rows_pad, x.shape[1] // 2, tiling)
