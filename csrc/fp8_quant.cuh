// FP8 (e4m3) quantisation pieces shared by the kernels that quantise: csrc/fp8_quant.cu (a tensor in
// memory) and the ops that quantise the rows they produce before writing them (rms_norm.cu, swiglu.cu;
// docs/architecture.md, "Kernels"). The arithmetic is ops/fp8.py's quantize, bit for bit (see
// fp8_quant.cu's top for the definition and the three tilings).
//
// A kernel here reads the rows it quantises from a Source: an object whose `load(row, col)` gives
// elements col .. col + 7 of a row as a Chunk, zeros past the row's end and for rows past the
// source's own (the zero rows that pad the tokens to the recipe's multiple). `Rows` reads a tensor
// in memory; an op's source computes the elements from its inputs, so they never go to memory.
#pragma once

#include "common.cuh"

#include <cuda_fp8.h>

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

// ---- Sources. Each names its element type (Type) and the minimum blocks per multiprocessor the
// tile kernel's launch bounds ask for it (kMinBlocks; 0 leaves the register budget to the compiler).
// `Rows`: x [rows, cols] in memory; VEC as load_chunk's.
template <typename T, bool VEC>
struct Rows {
  using Type = T;
  static constexpr int kMinBlocks = 0;
  const T* x;
  int64_t rows, cols;

  __device__ __forceinline__ Chunk<T> load(int64_t r, int64_t col) const {
    return r < rows ? load_chunk<T, VEC>(x + r * cols, col, cols) : zero_chunk<T>();
  }
};

// The chunk of 8 fp32 values each rounded to T as from_float<T> rounds (an op's source output).
template <typename T>
__device__ __forceinline__ Chunk<T> chunk_of(const float (&v)[kChunk]) {
  Chunk<T> c;
  if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int j = 0; j < kChunk; ++j) c.w[j] = __float_as_uint(v[j]);
  } else {
    const uint4 p = mq2::repack<T>(v);
    c.w[0] = p.x, c.w[1] = p.y, c.w[2] = p.z, c.w[3] = p.w;
  }
  return c;
}

// ---- Amaxes before a cast that needs them (a source's rows [rows, cols]). Lane l of warp w takes
// columns c0 + 8l .. c0 + 8l + 7 of rows r0 + w, r0 + w + 8, ... (c0 = 256 * column tile, a band of
// `band` rows per block). kRowsCols: a row's maximum over the warp and a column's over the block go
// to row_amax [rows] and col_amax [cols] with one atomicMax each ("row" with the transpose, pass 1).
// kTensor: the block's maximum goes to col_amax[0] (row_amax unused).
constexpr int kColsPerBlock = 256;
constexpr int kUnrollRows = 8;
enum class Amax { kRowsCols, kTensor };

