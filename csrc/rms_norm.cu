// RMSNorm, optionally fused with the residual add that precedes it in a pre-norm block.
//
//   forward:  s = x (+ residual, rounded to the storage type), r = rsqrt(mean(s^2) + eps),
//             y = w * round(s * r)            (Qwen2RMSNorm: normalise in fp32, cast, then scale)
//   backward: g = dy * w, xhat = s * r,
//             ds = r * (g - xhat * mean(g * xhat)) (+ dsum, the gradient arriving at s itself),
//             dw = sum over rows of dy * xhat (per-block fp32 partials, then a column reduction:
//             no atomics, so the result is bitwise reproducible).
// Short rows take a warp per row; longer ones a block per row whose register path keeps the row in
// registers (16-byte packs, NP packs per thread, 128 threads, or 256 for the longest rows) so each
// tensor is read and written once. Rows that are too long or not 16-byte aligned take a generic path
// that re-reads the row. Every kernel runs on a persistent grid (Launch::blocks).
//
// Forward with the output quantised to FP8 for the linear layer it feeds (rms_norm_fp8_forward_cuda;
// docs/architecture.md, "FP8"): the codes and scales of y along its rows and of y^T along the tokens,
// bit for bit ops.fp8.quantize_pair(pad_rows(y)), without y ever in memory. The register path's
// forward, with y in registers, writes instead of y (kernel template OUT):
//   "1x128"   the row's codes and 1 x 128 scales (a tile is the 16 lanes of a half-warp);
//   "row"     the row's codes and scale (a block maximum), and per block the column maxima of its
//             rows (16-bit |y| bits, [blocks, h]), reduced over blocks by col_amax_reduce;
//   "tensor"  nothing but the maximum, atomicMax'ed once per block.
// Then fp8_quant.cuh's tile kernel reads the rows again through NormedRows (s, rstd and w give y
// again, with the same arithmetic) and writes y^T's codes (and, "tensor", y's). Bytes per element
// (bf16, without the residual): 2 read + 1 written, then 2 read + 1 written; rms_norm then
// quantize_pair moves 2 + 2, then 2 (the 1 x 128 tiles; "row" and "tensor" read y twice: 4) + 2.
// Rows past `rows` up to rows_pad are zero rows (the tokens padded to the recipe's multiple).

#include "fp8_quant.cuh"

#include <ATen/ops/empty.h>
#include <cuda_pipeline_primitives.h>
#include <cstdlib>

namespace {

using namespace mq2;
constexpr int kBlock = 128;     // generic path
constexpr int kMaxBlock = 256;  // register path for rows that 128 threads cannot hold
// Threads per SM that the register path's registers must leave room for, through
// __launch_bounds__(THREADS, cap / THREADS): 640 forward (at most 102 registers a thread: 5 blocks
// of 128), 384 backward (at most 170: 3 blocks of 128). Without a cap the compiler spends registers
// on early fp32 conversions and shared-memory loads, and fewer rows are in flight per SM.
constexpr int kFwdRegsCap = 640;
constexpr int kBwdRegsCap = 384;

// This thread's packs of a row, as 16-byte words (common.cuh's unpack/repack): pack p covers
// columns (p * THREADS + threadIdx.x) * VEC onwards. All NP loads are issued before any is used
// (columns past h read as zeros), so a thread has its whole row slice in flight at once, and the
// arithmetic on the packs needs no bounds checks.
template <typename T, int VEC, int NP, int THREADS>
__device__ __forceinline__ void load_slice(uint4 (&dst)[NP], const T* __restrict__ src, int h) {
#pragma unroll
  for (int p = 0; p < NP; ++p) {
    const int c = (p * THREADS + threadIdx.x) * VEC;
    dst[p] = c < h ? *reinterpret_cast<const uint4*>(src + c) : make_uint4(0u, 0u, 0u, 0u);
  }
}

template <typename T, int VEC, int NP, int THREADS>
__device__ __forceinline__ void store_slice(T* __restrict__ dst, const uint4 (&src)[NP], int h) {
#pragma unroll
  for (int p = 0; p < NP; ++p) {
    const int c = (p * THREADS + threadIdx.x) * VEC;
    if (c < h) *reinterpret_cast<uint4*>(dst + c) = src[p];
  }
}

// This thread's slice of w, copied once into shared memory laid out [NP][THREADS] packs. Only the
// thread that wrote an entry reads it back (no barrier). Shared memory rather than registers keeps
// the registers for the rows in flight.
template <typename T, int VEC, int NP, int THREADS>
__device__ __forceinline__ void stage_w(uint4* w_slice, const T* __restrict__ w, int h) {
  uint4 wp[NP];
  load_slice<T, VEC, NP, THREADS>(wp, w, h);
#pragma unroll
  for (int p = 0; p < NP; ++p) w_slice[p * THREADS + threadIdx.x] = wp[p];
}

// What a forward writes for y: y itself (kY), or its FP8 quantisation along rows (see the top).
enum class Out { kY, kTensor, kRow, kTile };

// Where a quantising forward writes: codes q [rows_pad, h]; scale_inv ("row" [rows_pad], "1x128"
// [rows_pad, ceil(h / 128)] column-major); the tensor amax ("tensor"); the blocks' column maxima
// ("row", [blocks, h]). Unused by kY.
struct Fp8Rows {
  uint8_t* q;
  float* sinv;
  uint32_t* amax;
  uint16_t* col_partial;
  int64_t rows_pad;
};

// The FP8 epilogue of a row whose y this thread holds as packs yp (zeros past h): see the top.
template <typename T, int NP, int THREADS, Out OUT>
__device__ __forceinline__ void quantize_slice(const uint4 (&yp)[NP], int64_t row, int h, const Fp8Rows& out,
                                               uint4* col_max, uint32_t& tensor_max, uint32_t* scratch) {
  Chunk<T> c[NP];
#pragma unroll
  for (int p = 0; p < NP; ++p) c[p].w[0] = yp[p].x, c[p].w[1] = yp[p].y, c[p].w[2] = yp[p].z, c[p].w[3] = yp[p].w;
  uint8_t* q = out.q + row * h;
  if constexpr (OUT == Out::kTensor) {
    uint32_t m = tensor_max;
#pragma unroll
    for (int p = 0; p < NP; ++p) m = max(m, chunk_amax<T>(c[p]));
    tensor_max = m;
  } else if constexpr (OUT == Out::kTile) {
#pragma unroll
    for (int p = 0; p < NP; ++p) {
      uint32_t m = chunk_amax<T>(c[p]);
#pragma unroll
      for (int o = 8; o > 0; o >>= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, o));  // the tile's 16 lanes
      const float sc = scale_of(m);
      const int col = (p * THREADS + threadIdx.x) * kChunk;
      if (col < h) {
        store_codes(q, col, h, quantize_chunk<T>(c[p], sc), true);
        if ((threadIdx.x & 15) == 0) out.sinv[(col / kTile) * out.rows_pad + row] = rcp_rn(sc);
      }
    }
  } else {  // kRow
    uint32_t m = 0;
#pragma unroll
    for (int p = 0; p < NP; ++p) m = max(m, chunk_amax<T>(c[p]));
    const float sc = scale_of(block_max(m, scratch));
    if (threadIdx.x == 0) out.sinv[row] = rcp_rn(sc);
#pragma unroll
    for (int p = 0; p < NP; ++p) {
      const int col = (p * THREADS + threadIdx.x) * kChunk;
      if (col < h) store_codes(q, col, h, quantize_chunk<T>(c[p], sc), true);
      uint4& cm = col_max[p * THREADS + threadIdx.x];
      cm = make_uint4(max_abs<T>(cm.x, yp[p].x), max_abs<T>(cm.y, yp[p].y), max_abs<T>(cm.z, yp[p].z),
                      max_abs<T>(cm.w, yp[p].w));
    }
  }
}

