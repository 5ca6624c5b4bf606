// MoE token permutation. row_map[t * k + j] (int32) is the row of the expert-sorted buffer that
// holds token t's j-th routed copy; it is computed by the caller from the routing indices with a
// stable sort, so every row has exactly one source and every kernel below is a pure gather or a
// fixed-order sum: deterministic, no atomics. Each block handles one token at a time and reads
// that token's row once, moving 16-byte packs when the hidden size and the pointers allow.
//
//   permute      fwd: out[row_map[t, j]] = x[t]                  bwd: dx[t] = sum_j dout[row_map[t, j]]
//   unpermute    fwd: out[t] = sum_j p[t, j] * y[row_map[t, j]]  (fp32 sum, rounded once)
//                bwd: dy[row_map[t, j]] = p[t, j] * dout[t],  dp[t, j] = <dout[t], y[row_map[t, j]]>

#include "common.cuh"

namespace {

using namespace mq2;
constexpr int kBlock = 128;

template <typename T, int VEC>
__global__ void __launch_bounds__(kBlock) permute_fwd_kernel(const T* __restrict__ x, const int* __restrict__ row_map,
                                                             T* __restrict__ out, int64_t tokens, int k, int h) {
  for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    for (int c = threadIdx.x * VEC; c < h; c += kBlock * VEC) {
      const Pack<T, VEC> a = load_pack<T, VEC>(x + t * h + c);
      for (int j = 0; j < k; ++j) store_pack<T, VEC>(out + (int64_t)row_map[t * k + j] * h + c, a);
    }
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kBlock) permute_bwd_kernel(const T* __restrict__ dout, const int* __restrict__ row_map,
                                                             T* __restrict__ dx, int64_t tokens, int k, int h) {
  for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    for (int c = threadIdx.x * VEC; c < h; c += kBlock * VEC) {
      float acc[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[e] = 0.f;
      for (int j = 0; j < k; ++j) {
        const Pack<T, VEC> a = load_pack<T, VEC>(dout + (int64_t)row_map[t * k + j] * h + c);
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[e] += to_float(a.v[e]);
      }
      Pack<T, VEC> o;
#pragma unroll
      for (int e = 0; e < VEC; ++e) o.v[e] = from_float<T>(acc[e]);
      store_pack<T, VEC>(dx + t * h + c, o);
    }
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kBlock) unpermute_fwd_kernel(const T* __restrict__ y, const int* __restrict__ row_map,
                                                               const float* __restrict__ probs, T* __restrict__ out,
                                                               int64_t tokens, int k, int h) {
  for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    for (int c = threadIdx.x * VEC; c < h; c += kBlock * VEC) {
      float acc[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[e] = 0.f;
      for (int j = 0; j < k; ++j) {
        const float p = probs[t * k + j];
        const Pack<T, VEC> a = load_pack<T, VEC>(y + (int64_t)row_map[t * k + j] * h + c);
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[e] += p * to_float(a.v[e]);
      }
      Pack<T, VEC> o;
#pragma unroll
      for (int e = 0; e < VEC; ++e) o.v[e] = from_float<T>(acc[e]);
      store_pack<T, VEC>(out + t * h + c, o);
    }
  }
}

// Dynamic shared memory: k * (kBlock / 32) floats for the per-warp partial dot products.
template <typename T, int VEC>
__global__ void __launch_bounds__(kBlock) unpermute_bwd_kernel(const T* __restrict__ dout, const T* __restrict__ y,
                                                               const int* __restrict__ row_map,
                                                               const float* __restrict__ probs, T* __restrict__ dy,
                                                               float* __restrict__ dprobs, int64_t tokens, int k, int h) {
  extern __shared__ float part[];
  constexpr int kWarps = kBlock / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    for (int j = 0; j < k; ++j) {
      const int64_t row = row_map[t * k + j];
      const float p = probs[t * k + j];
      float dot = 0.f;
      for (int c = threadIdx.x * VEC; c < h; c += kBlock * VEC) {
        const Pack<T, VEC> d = load_pack<T, VEC>(dout + t * h + c);  // re-read per j: an L1 hit
        const Pack<T, VEC> a = load_pack<T, VEC>(y + row * h + c);
        Pack<T, VEC> o;
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float dv = to_float(d.v[e]);
          dot += dv * to_float(a.v[e]);
          o.v[e] = from_float<T>(p * dv);
        }
        store_pack<T, VEC>(dy + row * h + c, o);
      }
      dot = warp_sum(dot);
      if (lane == 0) part[j * kWarps + warp] = dot;
    }
    __syncthreads();
    for (int j = threadIdx.x; j < k; j += kBlock) {
      float s = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) s += part[j * kWarps + w];
      dprobs[t * k + j] = s;
    }
    __syncthreads();
  }
}

