// FP8 (e4m3) quantisation of a 2D tensor x [R, C] along its rows, and of its transpose x^T [C, R]
// along x's columns, bit for bit as megatron_qwen2.ops.fp8.quantize defines it:
//
//   scale     = (1 / max(amax, 1e-12)) * 448    fp32, each operation rounded to nearest even
//                                              (the definition's `448 / amax` is torch's
//                                              reciprocal-then-multiply, not a division)
//   code      = e4m3(saturate(float(x) * scale)), rounded to nearest even; NaN stays NaN
//   scale_inv = 1 / scale
//
// amax is max |x| over a row ("row"), over 128 consecutive columns of a row ("1x128", the last
// tile of a row may be shorter) or over the whole tensor ("tensor"); a NaN in the group makes
// amax NaN, as torch.amax propagates it. Amaxes are carried as the bit patterns of non-negative
// floats: their unsigned order is the float order with every NaN above +inf, so an unsigned max
// (and atomicMax across blocks) is exact and propagates NaN. Codes are stored as bytes.
//
// Kernels (outputs row-major unless noted; nc = ceil(C / 128), nr = ceil(R / 128)):
//   quantize_rows       reads x once (the row stays in registers; rows too long for that are
//                       read twice, the second time from cache); writes data [R, C] and
//                       scale_inv [R]: one block per row.
//   amax_tensor         reads x; atomicMax of each block's amax into amax[0].
//   amax_rows_cols      (fp8_quant.cuh) reads x; atomicMax into row_amax [R] and col_amax [C]: a block covers
//                       256 columns and a band of rows.
//   cast_tensor         reads x and amax[0]; writes data [R, C] and scale_inv [] (block 0).
//   quantize_tile       (fp8_quant.cuh) reads a 128 x 128 tile of x once; writes that tile of data [R, C] (scaled
//                       along rows) and, with the transpose, of data_t [C, R] (scaled along x's
//                       columns, through shared memory), the scales from the tile itself ("1x128":
//                       scale_inv [R, nc] and scale_inv_t [C, nr], both column-major), from
//                       row_amax / col_amax ("row": scale_inv [R], scale_inv_t [C]) or from
//                       amax[0] ("tensor"). "1x128" without the transpose is this kernel's first half.
// So "row" with the transpose and "tensor" read x twice (an amax pass, then the cast), the other
// cases once; every output is written once.

// The pieces shared with the ops that quantise what they produce (amax, scale, cast, the 128 x 128
// tile kernel and its sources) live in fp8_quant.cuh.

#include "fp8_quant.cuh"

#include <string>