// The column maxima of y from the blocks' partial rows ([groups, h] 16-bit |y| bits): col_amax[c] as
// fp32 bits. 32 columns per block, 16 row groups.
template <typename T>
__global__ void col_amax_reduce(const uint16_t* __restrict__ partial, uint32_t* __restrict__ col_amax, int groups,
                                int h) {
  __shared__ uint32_t acc[16][33];
  const int c = blockIdx.x * 32 + threadIdx.x;
  uint32_t m = 0;
  if (c < h)
    for (int b = threadIdx.y; b < groups; b += 16) m = max(m, static_cast<uint32_t>(partial[(int64_t)b * h + c]));
  acc[threadIdx.y][threadIdx.x] = m;
  __syncthreads();
  if (threadIdx.y == 0 && c < h) {
#pragma unroll
    for (int i = 1; i < 16; ++i) m = max(m, acc[i][threadIdx.x]);
    col_amax[c] = __float_as_uint(from_bits16<T>(m));
  }
}

// A persistent grid (Launch::blocks) walks the rows, one per block at a time. The loads of a row (x,
// and residual when fused) are all issued before the first use. A quantising forward (OUT != kY)
// also walks the zero rows up to out.rows_pad; it keeps its running column maxima ("row") in shared
// memory after w, [NP][THREADS] packs of 16-bit |y| bits.
template <typename T, int VEC, int NP, int THREADS, bool RES, Out OUT>
__global__ void __launch_bounds__(THREADS, kFwdRegsCap / THREADS)
    rms_fwd_fast(const T* __restrict__ x, const T* __restrict__ res, const T* __restrict__ w, T* __restrict__ y,
                 T* __restrict__ sum_out, float* __restrict__ rstd, Fp8Rows out, int64_t rows, int h, float eps) {
  static_assert(OUT == Out::kY || (sizeof(T) == 2 && VEC == kChunk), "FP8 rows: a pack is a chunk of 16-bit values");
  __shared__ float scratch[32];
  extern __shared__ uint4 w_slice[];  // [NP][THREADS]
  stage_w<T, VEC, NP, THREADS>(w_slice, w, h);
  uint4* col_max = w_slice + NP * THREADS;
  if constexpr (OUT == Out::kRow) {
#pragma unroll
    for (int p = 0; p < NP; ++p) col_max[p * THREADS + threadIdx.x] = make_uint4(0u, 0u, 0u, 0u);
  }
  // "tensor": this thread's running maximum, in shared memory rather than a register (the widest rows
  // have none to spare under the register cap)
  __shared__ uint32_t tensor_max[OUT == Out::kTensor ? THREADS : 1];
  if constexpr (OUT == Out::kTensor) tensor_max[threadIdx.x] = 0;
  const int64_t end = OUT == Out::kY ? rows : out.rows_pad;
  for (int64_t row = blockIdx.x; row < end; row += gridDim.x) {
    const bool real = OUT == Out::kY || row < rows;  // block-uniform
    uint4 s[NP], b[NP];
    if (real) {
      load_slice<T, VEC, NP, THREADS>(s, x + row * h, h);
    } else {
#pragma unroll
      for (int p = 0; p < NP; ++p) s[p] = make_uint4(0u, 0u, 0u, 0u);
    }
    if constexpr (RES) {
      if (real) {
        load_slice<T, VEC, NP, THREADS>(b, res + row * h, h);
#pragma unroll
        for (int p = 0; p < NP; ++p) {
          float v[VEC];
#pragma unroll
          for (int k = 0; k < VEC; ++k) v[k] = unpack<T>(s[p], k) + unpack<T>(b[p], k);
          s[p] = repack<T>(v);
        }
        store_slice<T, VEC, NP, THREADS>(sum_out + row * h, s, h);
      }
    }
    float ss = 0.f;
#pragma unroll
    for (int p = 0; p < NP; ++p)
#pragma unroll
      for (int k = 0; k < VEC; ++k) ss += unpack<T>(s[p], k) * unpack<T>(s[p], k);
    float tot[1] = {ss};
    block_sum<1>(tot, scratch);
    const float r = rsqrtf(tot[0] / h + eps);
    if (real && threadIdx.x == 0) rstd[row] = r;
#pragma unroll
    for (int p = 0; p < NP; ++p) {
      const uint4 wp = w_slice[p * THREADS + threadIdx.x];
      float v[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k)
        v[k] = real ? to_float(from_float<T>(unpack<T>(s[p], k) * r)) * unpack<T>(wp, k) : 0.f;
      s[p] = repack<T>(v);
    }
    if constexpr (OUT == Out::kY) {
      store_slice<T, VEC, NP, THREADS>(y + row * h, s, h);
    } else {
      quantize_slice<T, NP, THREADS, OUT>(s, row, h, out, col_max, tensor_max[OUT == Out::kTensor ? threadIdx.x : 0],
                                          reinterpret_cast<uint32_t*>(scratch));
    }
  }
  if constexpr (OUT == Out::kTensor) {
    const uint32_t m = block_max(tensor_max[threadIdx.x], reinterpret_cast<uint32_t*>(scratch));
    if (threadIdx.x == 0 && m != 0) atomicMax(out.amax, m);
  } else if constexpr (OUT == Out::kRow) {
#pragma unroll
    for (int p = 0; p < NP; ++p) {
      const int c = (p * THREADS + threadIdx.x) * kChunk;
      if (c < h)
        *reinterpret_cast<uint4*>(out.col_partial + (int64_t)blockIdx.x * h + c) = col_max[p * THREADS + threadIdx.x];
    }
  }
}