// ---- Routing indices -> row_map and per-expert counts (a stable counting sort, one block per
// expert). Pass 1: block e counts the slots routed to e. Pass 2: block e takes its offset from the
// counts of the experts before it, then walks the slots in order, giving the i-th slot routed to e
// the row offset + i (a block scan of match counts). Every id is read once per expert from L2;
// ids outside [0, E) are counted by no block, which the caller detects as sum(counts) < slots.
constexpr int kIndexBlock = 1024;

template <typename I>
__global__ void __launch_bounds__(kIndexBlock) expert_count_kernel(const I* __restrict__ ids, int64_t slots,
                                                                   int64_t* __restrict__ counts) {
  __shared__ int64_t part[32];  // an integer block sum: exact at any size
  const I e = static_cast<I>(blockIdx.x);
  int64_t n = 0;
#pragma unroll 8
  for (int64_t s = threadIdx.x; s < slots; s += kIndexBlock) n += ids[s] == e;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) n += __shfl_xor_sync(0xffffffffu, n, o);
  if (lane == 0) part[warp] = n;
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t t = 0;
    for (int w = 0; w < kIndexBlock / 32; ++w) t += part[w];
    counts[blockIdx.x] = t;
  }
}

// Each thread takes kItems consecutive slots per step (a step covers kIndexBlock * kItems slots),
// so the block needs few steps and few barriers: a warp scan of the per-thread match counts, then
// one scan of the warp totals.
constexpr int kItems = 8;

template <typename I>
__global__ void __launch_bounds__(kIndexBlock) expert_rows_kernel(const I* __restrict__ ids, int64_t slots,
                                                                  const int64_t* __restrict__ counts,
                                                                  int* __restrict__ row_map) {
  __shared__ int warp_tot[32];
  __shared__ int warp_before[32];
  __shared__ int step_total;
  __shared__ int64_t base_s;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const I e = static_cast<I>(blockIdx.x);
  if (threadIdx.x == 0) {
    int64_t b = 0;
    for (int i = 0; i < static_cast<int>(blockIdx.x); ++i) b += counts[i];
    base_s = b;
  }
  __syncthreads();
  int64_t base = base_s;
  for (int64_t start = 0; start < slots; start += (int64_t)kIndexBlock * kItems) {
    const int64_t s0 = start + (int64_t)threadIdx.x * kItems;
    unsigned mask = 0;
#pragma unroll
    for (int i = 0; i < kItems; ++i)
      if (s0 + i < slots && ids[s0 + i] == e) mask |= 1u << i;
    const int cnt = __popc(mask);
    int incl = cnt;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += v;
    }
    if (lane == 31) warp_tot[warp] = incl;
    __syncthreads();
    if (warp == 0) {
      const int v = lane < kIndexBlock / 32 ? warp_tot[lane] : 0;
      int w_incl = v;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int u = __shfl_up_sync(0xffffffffu, w_incl, o);
        if (lane >= o) w_incl += u;
      }
      warp_before[lane] = w_incl - v;
      if (lane == 31) step_total = w_incl;
    }
    __syncthreads();
    int64_t r = base + warp_before[warp] + (incl - cnt);
#pragma unroll
    for (int i = 0; i < kItems; ++i)
      if (mask >> i & 1u) row_map[s0 + i] = static_cast<int>(r++);
    base += step_total;
    __syncthreads();  // the shared totals are rewritten by the next step
  }
}