template <typename Src, Amax MODE>
__global__ void __launch_bounds__(256) amax_rows_cols_kernel(Src src, uint32_t* __restrict__ row_amax,
                                                             uint32_t* __restrict__ col_amax, int64_t rows,
                                                             int64_t cols, int64_t band) {
  using T = typename Src::Type;
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
    for (int u = 0; u < kUnrollRows; ++u) c[u] = r + 8 * u < r1 ? src.load(r + 8 * u, col) : zero_chunk<T>();
#pragma unroll
    for (int u = 0; u < kUnrollRows; ++u) {
#pragma unroll
      for (int k = 0; k < Chunk<T>::kWords; ++k) cm[k] = max_abs<T>(cm[k], c[u].w[k]);
      if (MODE == Amax::kRowsCols && r + 8 * u < r1) {
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
  if constexpr (MODE == Amax::kRowsCols) {
    if (c < cols && m != 0) atomicMax(col_amax + c, m);
  } else {
    __shared__ uint32_t scratch[32];
    m = block_max(c < cols ? m : 0u, scratch);
    if (threadIdx.x == 0 && m != 0) atomicMax(col_amax, m);
  }
}

// The band of rows per amax_rows_cols block: as tall as keeps >= 8 blocks per multiprocessor, at
// most 256.
template <typename Src, Amax MODE>
void launch_amax(const Src& src, uint32_t* row_amax, uint32_t* col_amax, int64_t rows, int64_t cols,
                 cudaStream_t stream) {
  const int64_t col_tiles = (cols + kColsPerBlock - 1) / kColsPerBlock;
  int64_t band = 256;
  while (band > 8 && col_tiles * ((rows + band - 1) / band) < 8LL * mq2::num_sms()) band /= 2;
  const int64_t blocks = col_tiles * ((rows + band - 1) / band);
  TORCH_CHECK(blocks < (int64_t(1) << 31), "fp8 amax: too many blocks: ", blocks);
  amax_rows_cols_kernel<Src, MODE><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(src, row_amax, col_amax, rows,
                                                                                     cols, band);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- The cast of a 128 x 128 tile, and of its transpose when TRANSPOSE (see fp8_quant.cu's top
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

// ROWS_OUT: write the codes and scales along rows (q, sinv); without it only the transpose's (an op
// that wrote its rows' codes itself while its rows were in registers).
template <typename Src, Scales MODE, bool ROWS_OUT, bool TRANSPOSE>
__global__ void __launch_bounds__(256, Src::kMinBlocks) quantize_tile_kernel(
    Src src, uint8_t* __restrict__ q, uint8_t* __restrict__ qt, float* __restrict__ sinv,
    float* __restrict__ sinv_t, const uint32_t* __restrict__ amax, int64_t rows, int64_t cols) {
  static_assert(ROWS_OUT || TRANSPOSE, "a tile kernel writes something");
  using T = typename Src::Type;
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
    c[i] = row < rows ? src.load(row, col) : zero_chunk<T>();
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
      if constexpr (MODE == Scales::kTile) {
#pragma unroll
        for (int k = 0; k < Chunk<T>::kWords; ++k) cm[k] = max_abs<T>(cm[k], c[i].w[k]);
      }
    }
    if constexpr (ROWS_OUT) {
      float s;
      if constexpr (MODE == Scales::kTile) {
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
  }
  if constexpr (MODE == Scales::kTensor && ROWS_OUT) {
    if (blockIdx.x == 0 && t == 0) *sinv = rcp_rn(tensor_scale);
  }
  if constexpr (TRANSPOSE) {
    transpose_tile<T, MODE>(tile, qt, sinv_t, amax, rows, cols, tr, c0, r0, tensor_scale, cm);
  }
}

// One quantize_tile block per 128 x 128 tile of the [rows, cols] output.
template <typename Src, Scales MODE, bool ROWS_OUT = true, bool TRANSPOSE = true>
void launch_tiles(const Src& src, uint8_t* q, uint8_t* qt, float* sinv, float* sinv_t, const uint32_t* amax,
                  int64_t rows, int64_t cols, cudaStream_t stream) {
  using T = typename Src::Type;
  const int64_t tiles = ((rows + kTile - 1) / kTile) * ((cols + kTile - 1) / kTile);
  TORCH_CHECK(tiles < (int64_t(1) << 31), "fp8 quantisation: too many 128 x 128 tiles: ", tiles);
  constexpr int smem = TRANSPOSE ? tile_smem_bytes(sizeof(T)) : 0;
  auto kernel = quantize_tile_kernel<Src, MODE, ROWS_OUT, TRANSPOSE>;
  if constexpr (smem > 48 * 1024) {  // fp32 tiles: opt in to more than 48 KiB, once per device
    static bool opted_in[64] = {false};
    int dev = 0;
    C10_CUDA_CHECK(cudaGetDevice(&dev));
    if (!opted_in[dev % 64]) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
      opted_in[dev % 64] = true;
    }
  }
  kernel<<<static_cast<unsigned>(tiles), 256, smem, stream>>>(src, q, qt, sinv, sinv_t, amax, rows, cols);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename F>
void launch_vec(bool vec, F&& f) {
  if (vec) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

}  // namespace