template <typename T, bool RES>
__global__ void __launch_bounds__(kBlock) rms_fwd_generic(const T* __restrict__ x, const T* __restrict__ res,
                                                          const T* __restrict__ w, T* __restrict__ y,
                                                          T* __restrict__ sum_out, float* __restrict__ rstd, Fp8Rows,
                                                          int64_t rows, int h, float eps) {
  __shared__ float scratch[32];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* src = RES ? sum_out + row * h : x + row * h;
    float ss = 0.f;
    for (int c = threadIdx.x; c < h; c += kBlock) {
      float s = to_float(x[row * h + c]);
      if constexpr (RES) {
        const T rounded = from_float<T>(s + to_float(res[row * h + c]));
        sum_out[row * h + c] = rounded;
        s = to_float(rounded);
      }
      ss += s * s;
    }
    float tot[1] = {ss};
    block_sum<1>(tot, scratch);  // its barriers also order the sum_out writes before the re-reads
    const float r = rsqrtf(tot[0] / h + eps);
    if (threadIdx.x == 0) rstd[row] = r;
    for (int c = threadIdx.x; c < h; c += kBlock)
      y[row * h + c] = from_float<T>(to_float(from_float<T>(to_float(src[c]) * r)) * to_float(w[c]));
  }
}

// Each block walks rows blockIdx.x, blockIdx.x + gridDim.x, ... and leaves its dw partial sums in
// partial[blockIdx.x, :]. A row's x and dy stay in registers as 16-byte words, all loaded before the
// first use; dsum, needed only after the row reduction, is copied asynchronously into shared memory
// (loaded into registers, the compiler would sink its loads past the reduction). w is staged in
// shared memory. The dw sums live in shared memory too (NP * VEC floats per thread, laid out
// [float4 slot][thread] so a warp's 16-byte accesses are conflict-free) rather than in registers:
// registers hold only the rows in flight, so more blocks (and bytes in flight) fit on an SM. Each
// thread touches only its own shared-memory entries: no barrier.
template <typename T, int VEC, int NP, int THREADS, bool DSUM>
__global__ void __launch_bounds__(THREADS, kBwdRegsCap / THREADS)
    rms_bwd_fast(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ w,
                 const float* __restrict__ rstd, const T* __restrict__ dsum, T* __restrict__ dx,
                 float* __restrict__ partial, int64_t rows, int h) {
  static_assert(VEC % 4 == 0, "dw slots are float4");
  constexpr int kSlots = NP * VEC / 4;
  __shared__ float scratch[32];
  // dw slots [kSlots][THREADS] (float4), then w and (DSUM) the row's dsum, each [NP][THREADS] packs
  extern __shared__ uint4 smem[];
  float4* mine = reinterpret_cast<float4*>(smem) + threadIdx.x;
#pragma unroll
  for (int j = 0; j < kSlots; ++j) mine[j * THREADS] = make_float4(0.f, 0.f, 0.f, 0.f);
  uint4* w_slice = smem + kSlots * THREADS;
  uint4* dsum_slice = w_slice + NP * THREADS;
  stage_w<T, VEC, NP, THREADS>(w_slice, w, h);
  const float inv_h = 1.0f / h;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const float r = rstd[row];
    uint4 xp[NP], dp[NP];
    load_slice<T, VEC, NP, THREADS>(xp, x + row * h, h);
    load_slice<T, VEC, NP, THREADS>(dp, dy + row * h, h);
    if constexpr (DSUM) {
#pragma unroll
      for (int p = 0; p < NP; ++p) {
        const int c = (p * THREADS + threadIdx.x) * VEC;
        if (c < h) __pipeline_memcpy_async(dsum_slice + p * THREADS + threadIdx.x, dsum + row * h + c, sizeof(uint4));
      }
      __pipeline_commit();
    }
    float dot = 0.f;
#pragma unroll
    for (int p = 0; p < NP; ++p) {
      const uint4 wp = w_slice[p * THREADS + threadIdx.x];
#pragma unroll
      for (int j = 0; j < VEC / 4; ++j) {
        float4 a = mine[(p * VEC / 4 + j) * THREADS];
        float* acc = reinterpret_cast<float*>(&a);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int k = 4 * j + i;
          const float d = unpack<T>(dp[p], k), xh = unpack<T>(xp[p], k) * r;
          dot += d * unpack<T>(wp, k) * xh;
          acc[i] += d * xh;
        }
        mine[(p * VEC / 4 + j) * THREADS] = a;
      }
    }
    float tot[1] = {dot};
    block_sum<1>(tot, scratch);
    const float m = tot[0] * inv_h;
    if constexpr (DSUM) __pipeline_wait_prior(0);
