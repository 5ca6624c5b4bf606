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
//   amax_rows_cols      reads x; atomicMax into row_amax [R] and col_amax [C]: a block covers
//                       256 columns and a band of rows.
//   cast_tensor         reads x and amax[0]; writes data [R, C] and scale_inv [] (block 0).
//   quantize_tile       reads a 128 x 128 tile of x once; writes that tile of data [R, C] (scaled
//                       along rows) and, with the transpose, of data_t [C, R] (scaled along x's
//                       columns, through shared memory), the scales from the tile itself ("1x128":
//                       scale_inv [R, nc] and scale_inv_t [C, nr], both column-major), from
//                       row_amax / col_amax ("row": scale_inv [R], scale_inv_t [C]) or from
//                       amax[0] ("tensor"). "1x128" without the transpose is this kernel's first half.
// So "row" with the transpose and "tensor" read x twice (an amax pass, then the cast), the other
// cases once; every output is written once.

#include "common.cuh"

#include <cuda_fp8.h>

#include <string>
#include <type_traits>

namespace {

constexpr float kFp8Max = 448.0f;  // e4m3 (float8_e4m3fn)
constexpr int kTile = 128;         // the 1 x 128 tile, and the side of the transpose tile
constexpr int kChunk = 8;          // consecutive elements of a row a thread loads at once

// ---- fp32 arithmetic exactly as torch does it. The build passes --use_fast_math (denormals
// flushed, approximate reciprocal); these PTX instructions are IEEE round-to-nearest without
// flushing: 1 / amax is denormal for amax > 2^126 and torch keeps it.
__device__ __forceinline__ float mul_rn(float a, float b) {
  float d;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
  return d;
}

__device__ __forceinline__ float rcp_rn(float a) {
  float d;
  asm("rcp.rn.f32 %0, %1;" : "=f"(d) : "f"(a));
  return d;
}

// The scale of a group from the bits of its amax; the unsigned max with the floor's bits is
// clamp(min=1e-12) and keeps a NaN amax NaN.
__device__ __forceinline__ float scale_of(uint32_t amax_bits) {
  const uint32_t a = max(amax_bits, __float_as_uint(1e-12f));
  return mul_rn(rcp_rn(__uint_as_float(a)), kFp8Max);
}

// Two e4m3 codes (saturating to +-448, round to nearest even, NaN to NaN); lo in the low byte.
__device__ __forceinline__ uint32_t e4m3x2(float lo, float hi) {
  return __nv_cvt_float2_to_fp8x2(make_float2(lo, hi), __NV_SATFINITE, __NV_E4M3);
}

// ---- Storage words. A chunk is 8 consecutive elements of a row as raw 32-bit words: two
// 16-bit elements per word (element 2k in the low half of word k) or one fp32 element.
template <typename T>
struct Chunk {
  static constexpr int kWords = kChunk * static_cast<int>(sizeof(T)) / 4;
  uint32_t w[kWords];
};

template <typename T>
__device__ __forceinline__ float from_bits16(uint32_t u) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __uint_as_float(u << 16);
  } else {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(u)));
  }
}

// Element j of a chunk (or of any word array laid out like one) as fp32, exactly.
template <typename T>
__device__ __forceinline__ float elem(const uint32_t* w, int j) {
  if constexpr (sizeof(T) == 4) {
    return __uint_as_float(w[j]);
  } else {
    return from_bits16<T>((w[j >> 1] >> (16 * (j & 1))) & 0xFFFFu);
  }
}

// Running |x| maxima, per element of a word: m holds maxima of the raw |x| bits, which order
// as the values do (NaN above inf) for each storage type.
template <typename T>
__device__ __forceinline__ uint32_t max_abs(uint32_t m, uint32_t w) {
  if constexpr (sizeof(T) == 4) {
    return max(m, w & 0x7FFFFFFFu);
  } else {
    const uint32_t a = w & 0x7FFF7FFFu;
    uint32_t d;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm("max.u16x2 %0, %1, %2;" : "=r"(d) : "r"(m), "r"(a));
#else
    d = __vmaxu2(m, a);
#endif
    return d;
  }
}

// fp32 bits of element j's maximum in a word array of running maxima.
template <typename T>
__device__ __forceinline__ uint32_t max_bits(const uint32_t* m, int j) {
  return __float_as_uint(elem<T>(m, j));
}

// fp32 bits of the largest |x| of a chunk.
template <typename T>
__device__ __forceinline__ uint32_t chunk_amax(const Chunk<T>& c) {
  uint32_t m = 0;
#pragma unroll
  for (int k = 0; k < Chunk<T>::kWords; ++k) m = max_abs<T>(m, c.w[k]);
  if constexpr (sizeof(T) == 4) {
    return m;
  } else {
    return __float_as_uint(from_bits16<T>(max(m & 0xFFFFu, m >> 16)));
  }
}