namespace {

// ---- "row" without the transpose: one block per row. CHUNKS > 0: thread t holds chunks
// t + i * blockDim.x (i < CHUNKS) in registers between the amax and the cast; CHUNKS == 0: the
// row is read again for the cast (it is still in L1 / L2), kStreamUnroll chunks at a time.
constexpr int kStreamUnroll = 4;

template <typename T, bool VEC, int CHUNKS>
__global__ void __launch_bounds__(512) quantize_rows_kernel(const T* __restrict__ x, uint8_t* __restrict__ q,
                                                            float* __restrict__ sinv, int64_t rows, int64_t cols) {
  __shared__ uint32_t scratch[32];
  const int64_t nchunks = (cols + kChunk - 1) / kChunk;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * cols;
    uint8_t* qr = q + r * cols;
    uint32_t m = 0;
    Chunk<T> c[CHUNKS > 0 ? CHUNKS : 1];
    if constexpr (CHUNKS > 0) {
#pragma unroll
      for (int i = 0; i < CHUNKS; ++i) {
        c[i] = load_chunk<T, VEC>(xr, (threadIdx.x + (int64_t)i * blockDim.x) * kChunk, cols);
        m = max(m, chunk_amax<T>(c[i]));
      }
    } else {
      for (int64_t k0 = threadIdx.x; k0 < nchunks; k0 += kStreamUnroll * blockDim.x) {
        Chunk<T> d[kStreamUnroll];
#pragma unroll
        for (int u = 0; u < kStreamUnroll; ++u) d[u] = load_chunk<T, VEC>(xr, (k0 + u * blockDim.x) * kChunk, cols);
#pragma unroll
        for (int u = 0; u < kStreamUnroll; ++u) m = max(m, chunk_amax<T>(d[u]));
      }
    }
    const float s = scale_of(block_max(m, scratch));
    if (threadIdx.x == 0) sinv[r] = rcp_rn(s);
    if constexpr (CHUNKS > 0) {
#pragma unroll
      for (int i = 0; i < CHUNKS; ++i) {
        const int64_t col = (threadIdx.x + (int64_t)i * blockDim.x) * kChunk;
        if (col < cols) store_codes(qr, col, cols, quantize_chunk<T>(c[i], s), (cols & 7) == 0);
      }
    } else {
      for (int64_t k0 = threadIdx.x; k0 < nchunks; k0 += kStreamUnroll * blockDim.x) {
        Chunk<T> d[kStreamUnroll];
#pragma unroll
        for (int u = 0; u < kStreamUnroll; ++u) d[u] = load_chunk<T, VEC>(xr, (k0 + u * blockDim.x) * kChunk, cols);
#pragma unroll
        for (int u = 0; u < kStreamUnroll; ++u) {
          const int64_t col = (k0 + u * blockDim.x) * kChunk;
          if (col < cols) store_codes(qr, col, cols, quantize_chunk<T>(d[u], s), (cols & 7) == 0);
        }
      }
    }
  }
}

// ---- "tensor": the amax of the flat tensor of n elements, then the cast.
constexpr int kUnrollFlat = 4;

template <typename T, bool VEC>
__global__ void __launch_bounds__(256) amax_tensor_kernel(const T* __restrict__ x, uint32_t* __restrict__ amax,
                                                          int64_t n) {
  __shared__ uint32_t scratch[32];
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  uint32_t m = 0;
  for (int64_t k0 = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k0 < nchunks; k0 += kUnrollFlat * stride) {
    Chunk<T> c[kUnrollFlat];
#pragma unroll
    for (int u = 0; u < kUnrollFlat; ++u) c[u] = load_chunk<T, VEC>(x, (k0 + u * stride) * kChunk, n);
#pragma unroll
    for (int u = 0; u < kUnrollFlat; ++u) m = max(m, chunk_amax<T>(c[u]));
  }
  m = block_max(m, scratch);
  if (threadIdx.x == 0 && m != 0) atomicMax(amax, m);
}

template <typename T, bool VEC>
__global__ void __launch_bounds__(256) cast_tensor_kernel(const T* __restrict__ x, const uint32_t* __restrict__ amax,
                                                          uint8_t* __restrict__ q, float* __restrict__ sinv,
                                                          int64_t n) {
  const float s = scale_of(*amax);
  if (blockIdx.x == 0 && threadIdx.x == 0) *sinv = rcp_rn(s);
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t k0 = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k0 < nchunks; k0 += kUnrollFlat * stride) {
    Chunk<T> c[kUnrollFlat];
#pragma unroll
    for (int u = 0; u < kUnrollFlat; ++u) c[u] = load_chunk<T, VEC>(x, (k0 + u * stride) * kChunk, n);
#pragma unroll
    for (int u = 0; u < kUnrollFlat; ++u) {
      const int64_t col = (k0 + u * stride) * kChunk;
      if (col < n) store_codes(q, col, n, quantize_chunk<T>(c[u], s), true);
    }
  }
}


