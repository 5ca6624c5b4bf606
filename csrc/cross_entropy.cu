// Cross-entropy pieces over one rank's vocabulary shard, fused with the softmax so no fp32 copy
// of the logits is ever made. The tensor-parallel all-reduces stay in Python between the two:
//
//   forward  (per row n of logits [N, V], one read): m[n] = max_v x, s[n] = sum_v exp(x - m[n]),
//            t[n] = x[n, target[n]] if 0 <= target[n] < V else 0
//   backward (one read, one write): dx[n, v] = (exp(x - lse[n]) - [v == target[n]]) * g[n]
// Math is fp32; the online max/sum combines per-thread partials in a fixed order.

#include "common.cuh"

namespace {

using namespace mq2;
constexpr int kBlock = 256;

__device__ __forceinline__ void combine(float& m, float& s, float m2, float s2) {
  const float mn = fmaxf(m, m2);
  if (mn == -INFINITY) return;  // both empty
  s = (m == -INFINITY ? 0.f : s * __expf(m - mn)) + (m2 == -INFINITY ? 0.f : s2 * __expf(m2 - mn));
  m = mn;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kBlock) ce_fwd_kernel(const T* __restrict__ logits, const int64_t* __restrict__ target,
                                                        float* __restrict__ row_max, float* __restrict__ row_sum,
                                                        float* __restrict__ tgt_logit, int64_t rows, int64_t v) {
  __shared__ float sm[32], ss[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = kBlock / 32;
  for (int64_t n = blockIdx.x; n < rows; n += gridDim.x) {
    const T* row = logits + n * v;
    float m = -INFINITY, s = 0.f;
    for (int64_t c = threadIdx.x * VEC; c < v; c += kBlock * VEC) {
      const Pack<T, VEC> a = load_pack<T, VEC>(row + c);
      float f[VEC];
      float pm = -INFINITY;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        f[e] = to_float(a.v[e]);
        pm = fmaxf(pm, f[e]);
      }
      float ps = 0.f;
#pragma unroll
      for (int e = 0; e < VEC; ++e) ps += __expf(f[e] - pm);
      combine(m, s, pm, ps);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
      combine(m, s, m2, s2);
    }
    if (lane == 0) {
      sm[warp] = m;
      ss[warp] = s;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      float bm = sm[0], bs = ss[0];
      for (int w = 1; w < warps; ++w) combine(bm, bs, sm[w], ss[w]);
      row_max[n] = bm;
      row_sum[n] = bs;
      const int64_t t = target[n];
      tgt_logit[n] = (t >= 0 && t < v) ? to_float(row[t]) : 0.f;
    }
    __syncthreads();
  }
}

// Flat grid-stride over all packs of all rows (consecutive threads, consecutive addresses across
// row ends), as the copy-like kernels that reach the copy bandwidth do; a block per row left
// writes at 27% of it.
template <typename T, int VEC>
__global__ void __launch_bounds__(kBlock) ce_bwd_kernel(const T* __restrict__ logits, const int64_t* __restrict__ target,
                                                        const float* __restrict__ lse, const float* __restrict__ grad,
                                                        T* __restrict__ dx, int64_t rows, int64_t v) {
  const int64_t per_row = v / VEC;
  const int64_t total = rows * per_row;
  for (int64_t i = blockIdx.x * (int64_t)kBlock + threadIdx.x; i < total; i += (int64_t)gridDim.x * kBlock) {
    const int64_t n = i / per_row;
    const int64_t c = (i - n * per_row) * VEC;
    const float l = lse[n], g = grad[n];
    const int64_t t = target[n] - c;  // the target's offset inside this pack, if it is there
    const Pack<T, VEC> a = load_pack<T, VEC>(logits + i * VEC);
    Pack<T, VEC> o;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float p = __expf(to_float(a.v[e]) - l) - (t == e ? 1.f : 0.f);
      o.v[e] = from_float<T>(p * g);
    }
    store_pack<T, VEC>(dx + i * VEC, o);
  }
}

template <typename T, typename F>
void with_vec(int64_t v, std::initializer_list<const void*> ptrs, F f) {
  constexpr int kVec = 16 / sizeof(T);
  bool ok = v % kVec == 0;
  for (const void* p : ptrs) ok = ok && aligned16(p);
  if (ok) f(std::integral_constant<int, kVec>{});
  else f(std::integral_constant<int, 1>{});
}

int grid_for(int64_t rows) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(rows, (int64_t)num_sms() * 8)));
}

}  // namespace

// Validated by bindings.cpp: logits contiguous [rows, v] (v > 0, rows > 0), target int64 [rows],
// the fp32 [rows] outputs and inputs contiguous, dx like logits.
void ce_forward_cuda(const at::Tensor& logits, const at::Tensor& target, at::Tensor& row_max,
                     at::Tensor& row_sum, at::Tensor& tgt_logit, int64_t rows, int64_t v) {
  const c10::cuda::CUDAGuard guard(logits.device());
  auto stream = current_stream();
  MQ2_DISPATCH(logits.scalar_type(), T, {
    with_vec<T>(v, {logits.data_ptr()}, [&](auto vc) {
      ce_fwd_kernel<T, decltype(vc)::value><<<grid_for(rows), kBlock, 0, stream>>>(
          static_cast<const T*>(logits.data_ptr()), target.data_ptr<int64_t>(), row_max.data_ptr<float>(),
          row_sum.data_ptr<float>(), tgt_logit.data_ptr<float>(), rows, v);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void ce_backward_cuda(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& lse,
                      const at::Tensor& grad, at::Tensor& dx, int64_t rows, int64_t v) {
  const c10::cuda::CUDAGuard guard(logits.device());
  auto stream = current_stream();
  MQ2_DISPATCH(logits.scalar_type(), T, {
    with_vec<T>(v, {logits.data_ptr(), dx.data_ptr()}, [&](auto vc) {
      constexpr int V = decltype(vc)::value;
      const int64_t work = rows * (v / V);
      const int grid = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((work + kBlock - 1) / kBlock, (int64_t)num_sms() * 16)));
      ce_bwd_kernel<T, V><<<grid, kBlock, 0, stream>>>(
          static_cast<const T*>(logits.data_ptr()), target.data_ptr<int64_t>(), lse.data_ptr<float>(),
          grad.data_ptr<float>(), static_cast<T*>(dx.data_ptr()), rows, v);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
