"""FP8 quantisation and FP8 GEMMs for the linear layers (`train.fp8`; docs/architecture.md, "FP8").

Every FP8 product is C = A @ B^T with A [M, K] and B [N, K], both quantised along K, the
dimension the product reduces over. A linear layer y = x W^T runs three of them:

    forward         y  = x   @ W^T      A = x    [tokens, in],  B = W    [out, in]
    input gradient  dx = dy  @ W        A = dy   [tokens, out], B = W^T  [in, out]
    weight gradient dW = dy^T @ x       A = dy^T [out, tokens], B = x^T  [in, tokens]

so a weight is quantised along in once per optimizer step (`Fp8Weights`) and its transpose, W^T
along out, is that copy transposed (one scale, square blocks) or, rowwise, a second quantisation
made with it; x and dy are quantised along their features and, transposed, along tokens.

Recipes (current scaling: the scale comes from the amax of the very tensor being quantised):

    tensorwise  one scale per tensor
    rowwise     one scale per row of A and per row of B (per output row and column of C)
    blockwise   activations and gradients in 1 x 128 tiles along K, weights in 128 x 128 blocks
                (DeepSeek-V3); both operands of the weight gradient are 1 x 128 tiles along tokens

A quantised value is `saturate(x * scale)` rounded to nearest even, scale = FP8_MAX / amax in
fp32, and the GEMM multiplies by `scale_inv` = 1 / scale. `quantize` is the definition in
PyTorch; on CUDA `quantize` and `quantize_pair` run the compiled kernels of csrc/fp8_quant.cu
when built (one pass for an operand and its transpose), bit for bit the same. On CUDA the GEMMs
are `torch._scaled_mm`; elsewhere `gemm` dequantises to fp32 and multiplies (the emulation CI
runs): the quantised values are the same on both, only the product's arithmetic differs.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

from megatron_qwen2.config import FP8_RECIPES as RECIPES
from megatron_qwen2.ops import extension, library

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
FP8_MAX = {E4M3: 448.0, E5M2: 57344.0}
FP8_DTYPES = (E4M3, E5M2)
AMAX_FLOOR = 1e-12  # an all-zero tile gets a finite scale
BLOCK = 128
# The FP8 GEMMs need K and N multiples of 16 (cuBLASLt): every layer dimension must be one.
GEMM_ALIGN = 16


@dataclass(frozen=True)
class Fp8Recipe:
    """How each operand of a linear layer's three GEMMs is quantised."""

    name: str  # tensorwise | rowwise | blockwise
    input_dtype: torch.dtype  # x: forward A and weight-gradient B
    weight_dtype: torch.dtype  # W (forward B) and W^T (input-gradient B)
    grad_dtype: torch.dtype  # dy: input-gradient A and weight-gradient A

    @property
    def activation_tiling(self) -> str:
        return {"tensorwise": "tensor", "rowwise": "row", "blockwise": "1x128"}[self.name]

    @property
    def weight_tiling(self) -> str:
        return {"tensorwise": "tensor", "rowwise": "row", "blockwise": "128x128"}[self.name]

    @property
    def token_multiple(self) -> int:
        """A layer's token rows are padded with zero rows to a multiple of this: the weight gradient
        reduces over them, in whole 16-element steps, or whole tiles for blockwise."""
        return BLOCK if self.name == "blockwise" else GEMM_ALIGN


# e4m3 for every operand: with current scaling each tensor (row, tile) is scaled into range, so
# e5m2's range buys nothing and its mantissa bit less costs accuracy on gradients as well
# (bench/results/fp8_formats_cpu_2026-12-02.json, `python bench/fp8_formats.py`). The blockwise
# GEMMs of cuBLASLt take e4m3 only.
_RECIPES = {name: Fp8Recipe(name, E4M3, E4M3, E4M3) for name in RECIPES[1:]}


def recipe(name: str) -> Optional[Fp8Recipe]:
    """The recipe called `name` (train.fp8); None for "none"."""
    if name not in RECIPES:
        raise ValueError(f"train.fp8={name!r} is not one of {', '.join(RECIPES)}")
    return _RECIPES.get(name)