// ---- Transpose of FP8 codes: x [G, R, C] bytes -> y [G, C, R]. A block moves a 128 x 128 tile
// through shared memory: 16-byte row loads into a tile whose 16-byte chunks are permuted by the
// row's band of 16 (so the column reads below touch 32 different banks), then each thread reads a
// 16-row x 4-column patch as 16 words, transposes it in registers (byte permutes) and stores four
// 16-byte pieces of output rows. Edges (R or C not a multiple of 16, partial tiles) go byte by byte.

constexpr int kTrTile = 128;

// Physical word of (row, word) in the tile: the chunk index XOR the row's band of 16.
__device__ __forceinline__ int tr_word(int row, int word) { return row * (kTrTile / 4) + (word ^ (((row >> 4) & 7) << 2)); }

__global__ void __launch_bounds__(256) transpose_codes_kernel(const uint8_t* __restrict__ x, uint8_t* __restrict__ y,
                                                              int64_t rows, int64_t cols, int64_t col_tiles) {
  __shared__ __align__(16) uint32_t tile[kTrTile * kTrTile / 4];
  const int64_t g = blockIdx.y;
  x += g * rows * cols;
  y += g * rows * cols;
  const int64_t r0 = (blockIdx.x / col_tiles) * kTrTile, c0 = (blockIdx.x % col_tiles) * kTrTile;
  const int t = threadIdx.x;
  const bool rows16 = rows % 16 == 0, cols16 = cols % 16 == 0;

  // Load: a warp covers 4 rows of 8 chunks (128 bytes each).
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = t / 8 + 32 * i, ch = t % 8;
    const int64_t gr = r0 + r, gc = c0 + ch * 16;
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (gr < rows && gc < cols) {
      if (cols16) {
        v = *reinterpret_cast<const uint4*>(x + gr * cols + gc);
      } else {
        alignas(16) uint8_t b[16];
#pragma unroll
        for (int k = 0; k < 16; ++k) b[k] = gc + k < cols ? x[gr * cols + gc + k] : 0;
        v = *reinterpret_cast<const uint4*>(b);
      }
    }
    *reinterpret_cast<uint4*>(&tile[tr_word(r, ch * 4)]) = v;
  }
  __syncthreads();

  // Store: thread (band, word) holds input rows band*16 .. +15 of input columns word*4 .. +3,
  // i.e. 16 bytes of each of 4 output rows; a warp (4 words x 8 bands) writes 16 output rows, 128
  // contiguous bytes each.
  const int band = t % 8, word = t / 8;
  uint32_t w[16];
#pragma unroll
  for (int k = 0; k < 16; ++k) w[k] = tile[tr_word(band * 16 + k, word)];
  uint32_t out[4][4];  // out[b][q]: output row word*4 + b, bytes 4q .. 4q+3 of its 16
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const uint32_t lo01 = __byte_perm(w[4 * q], w[4 * q + 1], 0x5140), lo23 = __byte_perm(w[4 * q + 2], w[4 * q + 3], 0x5140);
    const uint32_t hi01 = __byte_perm(w[4 * q], w[4 * q + 1], 0x7362), hi23 = __byte_perm(w[4 * q + 2], w[4 * q + 3], 0x7362);
    out[0][q] = __byte_perm(lo01, lo23, 0x5410);
    out[1][q] = __byte_perm(lo01, lo23, 0x7632);
    out[2][q] = __byte_perm(hi01, hi23, 0x5410);
    out[3][q] = __byte_perm(hi01, hi23, 0x7632);
  }
#pragma unroll
  for (int b = 0; b < 4; ++b) {
    const int64_t orow = c0 + word * 4 + b, ocol = r0 + band * 16;
    if (orow >= cols || ocol >= rows) continue;
    uint8_t* dst = y + orow * rows + ocol;
    if (rows16) {
      *reinterpret_cast<uint4*>(dst) = make_uint4(out[b][0], out[b][1], out[b][2], out[b][3]);
    } else {
      const uint8_t* bytes = reinterpret_cast<const uint8_t*>(out[b]);
#pragma unroll
      for (int k = 0; k < 16; ++k)
        if (ocol + k < rows) dst[k] = bytes[k];
    }
  }
}