#pragma unroll
    for (int p = 0; p < NP; ++p) {
      const uint4 wp = w_slice[p * THREADS + threadIdx.x];
      uint4 extra;
      if constexpr (DSUM) extra = dsum_slice[p * THREADS + threadIdx.x];  // columns past h: never stored
      float v[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float xh = unpack<T>(xp[p], k) * r;
        v[k] = r * (unpack<T>(dp[p], k) * unpack<T>(wp, k) - xh * m);
        if constexpr (DSUM) v[k] += unpack<T>(extra, k);
      }
      xp[p] = repack<T>(v);
    }
    store_slice<T, VEC, NP, THREADS>(dx + row * h, xp, h);
  }
#pragma unroll
  for (int p = 0; p < NP; ++p) {
    const int c = (p * THREADS + threadIdx.x) * VEC;
    if (c < h) {
#pragma unroll
      for (int j = 0; j < VEC / 4; ++j)
        *reinterpret_cast<float4*>(partial + (int64_t)blockIdx.x * h + c + 4 * j) = mine[(p * VEC / 4 + j) * THREADS];
    }
  }
}

template <typename T, bool DSUM>
__global__ void __launch_bounds__(kBlock) rms_bwd_generic(const T* __restrict__ dy, const T* __restrict__ x,
                                                          const T* __restrict__ w, const float* __restrict__ rstd,
                                                          const T* __restrict__ dsum, T* __restrict__ dx,
                                                          float* __restrict__ partial, int64_t rows, int h) {
  __shared__ float scratch[32];
  float* mine = partial + (int64_t)blockIdx.x * h;  // only this block touches its row
  for (int c = threadIdx.x; c < h; c += kBlock) mine[c] = 0.f;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const float r = rstd[row];
    float dot = 0.f;
    for (int c = threadIdx.x; c < h; c += kBlock) {
      const float d = to_float(dy[row * h + c]), xh = to_float(x[row * h + c]) * r;
      dot += d * to_float(w[c]) * xh;
      mine[c] += d * xh;
    }
    float tot[1] = {dot};
    block_sum<1>(tot, scratch);
    const float m = tot[0] / h;
    for (int c = threadIdx.x; c < h; c += kBlock) {
      const float xh = to_float(x[row * h + c]) * r;
      float v = r * (to_float(dy[row * h + c]) * to_float(w[c]) - xh * m);
      if constexpr (DSUM) v += to_float(dsum[row * h + c]);
      dx[row * h + c] = from_float<T>(v);
    }
  }
}

// Short rows (at most 8 packs per lane, e.g. hidden 896 and 1536 in bf16): one warp per row, 8 rows
// per block. The row statistic is a shuffle reduction (no block barrier between a row's loads and
// its stores), and 8 independent rows per block keep more loads in flight than one row per block.
constexpr int kWarpBlock = 256;
constexpr int kRowsPerWarpBlock = kWarpBlock / 32;

