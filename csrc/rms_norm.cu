// RMSNorm, optionally fused with the residual add that precedes it in a pre-norm block.
//
//   forward:  s = x (+ residual, rounded to the storage type), r = rsqrt(mean(s^2) + eps),
//             y = w * round(s * r)            (Qwen2RMSNorm: normalise in fp32, cast, then scale)
//   backward: g = dy * w, xhat = s * r,
//             ds = r * (g - xhat * mean(g * xhat)) (+ dsum, the gradient arriving at s itself),
//             dw = sum over rows of dy * xhat (per-block fp32 partials, then a column reduction:
//             no atomics, so the result is bitwise reproducible).
// One block per row; the fast path keeps the row in registers (16-byte packs, NP packs per
// thread, 128 threads, or 256 for the longest rows) so each tensor is read and written once. Rows that are too long or not
// 16-byte aligned take a generic path that re-reads the row.

#include "common.cuh"

#include <ATen/ops/empty.h>
#include <cstdlib>

namespace {

using namespace mq2;
constexpr int kBlock = 128;     // generic path
constexpr int kMaxBlock = 256;  // register path for rows that 128 threads cannot hold

template <typename T, int VEC, int NP, bool RES>
__global__ void __launch_bounds__(kMaxBlock) rms_fwd_fast(const T* __restrict__ x, const T* __restrict__ res,
                                                       const T* __restrict__ w, T* __restrict__ y,
                                                       T* __restrict__ sum_out, float* __restrict__ rstd,
                                                       int64_t rows, int h, float eps) {
  __shared__ float scratch[32];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * h;
    float v[NP][VEC];
    float ss = 0.f;
#pragma unroll
    for (int p = 0; p < NP; ++p) {
      const int c = (p * blockDim.x + threadIdx.x) * VEC;
      if (c < h) {
        Pack<T, VEC> a = load_pack<T, VEC>(xr + c);
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
    float tot[1] = {ss};
    block_sum<1>(tot, scratch);
    const float r = rsqrtf(tot[0] / h + eps);
    if (threadIdx.x == 0) rstd[row] = r;
#pragma unroll
    for (int p = 0; p < NP; ++p) {
      const int c = (p * blockDim.x + threadIdx.x) * VEC;
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

template <typename T, bool RES>
__global__ void __launch_bounds__(kBlock) rms_fwd_generic(const T* __restrict__ x, const T* __restrict__ res,
                                                          const T* __restrict__ w, T* __restrict__ y,
                                                          T* __restrict__ sum_out, float* __restrict__ rstd,
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
// partial[blockIdx.x, :]. The row's x and dy stay in registers as raw packs between the two
// passes (half the registers of fp32 copies); w is re-read per row from L1.
template <typename T, int VEC, int NP, bool DSUM>
__global__ void __launch_bounds__(kMaxBlock) rms_bwd_fast(const T* __restrict__ dy, const T* __restrict__ x,
                                                       const T* __restrict__ w, const float* __restrict__ rstd,
                                                       const T* __restrict__ dsum, T* __restrict__ dx,
                                                       float* __restrict__ partial, int64_t rows, int h) {
  __shared__ float scratch[32];
  float dw[NP][VEC];
#pragma unroll
  for (int p = 0; p < NP; ++p)
#pragma unroll
    for (int k = 0; k < VEC; ++k) dw[p][k] = 0.f;
  const float inv_h = 1.0f / h;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const float r = rstd[row];
    Pack<T, VEC> xp[NP], dp[NP];
    float dot = 0.f;
#pragma unroll
    for (int p = 0; p < NP; ++p) {
      const int c = (p * blockDim.x + threadIdx.x) * VEC;
      if (c < h) {
        xp[p] = load_pack<T, VEC>(x + row * h + c);
        dp[p] = load_pack<T, VEC>(dy + row * h + c);
      }
    }
#pragma unroll
    for (int p = 0; p < NP; ++p) {
      const int c = (p * blockDim.x + threadIdx.x) * VEC;
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
    float tot[1] = {dot};
    block_sum<1>(tot, scratch);
    const float m = tot[0] * inv_h;
#pragma unroll
    for (int p = 0; p < NP; ++p) {
      const int c = (p * blockDim.x + threadIdx.x) * VEC;
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
#pragma unroll
  for (int p = 0; p < NP; ++p) {
    const int c = (p * blockDim.x + threadIdx.x) * VEC;
    if (c < h) {
      Pack<float, VEC> o;
#pragma unroll
      for (int k = 0; k < VEC; ++k) o.v[k] = dw[p][k];
      store_pack<float, VEC>(partial + (int64_t)blockIdx.x * h + c, o);
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
                                                         T* __restrict__ sum_out, float* __restrict__ rstd,
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

// Packs per thread for the register path, or 0 when the row needs the generic path.
template <typename T>
int packs_per_thread(int h, std::initializer_list<const void*> ptrs) {
  constexpr int kVec = 16 / sizeof(T);
  if (h % kVec != 0) return 0;
  for (const void* p : ptrs)
    if (p != nullptr && !aligned16(p)) return 0;
  const int packs = h / kVec;
  for (int block : {kBlock, kMaxBlock})
    for (int np : {1, 2, 4, 8, 16})
      if (packs <= np * block && np * kVec <= 64) return np;  // at most 64 values of a row per thread
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
// thread, i.e. more loads in flight, measured faster on H100 than wider blocks: hidden 8192 ran at
// 88% of copy bandwidth with 128 x 8 packs, 82% with 256 x 4), 256 for rows longer than that.
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
    case 8: f(std::integral_constant<int, 8>{}); break;
    default: f(std::integral_constant<int, 16>{}); break;
  }
}

// Blocks of the backward, each leaving one fp32 row of dw partials: more blocks hide latency on
// short rows, fewer keep the partials (written and re-read) small on long ones. Measured on H100:
// 8 per SM best at hidden 896, 4 at 3584 and 8192. MEGATRON_QWEN2_RMS_BWD_BLOCKS_PER_SM overrides.
int bwd_groups(int64_t rows, int64_t h) {
  static const int forced = [] {
    const char* e = std::getenv("MEGATRON_QWEN2_RMS_BWD_BLOCKS_PER_SM");
    return e ? std::max(1, std::atoi(e)) : 0;
  }();
  const int per_sm = forced > 0 ? forced : (h <= 1024 ? 8 : 4);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((rows + 7) / 8, (int64_t)num_sms() * per_sm)));
}

}  // namespace

// Validated by bindings.cpp: contiguous CUDA tensors of one dtype, x/residual/y/sum_out [rows, h],
// w [h], rstd fp32 [rows], rows > 0, h > 0. residual and sum_out are both defined or both not.
void rms_norm_forward_cuda(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                           const at::Tensor& w, at::Tensor& y, c10::optional<at::Tensor>& sum_out,
                           at::Tensor& rstd, int64_t rows, int64_t h, double eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = current_stream();
  const bool res = residual.has_value();
  const int grid = static_cast<int>(std::min<int64_t>(rows, (int64_t)num_sms() * 16));
  MQ2_DISPATCH(x.scalar_type(), T, {
    const T* xp = static_cast<const T*>(x.data_ptr());
    const T* rp = res ? static_cast<const T*>(residual->data_ptr()) : nullptr;
    const T* wp = static_cast<const T*>(w.data_ptr());
    T* yp = static_cast<T*>(y.data_ptr());
    T* sp = res ? static_cast<T*>(sum_out->data_ptr()) : nullptr;
    float* rs = rstd.data_ptr<float>();
    constexpr int kVec = 16 / sizeof(T);
    const int np = packs_per_thread<T>(static_cast<int>(h), {xp, rp, wp, yp, sp});
    const int wnp = warp_packs_per_lane<T>(static_cast<int>(h), np);
    if (wnp > 0) {
      const int wgrid = static_cast<int>(std::min<int64_t>((rows + kRowsPerWarpBlock - 1) / kRowsPerWarpBlock,
                                                           (int64_t)num_sms() * 8));
      with_np(wnp, [&](auto npc) {
        constexpr int NP = decltype(npc)::value;
        if constexpr (NP <= 8) {
          if (res) rms_fwd_warp<T, kVec, NP, true><<<wgrid, kWarpBlock, 0, stream>>>(xp, rp, wp, yp, sp, rs, rows, h, eps);
          else rms_fwd_warp<T, kVec, NP, false><<<wgrid, kWarpBlock, 0, stream>>>(xp, rp, wp, yp, sp, rs, rows, h, eps);
        }
      });
    } else if (np == 0) {
      if (res) rms_fwd_generic<T, true><<<grid, kBlock, 0, stream>>>(xp, rp, wp, yp, sp, rs, rows, h, eps);
      else rms_fwd_generic<T, false><<<grid, kBlock, 0, stream>>>(xp, rp, wp, yp, sp, rs, rows, h, eps);
    } else {
      with_np(np, [&](auto npc) {
        constexpr int NP = decltype(npc)::value;
        if constexpr (NP * kVec <= 64) {
          const int threads = fast_threads<T>(static_cast<int>(h), NP);
          if (res) rms_fwd_fast<T, kVec, NP, true><<<grid, threads, 0, stream>>>(xp, rp, wp, yp, sp, rs, rows, h, eps);
          else rms_fwd_fast<T, kVec, NP, false><<<grid, threads, 0, stream>>>(xp, rp, wp, yp, sp, rs, rows, h, eps);
        }
      });
    }
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
  int groups = bwd_groups(rows, h);
  // The warp-per-row path: one partial row per resident block (8 packs per lane take ~240
  // registers: one 256-thread block per SM; fewer packs leave room for two).
  int wnp = 0;
  MQ2_DISPATCH(x.scalar_type(), T, {
    wnp = warp_packs_per_lane<T>(static_cast<int>(h), packs_per_thread<T>(static_cast<int>(h),
        {dy.data_ptr(), x.data_ptr(), w.data_ptr(), has_dsum ? dsum->data_ptr() : nullptr, dx.data_ptr()}));
  });
  if (wnp > 0)
    groups = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((rows + 4 * kRowsPerWarpBlock - 1) /
                                                                         (4 * kRowsPerWarpBlock),
                                                                     (int64_t)num_sms() * (wnp >= 8 ? 1 : 2))));
  auto partial = at::empty({groups, h}, x.options().dtype(at::kFloat));
  MQ2_DISPATCH(x.scalar_type(), T, {
    const T* dyp = static_cast<const T*>(dy.data_ptr());
    const T* xp = static_cast<const T*>(x.data_ptr());
    const T* wp = static_cast<const T*>(w.data_ptr());
    const T* dsp = has_dsum ? static_cast<const T*>(dsum->data_ptr()) : nullptr;
    T* dxp = static_cast<T*>(dx.data_ptr());
    float* pp = partial.data_ptr<float>();
    const float* rs = rstd.data_ptr<float>();
    constexpr int kVec = 16 / sizeof(T);
    const int np = packs_per_thread<T>(static_cast<int>(h), {dyp, xp, wp, dsp, dxp});
    if (wnp > 0) {
      const size_t smem = static_cast<size_t>(h) * sizeof(float);
      with_np(wnp, [&](auto npc) {
        constexpr int NP = decltype(npc)::value;
        if constexpr (NP <= 8) {
          if (has_dsum)
            rms_bwd_warp<T, kVec, NP, true><<<groups, kWarpBlock, smem, stream>>>(dyp, xp, wp, rs, dsp, dxp, pp, rows, h);
          else
            rms_bwd_warp<T, kVec, NP, false><<<groups, kWarpBlock, smem, stream>>>(dyp, xp, wp, rs, dsp, dxp, pp, rows, h);
        }
      });
    } else if (np == 0) {
      if (has_dsum) rms_bwd_generic<T, true><<<groups, kBlock, 0, stream>>>(dyp, xp, wp, rs, dsp, dxp, pp, rows, h);
      else rms_bwd_generic<T, false><<<groups, kBlock, 0, stream>>>(dyp, xp, wp, rs, dsp, dxp, pp, rows, h);
    } else {
      with_np(np, [&](auto npc) {
        constexpr int NP = decltype(npc)::value;
        if constexpr (NP * kVec <= 64) {
          const int threads = fast_threads<T>(static_cast<int>(h), NP);
          if (has_dsum)
            rms_bwd_fast<T, kVec, NP, true><<<groups, threads, 0, stream>>>(dyp, xp, wp, rs, dsp, dxp, pp, rows, h);
          else
            rms_bwd_fast<T, kVec, NP, false><<<groups, threads, 0, stream>>>(dyp, xp, wp, rs, dsp, dxp, pp, rows, h);
        }
      });
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    dw_reduce<T><<<static_cast<int>((h + 31) / 32), dim3(32, 16), 0, stream>>>(pp, static_cast<T*>(dw.data_ptr()),
                                                                              groups, static_cast<int>(h));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