// ---- Launchers.

int grid_for(int64_t work, int threads, int per_sm) {
  const int64_t needed = (work + threads - 1) / threads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(needed, (int64_t)mq2::num_sms() * per_sm)));
}

template <typename T, bool VEC>
void launch_rows(const T* x, uint8_t* q, float* sinv, int64_t rows, int64_t cols, cudaStream_t stream) {
  // The fewest chunks per thread (16 only for 16-bit types: 64 registers of data) that keep the
  // block at <= 256 threads, else 8 chunks and <= 512 threads; longer rows are read twice.
  const int64_t nchunks = (cols + kChunk - 1) / kChunk;
  auto threads_for = [&](int64_t per) { return ((nchunks + per - 1) / per + 31) / 32 * 32; };
  const int grid = static_cast<int>(std::min<int64_t>(rows, int64_t(1) << 30));
  auto go = [&](auto chunks, int64_t threads) {
    quantize_rows_kernel<T, VEC, decltype(chunks)::value>
        <<<grid, static_cast<int>(threads), 0, stream>>>(x, q, sinv, rows, cols);
  };
  if (threads_for(1) <= 256) {
    go(std::integral_constant<int, 1>{}, threads_for(1));
  } else if (threads_for(2) <= 256) {
    go(std::integral_constant<int, 2>{}, threads_for(2));
  } else if (threads_for(4) <= 256) {
    go(std::integral_constant<int, 4>{}, threads_for(4));
  } else if (threads_for(8) <= 256) {
    go(std::integral_constant<int, 8>{}, threads_for(8));
  } else if (sizeof(T) == 2 && threads_for(16) <= 256) {
    if constexpr (sizeof(T) == 2) go(std::integral_constant<int, 16>{}, threads_for(16));
  } else if (threads_for(8) <= 512) {
    go(std::integral_constant<int, 8>{}, threads_for(8));
  } else {
    go(std::integral_constant<int, 0>{}, 512);
  }
}