template <typename T, int VEC, int NP, bool RES>
__global__ void __launch_bounds__(kWarpBlock) rms_fwd_warp(const T* __restrict__ x, const T* __restrict__ res,
                                                         const T* __restrict__ w, T* __restrict__ y,
                                                         T* __restrict__ sum_out, float* __restrict__ rstd, Fp8Rows,
                                                         int64_t rows, int h, float eps) {
  const int lane = threadIdx.x & 31;
  const int64_t stride = (int64_t)gridDim.x * kRowsPerWarpBlock;
  for (int64_t row = (int64_t)blockIdx.x * kRowsPerWarpBlock + (threadIdx.x >> 5); row < rows; row += stride) {
    float v[NP][VEC];
    float ss = 0.f;
#pragma unroll
    for (int p = 0; p < NP; ++p) {
      const int c = (p * 32 + lane) * VEC;
      if (c < h) {
        Pack<T, VEC> a = load_pack<T, VEC>(x + row * h + c);
        if constexpr (RES) {
          Pack<T, VEC> b = load_pack<T, VEC>(res + row * h + c);
#pragma unroll
          for (int k = 0; k < VEC; ++k) a.v[k] = from_float<T>(to_float(a.v[k]) + to_float(b.v[k]));
          store_pack<T, VEC>(sum_out + row * h + c, a);
        }
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          v[p][k] = to_float(a.v[k]);
          ss += v[p][k] * v[p][k];
        }
      }
    }
    const float r = rsqrtf(warp_sum(ss) / h + eps);
    if (lane == 0) rstd[row] = r;
#pragma unroll
    for (int p = 0; p < NP; ++p) {
      const int c = (p * 32 + lane) * VEC;
      if (c < h) {
        const Pack<T, VEC> wp = load_pack<T, VEC>(w + c);
        Pack<T, VEC> o;
#pragma unroll
        for (int k = 0; k < VEC; ++k) o.v[k] = from_float<T>(to_float(from_float<T>(v[p][k] * r)) * to_float(wp.v[k]));
        store_pack<T, VEC>(y + row * h + c, o);
      }
    }
  }
}

// Each warp keeps the dw sums of its lanes' columns in registers over its rows; at the end the 8
// warps of a block add theirs into shared memory in warp order (fixed order: deterministic) and the
// block writes its partial row.
template <typename T, int VEC, int NP, bool DSUM>
__global__ void __launch_bounds__(kWarpBlock) rms_bwd_warp(const T* __restrict__ dy, const T* __restrict__ x,
                                                         const T* __restrict__ w, const float* __restrict__ rstd,
                                                         const T* __restrict__ dsum, T* __restrict__ dx,
                                                         float* __restrict__ partial, int64_t rows, int h) {
  extern __shared__ float block_dw[];  // [h]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float dw[NP][VEC];
#pragma unroll
  for (int p = 0; p < NP; ++p)
#pragma unroll
    for (int k = 0; k < VEC; ++k) dw[p][k] = 0.f;
  const float inv_h = 1.0f / h;
  const int64_t stride = (int64_t)gridDim.x * kRowsPerWarpBlock;
  for (int64_t row = (int64_t)blockIdx.x * kRowsPerWarpBlock + warp; row < rows; row += stride) {
    const float r = rstd[row];
    Pack<T, VEC> xp[NP], dp[NP];
#pragma unroll
    for (int p = 0; p < NP; ++p) {
      const int c = (p * 32 + lane) * VEC;
      if (c < h) {
        xp[p] = load_pack<T, VEC>(x + row * h + c);
        dp[p] = load_pack<T, VEC>(dy + row * h + c);
      }
    }
    float dot = 0.f;
#pragma unroll
    for (int p = 0; p < NP; ++p) {
      const int c = (p * 32 + lane) * VEC;
      if (c < h) {
        const Pack<T, VEC> wp = load_pack<T, VEC>(w + c);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const float d = to_float(dp[p].v[k]), xh = to_float(xp[p].v[k]) * r;
          dot += d * to_float(wp.v[k]) * xh;
          dw[p][k] += d * xh;
        }
      }
    }
    const float m = warp_sum(dot) * inv_h;
#pragma unroll
    for (int p = 0; p < NP; ++p) {
      const int c = (p * 32 + lane) * VEC;
      if (c < h) {
        const Pack<T, VEC> wp = load_pack<T, VEC>(w + c);
        Pack<T, VEC> o;
        Pack<T, VEC> extra;
        if constexpr (DSUM) extra = load_pack<T, VEC>(dsum + row * h + c);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const float xh = to_float(xp[p].v[k]) * r;
          float v = r * (to_float(dp[p].v[k]) * to_float(wp.v[k]) - xh * m);
          if constexpr (DSUM) v += to_float(extra.v[k]);
          o.v[k] = from_float<T>(v);
        }
        store_pack<T, VEC>(dx + row * h + c, o);
      }
    }
  }
  for (int turn = 0; turn < kRowsPerWarpBlock; ++turn) {
    if (warp == turn) {
#pragma unroll
      for (int p = 0; p < NP; ++p) {
        const int c = (p * 32 + lane) * VEC;
        if (c < h) {
#pragma unroll
          for (int k = 0; k < VEC; ++k) block_dw[c + k] = turn == 0 ? dw[p][k] : block_dw[c + k] + dw[p][k];
        }
      }
    }
    __syncthreads();
  }
  for (int c = threadIdx.x; c < h; c += kWarpBlock) partial[(int64_t)blockIdx.x * h + c] = block_dw[c];
}

// dw[c] = sum over b of partial[b, c]: 32 columns per block, 16 row groups, fixed order.
template <typename T>
__global__ void dw_reduce(const float* __restrict__ partial, T* __restrict__ dw, int groups, int h) {
  __shared__ float acc[16][33];
  const int c = blockIdx.x * 32 + threadIdx.x;
  float s = 0.f;
  if (c < h)
    for (int b = threadIdx.y; b < groups; b += 16) s += partial[(int64_t)b * h + c];
  acc[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < h) {
    float t = 0.f;
#pragma unroll
    for (int i = 0; i < 16; ++i) t += acc[i][threadIdx.x];
    dw[c] = from_float<T>(t);
  }
}

// At most 8 packs (128 bytes, 32 registers) of a row per thread and tensor: the backward holds its
// x and dy slices within its register cap.
constexpr int kMaxPacks = 8;