// unpermute backward for a compile-time top-k: one pass over the columns reads dout[t] once and
// keeps the K row loads and K dot products independent (in flight together).
template <typename T, int VEC, int K>
__global__ void __launch_bounds__(kBlock) unpermute_bwd_k_kernel(const T* __restrict__ dout, const T* __restrict__ y,
                                                                 const int* __restrict__ row_map,
                                                                 const float* __restrict__ probs, T* __restrict__ dy,
                                                                 float* __restrict__ dprobs, int64_t tokens, int h) {
  __shared__ float scratch[K * 32];
  for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    int64_t row[K];
    float p[K], dot[K];
#pragma unroll
    for (int j = 0; j < K; ++j) {
      row[j] = row_map[t * K + j];
      p[j] = probs[t * K + j];
      dot[j] = 0.f;
    }
    for (int c = threadIdx.x * VEC; c < h; c += kBlock * VEC) {
      const Pack<T, VEC> d = load_pack<T, VEC>(dout + t * h + c);
      Pack<T, VEC> a[K];
#pragma unroll
      for (int j = 0; j < K; ++j) a[j] = load_pack<T, VEC>(y + row[j] * h + c);
#pragma unroll
      for (int j = 0; j < K; ++j) {
        Pack<T, VEC> o;
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float dv = to_float(d.v[e]);
          dot[j] += dv * to_float(a[j].v[e]);
          o.v[e] = from_float<T>(p[j] * dv);
        }
        store_pack<T, VEC>(dy + row[j] * h + c, o);
      }
    }
    block_sum<K>(dot, scratch);
    if (threadIdx.x < K) {
#pragma unroll
      for (int j = 0; j < K; ++j)
        if (j == static_cast<int>(threadIdx.x)) dprobs[t * K + j] = dot[j];
    }
  }
}

int grid_for(int64_t tokens) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(tokens, (int64_t)num_sms() * 16)));
}

template <typename T, typename F>
void with_vec(int64_t h, std::initializer_list<const void*> ptrs, F f) {
  constexpr int kVec = 16 / sizeof(T);
  bool ok = h % kVec == 0;
  for (const void* p : ptrs) ok = ok && aligned16(p);
  if (ok) f(std::integral_constant<int, kVec>{});
  else f(std::integral_constant<int, 1>{});
}

}  // namespace