template <typename T>
void quantize_typed(const at::Tensor& x, int tiling, at::Tensor& data, at::Tensor& scale_inv,
                    const c10::optional<at::Tensor>& data_t, const c10::optional<at::Tensor>& scale_inv_t,
                    const c10::optional<at::Tensor>& amax, cudaStream_t stream) {
  const int64_t rows = x.size(0), cols = x.size(1), n = rows * cols;
  const T* xp = static_cast<const T*>(x.data_ptr());
  uint8_t* q = static_cast<uint8_t*>(data.data_ptr());
  float* sinv = scale_inv.data_ptr<float>();
  uint8_t* qt = data_t ? static_cast<uint8_t*>(data_t->data_ptr()) : nullptr;
  float* sinv_t = scale_inv_t ? scale_inv_t->data_ptr<float>() : nullptr;
  uint32_t* am = amax ? reinterpret_cast<uint32_t*>(amax->data_ptr<int32_t>()) : nullptr;
  const bool aligned = mq2::aligned16(xp);
  const bool vec_rows = aligned && cols % kChunk == 0;  // every row's chunks start 16-byte aligned
  if (tiling == 0) {  // tensor
    launch_vec(aligned, [&](auto vec) {
      constexpr bool V = decltype(vec)::value;
      const int64_t nchunks = (n + kChunk - 1) / kChunk;
      amax_tensor_kernel<T, V><<<grid_for(nchunks, 256 * kUnrollFlat, 8), 256, 0, stream>>>(xp, am, n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (!qt) {
        cast_tensor_kernel<T, V><<<grid_for(nchunks, 256 * kUnrollFlat, 8), 256, 0, stream>>>(xp, am, q, sinv, n);
      }
    });
    if (qt) launch_vec(vec_rows, [&](auto vec) {
      const Rows<T, decltype(vec)::value> src{xp, rows, cols};
      launch_tiles<decltype(src), Scales::kTensor>(src, q, qt, sinv, nullptr, am, rows, cols, stream);
    });
  } else if (tiling == 1) {  // row
    if (!qt) {
      launch_vec(vec_rows, [&](auto vec) { launch_rows<T, decltype(vec)::value>(xp, q, sinv, rows, cols, stream); });
    } else {
      launch_vec(vec_rows, [&](auto vec) {
        const Rows<T, decltype(vec)::value> src{xp, rows, cols};
        launch_amax<decltype(src), Amax::kRowsCols>(src, am, am + rows, rows, cols, stream);
        launch_tiles<decltype(src), Scales::kRowCol>(src, q, qt, sinv, sinv_t, am, rows, cols, stream);
      });
    }
  } else {  // 1x128
    launch_vec(vec_rows, [&](auto vec) {
      const Rows<T, decltype(vec)::value> src{xp, rows, cols};
      if (qt) {
        launch_tiles<decltype(src), Scales::kTile>(src, q, qt, sinv, sinv_t, nullptr, rows, cols, stream);
      } else {
        launch_tiles<decltype(src), Scales::kTile, true, false>(src, q, nullptr, sinv, nullptr, nullptr, rows, cols,
                                                                stream);
      }
    });
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// Inputs are validated and outputs allocated by fp8_quantize / fp8_quantize_tensorwise in
// bindings.cpp: x a contiguous 2D CUDA tensor (fp32 / bf16 / fp16) with R, C >= 1; data (and
// data_t) e4m3 [R, C] ([C, R]); scale_inv / scale_inv_t fp32 in the layouts described above;
// amax int32 zeros, [R + C] for "row" with the transpose and [1] for "tensor".
void fp8_quantize_cuda(const at::Tensor& x, const std::string& tiling, at::Tensor& data, at::Tensor& scale_inv,
                       const c10::optional<at::Tensor>& data_t, const c10::optional<at::Tensor>& scale_inv_t,
                       const c10::optional<at::Tensor>& amax) {
  const int code = tiling == "tensor" ? 0 : tiling == "row" ? 1 : tiling == "1x128" ? 2 : -1;
  TORCH_CHECK(code >= 0, "fp8_quantize: unknown tiling ", tiling);
  TORCH_CHECK(code == 0 || data_t.has_value() == scale_inv_t.has_value(),
              "fp8_quantize: data_t and scale_inv_t go together");
  TORCH_CHECK(amax.has_value() || !(code == 0 || (code == 1 && data_t)), "fp8_quantize: the amax scratch is missing");
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = mq2::current_stream();
  MQ2_DISPATCH(x.scalar_type(), T, quantize_typed<T>(x, code, data, scale_inv, data_t, scale_inv_t, amax, stream));
}

// x: contiguous CUDA bytes [G, R, C] (G = 1 for a matrix; FP8 codes); y: [G, C, R], allocated by
// fp8_transpose in bindings.cpp. G <= 65535.
void fp8_transpose_cuda(const at::Tensor& x, at::Tensor& y, int64_t groups, int64_t rows, int64_t cols) {
  const int64_t col_tiles = (cols + kTrTile - 1) / kTrTile;
  const int64_t tiles = ((rows + kTrTile - 1) / kTrTile) * col_tiles;
  TORCH_CHECK(tiles < (int64_t(1) << 31) && groups <= 65535, "fp8_transpose: too many tiles: ", tiles, " x ", groups);
  const c10::cuda::CUDAGuard guard(x.device());
  transpose_codes_kernel<<<dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(groups)), 256, 0,
                           mq2::current_stream()>>>(static_cast<const uint8_t*>(x.data_ptr()),
                                                    static_cast<uint8_t*>(y.data_ptr()), rows, cols, col_tiles);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