// Packs per thread for the register path, or 0 when the row needs the generic path.
template <typename T>
int packs_per_thread(int h, std::initializer_list<const void*> ptrs) {
  constexpr int kVec = 16 / sizeof(T);
  if (h % kVec != 0) return 0;
  for (const void* p : ptrs)
    if (p != nullptr && !aligned16(p)) return 0;
  const int packs = h / kVec;
  for (int block : {kBlock, kMaxBlock})
    for (int np = 1; np <= kMaxPacks; np *= 2)
      if (packs <= np * block) return np;
  return 0;
}

// Packs per lane for the warp-per-row path (rows of at most 8 packs per lane), or 0. Off with
// MEGATRON_QWEN2_RMS_WARP_ROWS=0 (read per call, so a benchmark can time both paths).
template <typename T>
int warp_packs_per_lane(int h, int np_block) {
  const char* e = std::getenv("MEGATRON_QWEN2_RMS_WARP_ROWS");
  if (np_block == 0 || (e != nullptr && e[0] == '0')) return 0;
  const int packs = h / (16 / static_cast<int>(sizeof(T)));
  for (int np : {1, 2, 4, 8})
    if (packs <= np * 32) return np;
  return 0;
}

// Threads of a register-path block: 128 while NP packs per thread cover the row (more packs per
// thread, i.e. more loads in flight per thread, rather than wider blocks), 256 for rows longer than that.
template <typename T>
int fast_threads(int h, int np) {
  const int packs = h / (16 / static_cast<int>(sizeof(T)));
  return packs <= np * kBlock ? kBlock : kMaxBlock;
}

template <typename F>
void with_np(int np, F f) {
  switch (np) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}

// The register path's shapes: NP packs per thread, 128 threads, or 256 with 8 packs.
template <typename F>
void with_shape(int np, int threads, F f) {
  if (threads == kMaxBlock) return f(std::integral_constant<int, 8>{}, std::integral_constant<int, kMaxBlock>{});
  with_np(np, [&](auto npc) { f(npc, std::integral_constant<int, kBlock>{}); });
}

template <typename T>
using FwdKernel = void (*)(const T*, const T*, const T*, T*, T*, float*, Fp8Rows, int64_t, int, float);
template <typename T>
using BwdKernel = void (*)(const T*, const T*, const T*, const float*, const T*, T*, float*, int64_t, int);

// A kernel with its launch shape. Every RMSNorm kernel runs on a persistent grid: as many blocks as
// are resident on the device at once (the kernel's registers and shared memory decide how many fit
// on an SM), so there is no partial last wave, and no more than one block per `rows_per_block`
// rows: a forward block needs one row (8 for the 8-warp blocks); a backward block writes and
// re-reads a row of dw partials, worth it for 8 rows or more (32 for the 8-warp blocks).
template <typename K>
struct Launch {
  K kernel;
  int threads;
  size_t smem;
  int rows_per_block;

  int blocks(int64_t rows) const {
    // The default dynamic allowance is 48 KiB less the kernel's static shared memory: always state it.
    if (smem > 0)
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem));
    const int64_t resident = static_cast<int64_t>(std::max(per_sm, 1)) * num_sms();
    return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((rows + rows_per_block - 1) / rows_per_block, resident)));
  }
};

template <typename T>
Launch<FwdKernel<T>> forward_launch(int h, bool res, int np, int wnp) {
  constexpr int kVec = 16 / sizeof(T);
  Launch<FwdKernel<T>> l{nullptr, kBlock, 0, 1};
  if (wnp > 0) {
    with_np(wnp, [&](auto npc) {
      constexpr int NP = decltype(npc)::value;
      l = {res ? rms_fwd_warp<T, kVec, NP, true> : rms_fwd_warp<T, kVec, NP, false>, kWarpBlock, 0, kRowsPerWarpBlock};
    });
  } else if (np == 0) {
    l.kernel = res ? rms_fwd_generic<T, true> : rms_fwd_generic<T, false>;
  } else {
    with_shape(np, fast_threads<T>(h, np), [&](auto npc, auto threadsc) {
      constexpr int NP = decltype(npc)::value, THREADS = decltype(threadsc)::value;
      l = {res ? rms_fwd_fast<T, kVec, NP, THREADS, true, Out::kY> : rms_fwd_fast<T, kVec, NP, THREADS, false, Out::kY>,
           THREADS, static_cast<size_t>(THREADS) * NP * sizeof(uint4), 1};  // w
    });
  }
  return l;
}

template <typename T>
Launch<BwdKernel<T>> backward_launch(int h, bool dsum, int np, int wnp) {
  constexpr int kVec = 16 / sizeof(T);
  Launch<BwdKernel<T>> l{nullptr, kBlock, 0, 8};
  if (wnp > 0) {
    with_np(wnp, [&](auto npc) {
      constexpr int NP = decltype(npc)::value;
      l = {dsum ? rms_bwd_warp<T, kVec, NP, true> : rms_bwd_warp<T, kVec, NP, false>, kWarpBlock,
           static_cast<size_t>(h) * sizeof(float), 4 * kRowsPerWarpBlock};
    });
  } else if (np == 0) {
    l.kernel = dsum ? rms_bwd_generic<T, true> : rms_bwd_generic<T, false>;
  } else {
    with_shape(np, fast_threads<T>(h, np), [&](auto npc, auto threadsc) {
      constexpr int NP = decltype(npc)::value, THREADS = decltype(threadsc)::value;
      l = {dsum ? rms_bwd_fast<T, kVec, NP, THREADS, true> : rms_bwd_fast<T, kVec, NP, THREADS, false>, THREADS,
           static_cast<size_t>(THREADS) * NP * (kVec * sizeof(float) + (dsum ? 2 : 1) * sizeof(uint4)), 8};  // dw sums, w, dsum
    });
  }
  return l;
}