@dataclass(frozen=True)
class Fp8Tensor:
    """A 2D tensor quantised along its rows' length (the K of the GEMM it enters).

    data: [R, C] float8, row-major. scale_inv (fp32) by tiling:
      "tensor"  []                  one scale
      "row"     [R, 1]              one per row
      "1x128"   [R, ceil(C/128)]    one per 128 columns of a row; column-major (stride (1, R))
      "128x128" [ceil(R/128), ceil(C/128)]  one per block, row-major
    These are the layouts torch._scaled_mm takes for A, and (transposed) for B. The FP8 copies of
    routed experts' 3D weights stack one such quantisation per expert: data [G, R, C] and scale_inv
    with a leading G (`expert(e)` is expert e's).
    """

    data: torch.Tensor
    scale_inv: torch.Tensor
    tiling: str

    def dequantize(self) -> torch.Tensor:
        """The fp32 values the FP8 data and scales stand for."""
        r, c = self.data.shape
        s = self.scale_inv
        if self.tiling == "1x128":
            s = s.repeat_interleave(BLOCK, dim=1)[:, :c]
        elif self.tiling == "128x128":
            s = s.repeat_interleave(BLOCK, dim=0).repeat_interleave(BLOCK, dim=1)[:r, :c]
        return self.data.float() * s

    def expert(self, e: int) -> "Fp8Tensor":
        """Expert e's quantisation of a stacked 3D one. A tensorwise scale is copied out: cuBLASLt
        refuses a scale pointer that is not 16-byte aligned (CUBLAS_STATUS_NOT_SUPPORTED)."""
        scale = self.scale_inv[e].clone() if self.tiling == "tensor" else self.scale_inv[e]
        return Fp8Tensor(self.data[e], scale, self.tiling)

    def rows(self, start: int, end: int) -> "Fp8Tensor":
        """Rows [start, end) of a 2D activation quantisation, in the layout the GEMMs take."""
        s = self.scale_inv
        if self.tiling == "row":
            s = s[start:end]
        elif self.tiling == "1x128":
            s = s[start:end].t().contiguous().t()
        elif self.tiling != "tensor":
            raise ValueError(f"a {self.tiling} quantisation is not cut into rows")
        return Fp8Tensor(self.data[start:end], s, self.tiling)

    def cols(self, start: int, end: int) -> "Fp8Tensor":
        """Columns [start, end) of a 2D activation quantisation along its rows: its own scales (one
        per tensor or row, or those of the 1 x 128 tiles the columns cover, whole tiles only)."""
        s = self.scale_inv
        if self.tiling == "1x128":
            if start % BLOCK:
                raise ValueError(f"columns from {start} cut a 1x128 tile")
            s = s[:, start // BLOCK:-(-end // BLOCK)].t().contiguous().t()
        elif self.tiling not in ("tensor", "row"):
            raise ValueError(f"a {self.tiling} quantisation is not cut into columns")
        return Fp8Tensor(self.data[:, start:end].contiguous(), s, self.tiling)

    def t(self) -> "Fp8Tensor":
        """The transpose (of each expert's, when stacked), quantised along the other dimension,
        where it is the same quantisation (one scale, or square blocks); other tilings are
        quantised again from the source."""
        if self.tiling == "tensor":
            return Fp8Tensor(transposed_codes(self.data), self.scale_inv, "tensor")
        if self.tiling == "128x128":
            return Fp8Tensor(transposed_codes(self.data), self.scale_inv.transpose(-2, -1).contiguous(), "128x128")
        raise ValueError(f"a {self.tiling} quantisation does not transpose: quantise the transposed source")

    def nbytes(self) -> int:
        return self.data.nbytes + self.scale_inv.nbytes


def transposed_codes(data: torch.Tensor) -> torch.Tensor:
    """The contiguous transpose of FP8 codes [R, C] (of each matrix of [G, R, C]): the compiled byte
    transpose on CUDA when built, else torch's copy."""
    if data.is_contiguous() and extension.use_kernel(data, dtypes=FP8_DTYPES):
        return library.fp8_transpose(data)
    return data.transpose(-2, -1).contiguous()


def _scale(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return FP8_MAX[dtype] / amax.float().clamp(min=AMAX_FLOOR)


def _cast(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    m = FP8_MAX[dtype]
    return (x.float() * scale).clamp(-m, m).to(dtype)


def _pad_to(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    r, c = x.shape
    return x if (r, c) == (rows, cols) else F.pad(x, (0, cols - c, 0, rows - r))


def _use_kernel(x: torch.Tensor, tiling: str, dtype: torch.dtype) -> bool:
    """Whether the compiled quantisation serves x: CUDA, built, e4m3, an activation tiling."""
    return dtype is E4M3 and tiling in ("tensor", "row", "1x128") and x.dim() == 2 and extension.use_kernel(x)


def quantize(x: torch.Tensor, tiling: str, dtype: torch.dtype = E4M3) -> Fp8Tensor:
    """Quantise the 2D tensor x [R, C] along C with the given tiling."""
    if _use_kernel(x, tiling, dtype):
        return quantize_pair(x, tiling, dtype, transpose=False)[0]
    return quantize_reference(x, tiling, dtype)


def quantize_pair(x: torch.Tensor, tiling: str, dtype: torch.dtype = E4M3,
                  transpose: bool = True) -> tuple[Fp8Tensor, Optional[Fp8Tensor]]:
    """x [R, C] quantised along C, and (when `transpose`) x^T [C, R] quantised along R with the same
    tiling: an operand of the forward or the input gradient, and the one of the weight gradient."""
    if _use_kernel(x, tiling, dtype):
        x = x.contiguous()
        if tiling == "tensor":
            out = library.fp8_quantize_tensorwise(x, transpose)
            return Fp8Tensor(out[0], out[1], tiling), Fp8Tensor(out[2], out[1], tiling) if transpose else None
        out = library.fp8_quantize(x, tiling, transpose)
        return Fp8Tensor(out[0], out[1], tiling), Fp8Tensor(out[2], out[3], tiling) if transpose else None
    q = quantize_reference(x, tiling, dtype)
    if not transpose:
        return q, None
    return q, q.t() if tiling in ("tensor", "128x128") else quantize_reference(x.t(), tiling, dtype)


def quantize_reference(x: torch.Tensor, tiling: str, dtype: torch.dtype = E4M3) -> Fp8Tensor:
    """Quantise the 2D tensor x [R, C] along C with the given tiling: the PyTorch definition, on any
    device, that the kernels are tested against."""
    if x.dim() != 2:
        raise ValueError(f"quantize takes a 2D tensor, got shape {tuple(x.shape)}")
    x = x.contiguous()
    r, c = x.shape
    # An empty group has amax 0 (an expert-parallel rank may be routed no rows), as in the kernels.
    if tiling == "tensor":
        scale = _scale(x.abs().amax() if x.numel() else x.new_zeros(()), dtype)
        return Fp8Tensor(_cast(x, scale, dtype), scale.reciprocal(), tiling)
    if tiling == "row":
        scale = _scale(x.abs().amax(dim=1, keepdim=True) if c else x.new_zeros(r, 1), dtype)
        return Fp8Tensor(_cast(x, scale, dtype), scale.reciprocal(), tiling)
    nc = -(-c // BLOCK)
    if tiling == "1x128":
        tiles = _pad_to(x, r, nc * BLOCK).view(r, nc, BLOCK)
        scale = _scale(tiles.abs().amax(dim=2), dtype)  # [R, nc]
        data = _cast(tiles, scale.unsqueeze(2), dtype).view(r, nc * BLOCK)[:, :c].contiguous()
        return Fp8Tensor(data, scale.reciprocal().t().contiguous().t(), tiling)
    if tiling == "128x128":
        nr = -(-r // BLOCK)
        blocks = _pad_to(x, nr * BLOCK, nc * BLOCK).view(nr, BLOCK, nc, BLOCK)
        scale = _scale(blocks.abs().amax(dim=(1, 3)), dtype)  # [nr, nc]
        data = _cast(blocks, scale.view(nr, 1, nc, 1), dtype).view(nr * BLOCK, nc * BLOCK)[:r, :c].contiguous()
        return Fp8Tensor(data, scale.reciprocal(), tiling)
    raise ValueError(f"unknown tiling {tiling!r}")


def padded(rows: int, multiple: int) -> int:
    """rows rounded up to a multiple of `multiple`."""
    return -(-rows // multiple) * multiple


def pad_rows(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """x [R, C] with zero rows appended up to a multiple of `multiple` rows."""
    return _pad_to(x, padded(x.shape[0], multiple), x.shape[1])


@dataclass(frozen=True)
class Fp8Input:
    """An FP8 linear layer's input x [..., C] as the two operands its GEMMs take: `q`, x [R, C] along
    C (the forward's A), and `t`, x^T [C, R] along the tokens (the weight gradient's B), R the tokens
    padded with zero rows to the recipe's token multiple.

    `stand_in` is x for autograd: a tensor of x's shape, dtype and device through which the layer's
    input gradient reaches the op that made x. `quantize_input` quantises a tensor, which stands in
    for itself; an op that quantises its output as it makes it (`ops.rms_norm_fp8`, `ops.swiglu_fp8`)
    never writes x, and its stand-in is one element broadcast (`stand_in_for`).

    `remake_t` (source, remake), with remake(source) giving `t` again bit for bit, lets the layer keep
    `source`, a tensor autograd holds anyway, for its backward instead of `t` (`ops.swiglu_fp8`: the
    SwiGLU input, which SwiGLU's backward keeps; t is then not held from the forward to the backward)."""

    stand_in: torch.Tensor
    q: Fp8Tensor
    t: Fp8Tensor
    remake_t: Optional[tuple[torch.Tensor, Callable[[torch.Tensor], Fp8Tensor]]] = None


def keep_t(xin: Fp8Input) -> tuple[tuple[torch.Tensor, ...], Optional[Callable[[torch.Tensor], Fp8Tensor]]]:
    """What an FP8 layer saves for its backward to have xin.t again (`t_again`): t's data and
    scales, or the tensor it is remade from (`Fp8Input.remake_t`) and how."""
    if xin.remake_t is None:
        return (xin.t.data, xin.t.scale_inv), None
    source, remake = xin.remake_t
    return (source,), remake


def t_again(saved: Sequence[torch.Tensor], remake: Optional[Callable[[torch.Tensor], Fp8Tensor]],
            tiling: str) -> Fp8Tensor:
    """The x^T operand from what `keep_t` had saved."""
    if remake is None:
        return Fp8Tensor(*saved, tiling)
    with torch.no_grad():
        return remake(*saved)


def quantize_input(x: torch.Tensor, rcp: Fp8Recipe) -> Fp8Input:
    """x [..., C] as an FP8 linear layer's input under the recipe."""
    x2 = pad_rows(x.detach().reshape(-1, x.shape[-1]), rcp.token_multiple)
    return Fp8Input(x, *quantize_pair(x2, rcp.activation_tiling, rcp.input_dtype))


def quantized_by_kernels(rcp: Fp8Recipe, *tensors: torch.Tensor) -> bool:
    """Whether the compiled ops that quantise their output as they make it (ops.rms_norm_fp8,
    ops.swiglu_fp8) serve these inputs: CUDA, built, one dtype, e4m3 activations, some rows (an
    expert-parallel rank may be routed none)."""
    return rcp.input_dtype is E4M3 and extension.use_kernel(*tensors) and tensors[0].numel() > 0


def stand_in_for(shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
    """A tensor of `shape` with like's dtype and device that holds one element (zero strides)."""
    return like.new_zeros(()).expand(shape)


def operand_list(q: Fp8Tensor, t: Fp8Tensor) -> list[torch.Tensor]:
    """[data, scale_inv, data_t(, scale_inv_t unless "tensor")]: `operands_of`'s list."""
    return [q.data, q.scale_inv, t.data] + ([] if q.tiling == "tensor" else [t.scale_inv])


def operands_of(out: list[torch.Tensor], tiling: str) -> tuple[Fp8Tensor, Fp8Tensor, list[torch.Tensor]]:
    """The two operands from a quantising op's list [data, scale_inv, data_t(, scale_inv_t unless
    "tensor"), ...] (ops/library.py), and the rest of the list."""
    if tiling == "tensor":
        return Fp8Tensor(out[0], out[1], tiling), Fp8Tensor(out[2], out[1], tiling), out[3:]
    return Fp8Tensor(out[0], out[1], tiling), Fp8Tensor(out[2], out[3], tiling), out[4:]


def _scale_b(b: Fp8Tensor) -> torch.Tensor:
    return b.scale_inv if b.tiling == "tensor" else b.scale_inv.t()


# cuBLASLt's blockwise GEMMs read K in whole groups of 4 blocks: their scale rows are 16-byte
# aligned (4 fp32) and torch._scaled_mm passes them unpadded; with another count of K blocks the
# product is wrong, silently (tests/ops/test_fp8_gpu.py covers such shapes).
K_BLOCK_GROUP = 4 * BLOCK


def _whole_k_groups(q: Fp8Tensor) -> Fp8Tensor:
    """q with zero columns up to a multiple of K_BLOCK_GROUP and zero scales for the blocks added:
    the same product (zeros add nothing), in the shape cuBLASLt's blockwise GEMMs read."""
    k = q.data.shape[1]
    if q.tiling not in ("1x128", "128x128") or k % K_BLOCK_GROUP == 0:
        return q
    cols = -(-k // K_BLOCK_GROUP) * K_BLOCK_GROUP
    data = F.pad(q.data.view(torch.uint8), (0, cols - k)).view(q.data.dtype)
    s = q.scale_inv
    if q.tiling == "1x128":  # column-major [R, nc]: pad as the transpose, then view back
        scale = F.pad(s.t(), (0, 0, 0, cols // BLOCK - s.shape[1])).t()
    else:
        scale = F.pad(s, (0, cols // BLOCK - s.shape[1]))
    return Fp8Tensor(data, scale, q.tiling)


def gemm(a: Fp8Tensor, b: Fp8Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """a [M, K] @ b [N, K]^T -> [M, N] in out_dtype; torch._scaled_mm on CUDA, else dequantised fp32."""
    if a.data.is_cuda:
        a, b = _whole_k_groups(a), _whole_k_groups(b)
        return torch._scaled_mm(a.data, b.data.t(), a.scale_inv, _scale_b(b), out_dtype=out_dtype)
    return (a.dequantize() @ b.dequantize().t()).to(out_dtype)


# A weight gradient is an fp32 GEMM output added into main_grad; made in slices of output rows of at
# most this many elements (128 MiB), it never exists whole (a 72B-width gate | up would be 1.8 GiB).
WGRAD_SLICE_ELEMENTS = 32 * 2**20


def weight_gemm_slices(dyt: Fp8Tensor, xt: Fp8Tensor):
    """The weight gradient dy^T x [N, K] in fp32 from dy^T [N, M] and x^T [K, M], both quantised along
    M: (first row, the slice's rows) for consecutive slices of at most WGRAD_SLICE_ELEMENTS."""
    n, k = dyt.data.shape[0], xt.data.shape[0]
    step = max(GEMM_ALIGN, WGRAD_SLICE_ELEMENTS // k // GEMM_ALIGN * GEMM_ALIGN)
    for r in range(0, n, step):
        yield r, gemm(dyt.rows(r, min(r + step, n)), xt, torch.float32)


def add_weight_gemm(dyt: Fp8Tensor, xt: Fp8Tensor, out: torch.Tensor, in_gemm: bool = True) -> None:
    """out [N, K] (fp32) += dy^T x, from dy^T [N, M] and x^T [K, M] quantised along M: one GEMM that
    accumulates into out on CUDA with the extension built (csrc/fp8_gemm.cpp: no fp32 product beside
    out, and no pass over it to add one), else `weight_gemm_slices`' products added slice by slice
    (`in_gemm=False` asks for that: the baseline bench/fp8_wgrad.py measures it against). out must
    start 16-byte aligned for the GEMM (cuBLASLt's FP8 kernels); a view that does not takes the slices."""
    if (in_gemm and extension.use_kernel(dyt.data, xt.data, dtypes=FP8_DTYPES) and out.dtype == torch.float32
            and out.data_ptr() % 16 == 0):
        a, b = _whole_k_groups(dyt), _whole_k_groups(xt)
        library.fp8_gemm_accumulate(a.data, a.scale_inv, a.tiling, b.data, b.scale_inv, b.tiling, out)
        return
    for r, dw in weight_gemm_slices(dyt, xt):
        out[r:r + dw.shape[0]].add_(dw)


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`; to a GPU through pinned memory, so that the host does not wait
    for the device's queue to drain (a copy from pageable memory does)."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def group_ends(counts: list[int], device: torch.device) -> torch.Tensor:
    """The end row of each group, the int32 offsets grouped GEMMs take."""
    return host_to_device(torch.tensor(counts, dtype=torch.int32).cumsum(0, dtype=torch.int32), device)


def _grouped_on_gpu(a: Fp8Tensor, out_dtype: torch.dtype, grouped: bool) -> bool:
    """Whether one torch._scaled_grouped_mm serves a grouped product: CUDA, some rows, one scale per
    tensor or row (Hopper has no grouped blockwise GEMM), a bf16 output."""
    return (grouped and a.data.is_cuda and a.data.numel() > 0 and a.tiling in ("tensor", "row")
            and out_dtype == torch.bfloat16 and hasattr(torch, "_scaled_grouped_mm"))


def _per_row(scale_inv: torch.Tensor, rows: int) -> torch.Tensor:
    """One scale per row (of `rows`) from a tensorwise or rowwise scale_inv: the form of the grouped GEMM."""
    return scale_inv.reshape(-1).expand(rows).contiguous() if scale_inv.numel() == 1 else scale_inv.reshape(-1)


def grouped_gemm(a: Fp8Tensor, b: Fp8Tensor, counts: list[int], out_dtype: torch.dtype,
                 grouped: bool = True) -> torch.Tensor:
    """Rows of a [M, K] grouped by `counts` (each a multiple of GEMM_ALIGN), group g times b's expert
    g [N, K]^T: [M, N]. One torch._scaled_grouped_mm where it serves (`_grouped_on_gpu`), else one
    `gemm` per non-empty group (`grouped=False` asks for that: the baseline it is measured against)."""
    g, n = b.data.shape[0], b.data.shape[1]
    if _grouped_on_gpu(a, out_dtype, grouped):
        scale_b = b.scale_inv.reshape(g, -1).expand(g, n).contiguous()
        return torch._scaled_grouped_mm(a.data, b.data.transpose(1, 2), _per_row(a.scale_inv, a.data.shape[0]),
                                        scale_b, offs=group_ends(counts, a.data.device), out_dtype=out_dtype)
    out, start = a.data.new_empty((a.data.shape[0], n), dtype=out_dtype), 0
    for e, c in enumerate(counts):
        if c:
            out[start:start + c] = gemm(a.rows(start, start + c), b.expert(e), out_dtype)
        start += c
    return out


def grouped_weight_gemm(a: Fp8Tensor, b: Fp8Tensor, counts: list[int],
                        grouped: bool = True) -> "torch.Tensor | Iterator[tuple[int, Fp8Tensor, Fp8Tensor]]":
    """The weight gradients of grouped rows: a [N, M] (dy^T) and b [K, M] (x^T), both quantised along
    M, whose columns are grouped by `counts` (multiples of the recipe's token multiple); for group g
    a[:, g] @ b[:, g]^T [N, K]. Where one torch._scaled_grouped_mm serves: all groups as one bf16
    [G, N, K] tensor (zero for an empty group). Else (group, a's columns, b's columns) for each
    group with rows, the operands of its product (`add_weight_gemm` adds it where it is kept)."""
    n, k = a.data.shape[0], b.data.shape[0]
    if _grouped_on_gpu(a, torch.bfloat16, grouped):
        g = len(counts)
        out = torch._scaled_grouped_mm(a.data, b.data.t(), _per_row(a.scale_inv, n).repeat(g),
                                       _per_row(b.scale_inv, k).repeat(g), offs=group_ends(counts, a.data.device),
                                       out_dtype=torch.bfloat16)
        empty = [e for e, c in enumerate(counts) if not c]
        if empty:
            out[empty] = 0
        return out
    starts = itertools.accumulate(counts, initial=0)
    return ((e, a.cols(s, s + c), b.cols(s, s + c)) for e, (s, c) in enumerate(zip(starts, counts)) if c)


def fp8_unsupported(device: torch.device) -> Optional[str]:
    """Why `device` cannot run these FP8 GEMMs, or None: they need a CUDA GPU of compute capability
    9.0 or newer (Hopper: every recipe, blockwise included); on the CPU they are emulated."""
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        return f"the {device.type} device has no FP8 GEMMs here"
    return no_fp8_gemms(torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device))


def no_fp8_gemms(name: str, capability: tuple[int, int]) -> Optional[str]:
    """Why a CUDA GPU `name` of `capability` cannot run these FP8 GEMMs, or None."""
    if tuple(capability) >= (9, 0):
        return None
    return (f"{name} (compute capability {capability[0]}.{capability[1]}) has no FP8 GEMMs for these recipes: "
            "they need 9.0 or newer (Hopper)")


@dataclass(frozen=True)
class Fp8Weight:
    """A weight's FP8 copy along its inputs (`w`: the forward's B) and its copy along its outputs
    (`t()`: the input gradient's B), for one optimizer step. With one scale or square blocks W^T is w
    transposed; a rowwise W^T is a quantisation of its own, made from the weight (`source`). A dense
    weight's W^T is made when the backward asks and not kept (1 byte per parameter less held for the
    step; rowwise quantises W again, a few % of the 7B-width step); routed experts keep theirs
    (`cached_t`), since making all the experts' stack for every micro-batch costs more than the
    bytes it saves (bench/results/fp8_grouped_qwen2_57b_a14b_h100-80gb-hbm3_2026-12-07.json)."""

    w: Fp8Tensor
    cached_t: Optional[Fp8Tensor] = None
    source: Optional[torch.Tensor] = None  # rowwise, not cached: the weight [-1, in] W^T is made from

    def t(self) -> Fp8Tensor:
        if self.cached_t is not None:
            return self.cached_t
        if self.source is not None:
            return quantize_pair(self.source, self.w.tiling, self.w.data.dtype)[1]
        return self.w.t()

    def nbytes(self) -> int:
        return self.w.nbytes() + (0 if self.cached_t is None else self.cached_t.nbytes())


def _quantize_weight(w: torch.Tensor, rcp: Fp8Recipe, keep_t: bool = False) -> Fp8Weight:
    w2 = w.reshape(-1, w.shape[-1])
    q, t = quantize_pair(w2, rcp.weight_tiling, rcp.weight_dtype, transpose=keep_t)
    return Fp8Weight(q, t, w2 if rcp.weight_tiling == "row" and not keep_t else None)


def _quantize_experts(w: torch.Tensor, rcp: Fp8Recipe) -> Fp8Weight:
    """Each expert of w [G, out, in] quantised as `_quantize_weight`, stacked; written in place expert
    by expert, so that no second copy of the whole is made."""
    stacked = None
    for e in range(w.shape[0]):
        q = _quantize_weight(w[e], rcp, keep_t=True)
        parts = [q.w, q.cached_t]
        if stacked is None:
            stacked = [(p.data.new_empty((w.shape[0],) + p.data.shape),
                        p.scale_inv.new_empty((w.shape[0],) + p.scale_inv.shape)) for p in parts]
        for (data, scale), p in zip(stacked, parts):
            data[e].copy_(p.data)
            scale[e].copy_(p.scale_inv)
    return Fp8Weight(*(Fp8Tensor(data, scale, rcp.weight_tiling) for data, scale in stacked))


class Fp8Weights:
    """The FP8 copies of the weights of one model (`Fp8Weight`), made at their first use after
    `clear()`. The training step clears it when a step or a validation begins (the weights may have
    changed since: an update, a checkpoint load), so a weight is quantised once per optimizer step,
    not once per micro-batch."""

    def __init__(self):
        self._copies: dict[int, tuple[torch.Tensor, Fp8Weight]] = {}

    def clear(self) -> None:
        self._copies.clear()

    def get(self, weight: torch.Tensor, rcp: Fp8Recipe, experts: bool = False) -> Fp8Weight:
        """The FP8 copy of `weight` viewed as [-1, in]; with `experts`, of each expert of a routed
        experts' weight [G, out, in], stacked (`Fp8Tensor.expert`)."""
        held = self._copies.get(id(weight))
        if held is not None and held[0] is weight:
            return held[1]
        with torch.no_grad():
            copy = (_quantize_experts if experts else _quantize_weight)(weight.detach(), rcp)
        self._copies[id(weight)] = (weight, copy)
        return copy

    def nbytes(self) -> int:
        return sum(copy.nbytes() for _, copy in self._copies.values())


@dataclass(frozen=True)
class Fp8:
    """What a layer needs to run its GEMMs in FP8: the recipe and the model's weight copies."""

    recipe: Fp8Recipe
    weights: Fp8Weights
    # Routed experts' products as one grouped GEMM where the recipe has one on the device (else,
    # and when False, one GEMM per expert: bench/fp8_grouped.py measures the two).
    grouped_gemms: bool = True
    # The ops that make a linear layer's input (RMSNorm, SwiGLU) hand it over quantised
    # (`Fp8Input`) where nothing stands between them and the GEMM; False quantises in the layer
    # (the same values; bench/kernels.py times the two).
    fused_quantization: bool = True


def fused_recipe(fp8: Optional[Fp8]) -> Optional[Fp8Recipe]:
    """The recipe an op that makes an FP8 layer's input quantises its output with (`fp8_out` of
    RMSNorm, `ops.swiglu_fp8`), or None: no FP8, or `fused_quantization` off."""
    return fp8.recipe if fp8 is not None and fp8.fused_quantization else None