template <typename T>
__device__ __forceinline__ Chunk<T> zero_chunk() {
  Chunk<T> c;
#pragma unroll
  for (int k = 0; k < Chunk<T>::kWords; ++k) c.w[k] = 0;
  return c;
}

// Elements col .. col + 7 of a row of `cols` elements, zeros past its end. VEC: every chunk
// start is 16-byte aligned (x aligned, cols % 8 == 0, or a flat tensor), so whole chunks load
// as 16-byte vectors; a chunk that crosses the end loads element by element.
template <typename T, bool VEC>
__device__ __forceinline__ Chunk<T> load_chunk(const T* __restrict__ row, int64_t col, int64_t cols) {
  Chunk<T> c = zero_chunk<T>();
  if (VEC && col + kChunk <= cols) {
    const uint4* p = reinterpret_cast<const uint4*>(row + col);
#pragma unroll
    for (int k = 0; k < Chunk<T>::kWords / 4; ++k) {
      const uint4 v = p[k];
      c.w[4 * k] = v.x;
      c.w[4 * k + 1] = v.y;
      c.w[4 * k + 2] = v.z;
      c.w[4 * k + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int j = 0; j < kChunk; ++j) {
      if (col + j < cols) {
        if constexpr (sizeof(T) == 4) {
          c.w[j] = reinterpret_cast<const uint32_t*>(row)[col + j];
        } else {
          c.w[j >> 1] |= uint32_t(reinterpret_cast<const unsigned short*>(row)[col + j]) << (16 * (j & 1));
        }
      }
    }
  }
  return c;
}

// The 8 e4m3 codes of a chunk scaled by s, element 0 in the lowest byte.
template <typename T>
__device__ __forceinline__ uint2 quantize_chunk(const Chunk<T>& c, float s) {
  uint32_t b[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) b[k] = e4m3x2(mul_rn(elem<T>(c.w, 2 * k), s), mul_rn(elem<T>(c.w, 2 * k + 1), s));
  return make_uint2(b[0] | (b[1] << 16), b[2] | (b[3] << 16));
}

// Codes of elements col .. col + 7 of a row of `cols` bytes (those inside it): one 8-byte store
// when the chunk is whole and `aligned` (the row starts 8-byte aligned: cols % 8 == 0, or a flat
// tensor).
__device__ __forceinline__ void store_codes(uint8_t* __restrict__ row, int64_t col, int64_t cols, uint2 v,
                                            bool aligned) {
  if (aligned && col + kChunk <= cols) {
    *reinterpret_cast<uint2*>(row + col) = v;
  } else {
#pragma unroll
    for (int j = 0; j < kChunk; ++j) {
      if (col + j < cols) row[col + j] = static_cast<uint8_t>((j < 4 ? v.x : v.y) >> (8 * (j & 3)));
    }
  }
}

// Max over the block of each thread's m (blockDim.x a multiple of 32); every thread gets it. The
// trailing barrier lets the caller reuse `scratch` (32 words) at once.
__device__ __forceinline__ uint32_t block_max(uint32_t m, uint32_t* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  m = __reduce_max_sync(0xffffffffu, m);
  if (lane == 0) scratch[warp] = m;
  __syncthreads();
  m = __reduce_max_sync(0xffffffffu, lane < warps ? scratch[lane] : 0u);
  __syncthreads();
  return m;
}

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

// ---- "row" with the transpose, pass 1: row and column amaxes. Lane l of warp w takes columns
// c0 + 8l .. c0 + 8l + 7 of rows r0 + w, r0 + w + 8, ... (c0 = 256 * column tile, a band of
// `band` rows per block); a row's maximum over the warp and a column's over the block go to
// global memory with one atomicMax each.
constexpr int kColsPerBlock = 256;
constexpr int kUnrollRows = 8;

template <typename T, bool VEC>
__global__ void __launch_bounds__(256) amax_rows_cols_kernel(const T* __restrict__ x, uint32_t* __restrict__ row_amax,
                                                             uint32_t* __restrict__ col_amax, int64_t rows,
                                                             int64_t cols, int64_t band) {
  __shared__ uint32_t red[8][kColsPerBlock];
  const int64_t col_tiles = (cols + kColsPerBlock - 1) / kColsPerBlock;
  const int64_t tr = blockIdx.x / col_tiles, tc = blockIdx.x % col_tiles;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t col = tc * kColsPerBlock + lane * kChunk;
  const int64_t r0 = tr * band, r1 = min(rows, r0 + band);
  uint32_t cm[Chunk<T>::kWords];
#pragma unroll
  for (int k = 0; k < Chunk<T>::kWords; ++k) cm[k] = 0;
  for (int64_t r = r0 + warp; r < r1; r += 8 * kUnrollRows) {  // warp-uniform bounds
    Chunk<T> c[kUnrollRows];
#pragma unroll
    for (int u = 0; u < kUnrollRows; ++u)
      c[u] = r + 8 * u < r1 ? load_chunk<T, VEC>(x + (r + 8 * u) * cols, col, cols) : zero_chunk<T>();
#pragma unroll
    for (int u = 0; u < kUnrollRows; ++u) {
#pragma unroll
      for (int k = 0; k < Chunk<T>::kWords; ++k) cm[k] = max_abs<T>(cm[k], c[u].w[k]);
      if (r + 8 * u < r1) {
        const uint32_t m = __reduce_max_sync(0xffffffffu, chunk_amax<T>(c[u]));
        if (lane == 0 && m != 0) atomicMax(row_amax + r + 8 * u, m);
      }
    }
  }
#pragma unroll
  for (int j = 0; j < kChunk; ++j) red[warp][lane * kChunk + j] = max_bits<T>(cm, j);
  __syncthreads();
  uint32_t m = 0;
#pragma unroll
  for (int w = 0; w < 8; ++w) m = max(m, red[w][threadIdx.x]);
  const int64_t c = tc * kColsPerBlock + threadIdx.x;
  if (c < cols && m != 0) atomicMax(col_amax + c, m);
}

// ---- The cast of a 128 x 128 tile, and of its transpose when TRANSPOSE (see the top of the file
// for the three scale sources). Thread t loads chunk l = t % 16 (columns c0 + 8l ..) of tile rows
// t / 16 + 16i, i < 8, all eight before using any, so that many loads are in flight; the 16 lanes
// of a half-warp hold one tile row. For the transpose the tile goes to shared memory with chunk k
// of tile row r at chunk k ^ (4 * ((r / 16) & 1)): the transposed reads below (two columns of 16
// rows per lane, lane pairs 16 rows apart) are then free of bank conflicts.
enum class Scales { kTile, kRowCol, kTensor };

__host__ __device__ constexpr int tile_smem_bytes(int elem_bytes) { return kTile * kTile * elem_bytes; }

__device__ __forceinline__ int swizzled(int r, int col) {  // element offset of (r, col) in the tile
  return r * kTile + (((col / kChunk) ^ (((r >> 4) & 1) << 2)) * kChunk) + (col % kChunk);
}

// Phases 2 and 3 of quantize_tile with the transpose: the column scales, then data_t's codes
// from the tile in shared memory (every thread of the block calls it).
template <typename T, Scales MODE>
__device__ __forceinline__ void transpose_tile(const T* tile, uint8_t* __restrict__ qt, float* __restrict__ sinv_t,
                                               const uint32_t* __restrict__ amax, int64_t rows, int64_t cols,
                                               int64_t tr, int64_t c0, int64_t r0, float tensor_scale,
                                               uint32_t (&cm)[Chunk<T>::kWords]) {
  __shared__ uint32_t red[8][kTile];
  __shared__ float col_scale[kTile];
  const int t = threadIdx.x, lane = t & 31, warp = t >> 5, l = t & 15;
  // 2. the scales of the tile's columns
  if constexpr (MODE == Scales::kTile) {
#pragma unroll
    for (int k = 0; k < Chunk<T>::kWords; ++k) cm[k] = max_abs<T>(cm[k], __shfl_xor_sync(0xffffffffu, cm[k], 16));
    if (lane < 16) {
#pragma unroll
      for (int j = 0; j < kChunk; ++j) red[warp][l * kChunk + j] = max_bits<T>(cm, j);
    }
    __syncthreads();
    if (t < kTile) {
      uint32_t m = 0;
#pragma unroll
      for (int w = 0; w < 8; ++w) m = max(m, red[w][t]);
      const float s = scale_of(m);
      col_scale[t] = s;
      if (c0 + t < cols) sinv_t[tr * cols + c0 + t] = rcp_rn(s);
    }
  } else if constexpr (MODE == Scales::kRowCol) {
    if (t < kTile) {
      const int64_t cg = c0 + t;
      const float s = scale_of(cg < cols ? amax[rows + cg] : 0u);
      col_scale[t] = s;
      if (tr == 0 && cg < cols) sinv_t[cg] = rcp_rn(s);
    }
  }
  __syncthreads();

  // 3. codes of the transposed tile: data_t[c][r0 + 16p .. + 15] for two columns c per task; a
  // warp's task covers 16 column pairs x 2 row blocks (lane pairs write 32 contiguous bytes).
  const bool rows16 = (rows & 15) == 0;
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int wt = warp + 8 * j;
    const int pair = (wt & 3) * 16 + (lane >> 1), blk = (wt >> 2) * 2 + (lane & 1);
    const int cl = 2 * pair, rl0 = 16 * blk;
    float sa, sb;
    if constexpr (MODE == Scales::kTensor) {
      sa = sb = tensor_scale;
    } else {
      sa = col_scale[cl];
      sb = col_scale[cl + 1];
    }
    uint32_t a[4], b[4];
#pragma unroll
    for (int i = 0; i < 16; i += 2) {
      float a0, b0, a1, b1;  // (row rl0 + i, columns cl / cl + 1), then row rl0 + i + 1
      if constexpr (sizeof(T) == 4) {
        const float2 v0 = *reinterpret_cast<const float2*>(tile + swizzled(rl0 + i, cl));
        const float2 v1 = *reinterpret_cast<const float2*>(tile + swizzled(rl0 + i + 1, cl));
        a0 = v0.x, b0 = v0.y, a1 = v1.x, b1 = v1.y;
      } else {
        const uint32_t v0 = *reinterpret_cast<const uint32_t*>(tile + swizzled(rl0 + i, cl));
        const uint32_t v1 = *reinterpret_cast<const uint32_t*>(tile + swizzled(rl0 + i + 1, cl));
        a0 = elem<T>(&v0, 0), b0 = elem<T>(&v0, 1), a1 = elem<T>(&v1, 0), b1 = elem<T>(&v1, 1);
      }
      const uint32_t ca = e4m3x2(mul_rn(a0, sa), mul_rn(a1, sa)), cb = e4m3x2(mul_rn(b0, sb), mul_rn(b1, sb));
      if ((i & 2) == 0) {
        a[i >> 2] = ca;
        b[i >> 2] = cb;
      } else {
        a[i >> 2] |= ca << 16;
        b[i >> 2] |= cb << 16;
      }
    }
    const int64_t r = r0 + rl0;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t cg = c0 + cl + h;
      if (cg >= cols || r >= rows) continue;
      const uint32_t* v = h == 0 ? a : b;
      uint8_t* dst = qt + cg * rows + r;
      if (rows16) {
        *reinterpret_cast<uint4*>(dst) = make_uint4(v[0], v[1], v[2], v[3]);
      } else {
#pragma unroll
        for (int k = 0; k < 16; ++k) {
          if (r + k < rows) dst[k] = static_cast<uint8_t>(v[k >> 2] >> (8 * (k & 3)));
        }
      }
    }
  }
}