// y = w * round(s * rstd) of rows [rows, h] (s: x, or x + residual), with the forward's arithmetic:
// the source through which fp8_quant.cuh's tile kernel reads the normalised rows again. Needs h % 8
// == 0 and s, w 16-byte aligned (the register path's conditions).
template <typename T>
struct NormedRows {
  static_assert(sizeof(T) == 2, "a 16-byte pack is a chunk");
  using Type = T;
  static constexpr int kMinBlocks = 0;
  const T* s;
  const float* rstd;
  const T* w;
  int64_t rows, h;

  __device__ __forceinline__ Chunk<T> load(int64_t r, int64_t col) const {
    if (r >= rows || col >= h) return zero_chunk<T>();
    const uint4 sp = *reinterpret_cast<const uint4*>(s + r * h + col);
    const uint4 wp = *reinterpret_cast<const uint4*>(w + col);
    const float rr = rstd[r];
    float v[kChunk];
#pragma unroll
    for (int k = 0; k < kChunk; ++k) v[k] = to_float(from_float<T>(unpack<T>(sp, k) * rr)) * unpack<T>(wp, k);
    return chunk_of<T>(v);
  }
};

// The fused forward on the register path (np packs per thread): see the top.
template <typename T>
void fp8_forward(const T* xp, const T* rp, const T* wp, T* sp, float* rstd, int tiling, uint8_t* q, float* sinv,
                 uint8_t* qt, float* sinv_t, uint32_t* amax, int64_t rows, int64_t rows_pad, int h, float eps, int np,
                 const at::TensorOptions& opts) {
  constexpr int kVec = 16 / sizeof(T);
  auto stream = current_stream();
  with_shape(np, fast_threads<T>(h, np), [&](auto npc, auto threadsc) {
    constexpr int NP = decltype(npc)::value, THREADS = decltype(threadsc)::value;
    const size_t w_bytes = static_cast<size_t>(THREADS) * NP * sizeof(uint4);
    const NormedRows<T> src{rp != nullptr ? sp : xp, rstd, wp, rows, h};
    auto kernel_for = [&](auto outc) -> FwdKernel<T> {
      constexpr Out OUT = decltype(outc)::value;
      if (rp != nullptr) return rms_fwd_fast<T, kVec, NP, THREADS, true, OUT>;
      return rms_fwd_fast<T, kVec, NP, THREADS, false, OUT>;
    };
    if (tiling == 0) {  // tensor: the amax, then both casts
      const Launch<FwdKernel<T>> l{kernel_for(std::integral_constant<Out, Out::kTensor>{}), THREADS, w_bytes, 1};
      l.kernel<<<l.blocks(rows_pad), THREADS, l.smem, stream>>>(xp, rp, wp, nullptr, sp, rstd,
                                                               Fp8Rows{q, sinv, amax, nullptr, rows_pad}, rows, h, eps);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      launch_tiles<NormedRows<T>, Scales::kTensor, true, true>(src, q, qt, sinv, nullptr, amax, rows_pad, h, stream);
    } else if (tiling == 1) {  // row: the rows' codes and the column maxima, then the transpose's codes
      const Launch<FwdKernel<T>> l{kernel_for(std::integral_constant<Out, Out::kRow>{}), THREADS, 2 * w_bytes, 1};
      const int groups = l.blocks(rows_pad);
      auto partial = at::empty({groups, h}, opts.dtype(at::kShort));
      uint16_t* pp = reinterpret_cast<uint16_t*>(partial.data_ptr<int16_t>());
      l.kernel<<<groups, THREADS, l.smem, stream>>>(xp, rp, wp, nullptr, sp, rstd,
                                                    Fp8Rows{q, sinv, nullptr, pp, rows_pad}, rows, h, eps);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      col_amax_reduce<T><<<(h + 31) / 32, dim3(32, 16), 0, stream>>>(pp, amax + rows_pad, groups, h);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      launch_tiles<NormedRows<T>, Scales::kRowCol, false, true>(src, nullptr, qt, nullptr, sinv_t, amax, rows_pad, h,
                                                               stream);
    } else {  // 1x128: the rows' codes, then the transpose's
      const Launch<FwdKernel<T>> l{kernel_for(std::integral_constant<Out, Out::kTile>{}), THREADS, w_bytes, 1};
      const Fp8Rows out{q, sinv, nullptr, nullptr, rows_pad};
      l.kernel<<<l.blocks(rows_pad), THREADS, l.smem, stream>>>(xp, rp, wp, nullptr, sp, rstd, out, rows, h, eps);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      launch_tiles<NormedRows<T>, Scales::kTile, false, true>(src, nullptr, qt, nullptr, sinv_t, nullptr, rows_pad, h,
                                                             stream);
    }
  });
}

}  // namespace