// ids: contiguous int32/int64 [slots] on CUDA; counts int64 [experts]; row_map int32 [slots].
void expert_rows_cuda(const at::Tensor& ids, int64_t experts, at::Tensor& counts, at::Tensor& row_map) {
  const c10::cuda::CUDAGuard guard(ids.device());
  auto stream = current_stream();
  const int64_t slots = ids.numel();
  if (ids.scalar_type() == at::kLong) {
    expert_count_kernel<int64_t><<<experts, kIndexBlock, 0, stream>>>(ids.data_ptr<int64_t>(), slots, counts.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    expert_rows_kernel<int64_t><<<experts, kIndexBlock, 0, stream>>>(ids.data_ptr<int64_t>(), slots, counts.data_ptr<int64_t>(),
                                                                    row_map.data_ptr<int>());
  } else {
    expert_count_kernel<int><<<experts, kIndexBlock, 0, stream>>>(ids.data_ptr<int>(), slots, counts.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    expert_rows_kernel<int><<<experts, kIndexBlock, 0, stream>>>(ids.data_ptr<int>(), slots, counts.data_ptr<int64_t>(),
                                                                row_map.data_ptr<int>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Validated by bindings.cpp: contiguous CUDA tensors; x/dx/out [tokens, h]; permuted buffers
// [tokens * k, h]; row_map int32 [tokens * k] (a permutation of 0..tokens*k-1); probs/dprobs fp32
// [tokens, k]; tokens > 0, k > 0, h > 0.
void permute_forward_cuda(const at::Tensor& x, const at::Tensor& row_map, at::Tensor& out, int64_t tokens,
                          int64_t k, int64_t h) {
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = current_stream();
  MQ2_DISPATCH(x.scalar_type(), T, {
    with_vec<T>(h, {x.data_ptr(), out.data_ptr()}, [&](auto v) {
      permute_fwd_kernel<T, decltype(v)::value><<<grid_for(tokens), kBlock, 0, stream>>>(
          static_cast<const T*>(x.data_ptr()), row_map.data_ptr<int>(), static_cast<T*>(out.data_ptr()), tokens, k, h);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void permute_backward_cuda(const at::Tensor& dout, const at::Tensor& row_map, at::Tensor& dx, int64_t tokens,
                           int64_t k, int64_t h) {
  const c10::cuda::CUDAGuard guard(dout.device());
  auto stream = current_stream();
  MQ2_DISPATCH(dout.scalar_type(), T, {
    with_vec<T>(h, {dout.data_ptr(), dx.data_ptr()}, [&](auto v) {
      permute_bwd_kernel<T, decltype(v)::value><<<grid_for(tokens), kBlock, 0, stream>>>(
          static_cast<const T*>(dout.data_ptr()), row_map.data_ptr<int>(), static_cast<T*>(dx.data_ptr()), tokens, k, h);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void unpermute_forward_cuda(const at::Tensor& y, const at::Tensor& row_map, const at::Tensor& probs,
                            at::Tensor& out, int64_t tokens, int64_t k, int64_t h) {
  const c10::cuda::CUDAGuard guard(y.device());
  auto stream = current_stream();
  MQ2_DISPATCH(y.scalar_type(), T, {
    with_vec<T>(h, {y.data_ptr(), out.data_ptr()}, [&](auto v) {
      unpermute_fwd_kernel<T, decltype(v)::value><<<grid_for(tokens), kBlock, 0, stream>>>(
          static_cast<const T*>(y.data_ptr()), row_map.data_ptr<int>(), probs.data_ptr<float>(),
          static_cast<T*>(out.data_ptr()), tokens, k, h);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void unpermute_backward_cuda(const at::Tensor& dout, const at::Tensor& y, const at::Tensor& row_map,
                             const at::Tensor& probs, at::Tensor& dy, at::Tensor& dprobs, int64_t tokens,
                             int64_t k, int64_t h) {
  const c10::cuda::CUDAGuard guard(y.device());
  auto stream = current_stream();
  const size_t smem = sizeof(float) * k * (kBlock / 32);
  TORCH_CHECK(smem <= 48 * 1024, "unpermute_backward: top-k ", k, " is too large");
  MQ2_DISPATCH(y.scalar_type(), T, {
    with_vec<T>(h, {dout.data_ptr(), y.data_ptr(), dy.data_ptr()}, [&](auto v) {
      constexpr int V = decltype(v)::value;
      auto fixed_k = [&](auto kc) {
        constexpr int K = decltype(kc)::value;
        unpermute_bwd_k_kernel<T, V, K><<<grid_for(tokens), kBlock, 0, stream>>>(
            static_cast<const T*>(dout.data_ptr()), static_cast<const T*>(y.data_ptr()), row_map.data_ptr<int>(),
            probs.data_ptr<float>(), static_cast<T*>(dy.data_ptr()), dprobs.data_ptr<float>(), tokens,
            static_cast<int>(h));
      };
      if (k == 8) return fixed_k(std::integral_constant<int, 8>{});
      if (k == 4) return fixed_k(std::integral_constant<int, 4>{});
      if (k == 2) return fixed_k(std::integral_constant<int, 2>{});
      if (k == 1) return fixed_k(std::integral_constant<int, 1>{});
      unpermute_bwd_kernel<T, V><<<grid_for(tokens), kBlock, smem, stream>>>(
          static_cast<const T*>(dout.data_ptr()), static_cast<const T*>(y.data_ptr()), row_map.data_ptr<int>(),
          probs.data_ptr<float>(), static_cast<T*>(dy.data_ptr()), dprobs.data_ptr<float>(), tokens, k, h);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