template <typename T, bool VEC, Scales MODE, bool TRANSPOSE>
__global__ void __launch_bounds__(256) quantize_tile_kernel(
    const T* __restrict__ x, uint8_t* __restrict__ q, uint8_t* __restrict__ qt, float* __restrict__ sinv,
    float* __restrict__ sinv_t, const uint32_t* __restrict__ amax, int64_t rows, int64_t cols) {
  extern __shared__ uint4 smem[];
  T* tile = reinterpret_cast<T*>(smem);
  const int64_t col_tiles = (cols + kTile - 1) / kTile;
  const int64_t tr = blockIdx.x / col_tiles, tc = blockIdx.x % col_tiles;
  const int64_t r0 = tr * kTile, c0 = tc * kTile;
  const int t = threadIdx.x, l = t & 15, rg = t >> 4;
  const int64_t col = c0 + l * kChunk;
  float tensor_scale = 0.0f;
  if constexpr (MODE == Scales::kTensor) tensor_scale = scale_of(amax[0]);

  // 1. load the tile, write its codes along rows (and the tile to shared memory)
  Chunk<T> c[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int64_t row = r0 + rg + 16 * i;
    c[i] = row < rows ? load_chunk<T, VEC>(x + row * cols, col, cols) : zero_chunk<T>();
  }
  uint32_t cm[Chunk<T>::kWords];
#pragma unroll
  for (int k = 0; k < Chunk<T>::kWords; ++k) cm[k] = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int rl = rg + 16 * i;
    const int64_t row = r0 + rl;
    if constexpr (TRANSPOSE) {
      uint4* dst = reinterpret_cast<uint4*>(tile + swizzled(rl, l * kChunk));
#pragma unroll
      for (int k = 0; k < Chunk<T>::kWords / 4; ++k)
        dst[k] = make_uint4(c[i].w[4 * k], c[i].w[4 * k + 1], c[i].w[4 * k + 2], c[i].w[4 * k + 3]);
    }
    float s;
    if constexpr (MODE == Scales::kTile) {
      if constexpr (TRANSPOSE) {
#pragma unroll
        for (int k = 0; k < Chunk<T>::kWords; ++k) cm[k] = max_abs<T>(cm[k], c[i].w[k]);
      }
      uint32_t m = chunk_amax<T>(c[i]);
#pragma unroll
      for (int o = 8; o > 0; o >>= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, o));
      s = scale_of(m);
      if (l == 0 && row < rows) sinv[tc * rows + row] = rcp_rn(s);
    } else if constexpr (MODE == Scales::kRowCol) {
      s = scale_of(row < rows ? amax[row] : 0u);
      if (tc == 0 && l == 0 && row < rows) sinv[row] = rcp_rn(s);
    } else {
      s = tensor_scale;
    }
    if (row < rows) store_codes(q + row * cols, col, cols, quantize_chunk<T>(c[i], s), (cols & 7) == 0);
  }
  if constexpr (MODE == Scales::kTensor) {
    if (blockIdx.x == 0 && t == 0) *sinv = rcp_rn(tensor_scale);
  }
  if constexpr (TRANSPOSE) {
    transpose_tile<T, MODE>(tile, qt, sinv_t, amax, rows, cols, tr, c0, r0, tensor_scale, cm);
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

template <typename F>
void launch_vec(bool vec, F&& f) {
  if (vec) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

template <typename T, Scales MODE, bool VEC, bool TRANSPOSE = true>
void launch_tiles(const T* x, uint8_t* q, uint8_t* qt, float* sinv, float* sinv_t, const uint32_t* amax,
                  int64_t rows, int64_t cols, cudaStream_t stream) {
  const int64_t tiles = ((rows + kTile - 1) / kTile) * ((cols + kTile - 1) / kTile);
  TORCH_CHECK(tiles < (int64_t(1) << 31), "fp8_quantize: too many 128 x 128 tiles: ", tiles);
  constexpr int smem = TRANSPOSE ? tile_smem_bytes(sizeof(T)) : 0;
  auto kernel = quantize_tile_kernel<T, VEC, MODE, TRANSPOSE>;
  if constexpr (smem > 48 * 1024) {  // fp32 tiles: opt in to more than 48 KiB, once per device
    static bool opted_in[64] = {false};
    int dev = 0;
    C10_CUDA_CHECK(cudaGetDevice(&dev));
    if (!opted_in[dev % 64]) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
      opted_in[dev % 64] = true;
    }
  }
  kernel<<<static_cast<unsigned>(tiles), 256, smem, stream>>>(x, q, qt, sinv, sinv_t, amax, rows, cols);
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
      launch_tiles<T, Scales::kTensor, decltype(vec)::value>(xp, q, qt, sinv, nullptr, am, rows, cols, stream);
    });
  } else if (tiling == 1) {  // row
    if (!qt) {
      launch_vec(vec_rows, [&](auto vec) { launch_rows<T, decltype(vec)::value>(xp, q, sinv, rows, cols, stream); });
    } else {
      launch_vec(vec_rows, [&](auto vec) {
        constexpr bool V = decltype(vec)::value;
        // a band of rows per block: as tall as keeps >= 8 blocks per multiprocessor, at most 256
        const int64_t col_tiles = (cols + kColsPerBlock - 1) / kColsPerBlock;
        int64_t band = 256;
        while (band > 8 && col_tiles * ((rows + band - 1) / band) < 8LL * mq2::num_sms()) band /= 2;
        const int64_t blocks = col_tiles * ((rows + band - 1) / band);
        TORCH_CHECK(blocks < (int64_t(1) << 31), "fp8_quantize: too many blocks: ", blocks);
        amax_rows_cols_kernel<T, V><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(xp, am, am + rows, rows, cols,
                                                                                      band);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        launch_tiles<T, Scales::kRowCol, V>(xp, q, qt, sinv, sinv_t, am, rows, cols, stream);
      });
    }
  } else {  // 1x128
    launch_vec(vec_rows, [&](auto vec) {
      constexpr bool V = decltype(vec)::value;
      if (qt) {
        launch_tiles<T, Scales::kTile, V>(xp, q, qt, sinv, sinv_t, nullptr, rows, cols, stream);
      } else {
        launch_tiles<T, Scales::kTile, V, false>(xp, q, nullptr, sinv, nullptr, nullptr, rows, cols, stream);
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