// Validated and allocated by bindings.cpp (rms_norm_fp8_forward): x, residual and sum_out [rows, h]
// of one 16-bit or fp32 dtype, w [h], rstd fp32 [rows], rows >= 1; data e4m3 [rows_pad, h], data_t
// e4m3 [h, rows_pad], scale_inv and scale_inv_t as fp8_quantize's for `tiling` (none for "tensor");
// amax int32 zeros, [1] ("tensor") or [rows_pad + h] ("row"). Returns false, having written nothing,
// where the fused kernels do not serve x (fp32, or rows that the forward takes off the register path):
// the caller then composes rms_norm_forward_cuda and fp8_quantize_cuda, the same values.
bool rms_norm_fp8_forward_cuda(const at::Tensor& x, const c10::optional<at::Tensor>& residual, const at::Tensor& w,
                               c10::optional<at::Tensor>& sum_out, at::Tensor& rstd, const std::string& tiling,
                               at::Tensor& data, at::Tensor& scale_inv, at::Tensor& data_t,
                               const c10::optional<at::Tensor>& scale_inv_t, at::Tensor& amax, int64_t rows,
                               int64_t rows_pad, int64_t h, double eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int code = tiling == "tensor" ? 0 : tiling == "row" ? 1 : 2;
  auto run = [&](auto type) {
    using T = decltype(type);
    const T* xp = static_cast<const T*>(x.data_ptr());
    const T* rp = residual ? static_cast<const T*>(residual->data_ptr()) : nullptr;
    const T* wp = static_cast<const T*>(w.data_ptr());
    T* sp = sum_out ? static_cast<T*>(sum_out->data_ptr()) : nullptr;
    const int np = packs_per_thread<T>(static_cast<int>(h), {xp, rp, wp, sp});
    if (np == 0 || warp_packs_per_lane<T>(static_cast<int>(h), np) > 0) return false;
    fp8_forward<T>(xp, rp, wp, sp, rstd.data_ptr<float>(), code, static_cast<uint8_t*>(data.data_ptr()),
                   scale_inv.data_ptr<float>(), static_cast<uint8_t*>(data_t.data_ptr()),
                   scale_inv_t ? scale_inv_t->data_ptr<float>() : nullptr,
                   reinterpret_cast<uint32_t*>(amax.data_ptr<int32_t>()), rows, rows_pad, static_cast<int>(h),
                   static_cast<float>(eps), np, x.options());
    return true;
  };
  if (x.scalar_type() == at::kBFloat16) return run(__nv_bfloat16{});
  if (x.scalar_type() == at::kHalf) return run(__half{});
  return false;
}

// Validated by bindings.cpp: contiguous CUDA tensors of one dtype, x/residual/y/sum_out [rows, h],
// w [h], rstd fp32 [rows], rows > 0, h > 0. residual and sum_out are both defined or both not.
void rms_norm_forward_cuda(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                           const at::Tensor& w, at::Tensor& y, c10::optional<at::Tensor>& sum_out,
                           at::Tensor& rstd, int64_t rows, int64_t h, double eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  const bool res = residual.has_value();
  MQ2_DISPATCH(x.scalar_type(), T, {
    const T* xp = static_cast<const T*>(x.data_ptr());
    const T* rp = res ? static_cast<const T*>(residual->data_ptr()) : nullptr;
    const T* wp = static_cast<const T*>(w.data_ptr());
    T* yp = static_cast<T*>(y.data_ptr());
    T* sp = res ? static_cast<T*>(sum_out->data_ptr()) : nullptr;
    const int np = packs_per_thread<T>(static_cast<int>(h), {xp, rp, wp, yp, sp});
    const auto l = forward_launch<T>(static_cast<int>(h), res, np, warp_packs_per_lane<T>(static_cast<int>(h), np));
    l.kernel<<<l.blocks(rows), l.threads, l.smem, current_stream()>>>(
        xp, rp, wp, yp, sp, rstd.data_ptr<float>(), Fp8Rows{}, rows, static_cast<int>(h), static_cast<float>(eps));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// dy, x (the normalised input: x + residual when fused), dsum (optional) and dx [rows, h]; w, dw [h];
// rstd fp32 [rows].
void rms_norm_backward_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w,
                            const at::Tensor& rstd, const c10::optional<at::Tensor>& dsum, at::Tensor& dx,
                            at::Tensor& dw, int64_t rows, int64_t h) {
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = current_stream();
  const bool has_dsum = dsum.has_value();
  MQ2_DISPATCH(x.scalar_type(), T, {
    const T* dyp = static_cast<const T*>(dy.data_ptr());
    const T* xp = static_cast<const T*>(x.data_ptr());
    const T* wp = static_cast<const T*>(w.data_ptr());
    const T* dsp = has_dsum ? static_cast<const T*>(dsum->data_ptr()) : nullptr;
    T* dxp = static_cast<T*>(dx.data_ptr());
    const int np = packs_per_thread<T>(static_cast<int>(h), {dyp, xp, wp, dsp, dxp});
    const auto l = backward_launch<T>(static_cast<int>(h), has_dsum, np, warp_packs_per_lane<T>(static_cast<int>(h), np));
    const int groups = l.blocks(rows);
    auto partial = at::empty({groups, h}, x.options().dtype(at::kFloat));
    float* pp = partial.data_ptr<float>();
    l.kernel<<<groups, l.threads, l.smem, stream>>>(dyp, xp, wp, rstd.data_ptr<float>(), dsp, dxp, pp, rows,
                                                    static_cast<int>(h));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    dw_reduce<T><<<static_cast<int>((h + 31) / 32), dim3(32, 16), 0, stream>>>(pp, static_cast<T*>(dw.data_ptr()),
                                                                              groups, static_cast<int>(h));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
