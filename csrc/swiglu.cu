// Fused SwiGLU: y = silu(gate) * up for x laid out [..., gate | up] along the last dimension.
// Forward reads 2F and writes F elements per row; backward reads x and dy and writes dx.
// Math is fp32 whatever the storage type. Rows are processed with vectors of 16 bytes when
// F and the pointers allow it, with a scalar loop otherwise.

#include "common.cuh"

namespace {

using mq2::from_float;
using mq2::Pack;
using mq2::to_float;

__device__ __forceinline__ float sigmoidf(float v) { return 1.0f / (1.0f + __expf(-v)); }

// One thread handles VEC consecutive output elements of a row; grid-stride over all of them.
template <typename T, int VEC>
__global__ void swiglu_fwd_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t rows, int64_t f) {
  const int64_t per_row = f / VEC;
  const int64_t total = rows * per_row;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = i / per_row, c = (i % per_row) * VEC;
    const T* xr = x + r * 2 * f;
    Pack<T, VEC> g = *reinterpret_cast<const Pack<T, VEC>*>(xr + c);
    Pack<T, VEC> u = *reinterpret_cast<const Pack<T, VEC>*>(xr + f + c);
    Pack<T, VEC> out;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float gv = to_float(g.v[k]);
      out.v[k] = from_float<T>(gv * sigmoidf(gv) * to_float(u.v[k]));
    }
    *reinterpret_cast<Pack<T, VEC>*>(y + r * f + c) = out;
  }
}

template <typename T, int VEC>
__global__ void swiglu_bwd_kernel(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ dx,
                                  int64_t rows, int64_t f) {
  const int64_t per_row = f / VEC;
  const int64_t total = rows * per_row;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = i / per_row, c = (i % per_row) * VEC;
    const T* xr = x + r * 2 * f;
    Pack<T, VEC> g = *reinterpret_cast<const Pack<T, VEC>*>(xr + c);
    Pack<T, VEC> u = *reinterpret_cast<const Pack<T, VEC>*>(xr + f + c);
    Pack<T, VEC> d = *reinterpret_cast<const Pack<T, VEC>*>(dy + r * f + c);
    Pack<T, VEC> dg, du;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float gv = to_float(g.v[k]), uv = to_float(u.v[k]), dv = to_float(d.v[k]);
      const float s = sigmoidf(gv);
      const float silu = gv * s;
      // d silu(g)/dg = s * (1 + g * (1 - s))
      dg.v[k] = from_float<T>(dv * uv * s * (1.0f + gv * (1.0f - s)));
      du.v[k] = from_float<T>(dv * silu);
    }
    T* dxr = dx + r * 2 * f;
    *reinterpret_cast<Pack<T, VEC>*>(dxr + c) = dg;
    *reinterpret_cast<Pack<T, VEC>*>(dxr + f + c) = du;
  }
}

int blocks_for(int64_t work, int threads) {
  const int sms = mq2::num_sms();
  const int64_t needed = (work + threads - 1) / threads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(needed, (int64_t)sms * 32)));
}

bool aligned(const void* p, int bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Launch with 16-byte vectors when the row length and every pointer allow it, else scalars.
template <typename T, typename Launch>
void dispatch_vec(int64_t f, std::initializer_list<const void*> ptrs, Launch launch) {
  constexpr int kVec = 16 / sizeof(T);
  bool ok = f % kVec == 0;
  for (const void* p : ptrs) ok = ok && aligned(p, 16);
  if (ok) {
    launch(std::integral_constant<int, kVec>{});
  } else {
    launch(std::integral_constant<int, 1>{});
  }
}

template <typename T>
void launch_fwd(const void* x, void* y, int64_t rows, int64_t f, cudaStream_t stream) {
  dispatch_vec<T>(f, {x, y}, [&](auto vec) {
    constexpr int V = decltype(vec)::value;
    const int threads = 256;
    swiglu_fwd_kernel<T, V><<<blocks_for(rows * f / V, threads), threads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<T*>(y), rows, f);
  });
}

template <typename T>
void launch_bwd(const void* x, const void* dy, void* dx, int64_t rows, int64_t f, cudaStream_t stream) {
  dispatch_vec<T>(f, {x, dy, dx}, [&](auto vec) {
    constexpr int V = decltype(vec)::value;
    const int threads = 256;
    swiglu_bwd_kernel<T, V><<<blocks_for(rows * f / V, threads), threads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(dy), static_cast<T*>(dx), rows, f);
  });
}

}  // namespace

// Inputs are validated by the callers in bindings.cpp: contiguous CUDA tensors of one
// supported dtype, x [rows, 2f], y / dy [rows, f], dx like x, rows * f > 0.
void swiglu_forward_cuda(const at::Tensor& x, at::Tensor& y, int64_t rows, int64_t f) {
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = mq2::current_stream();
  switch (x.scalar_type()) {
    case at::kFloat: launch_fwd<float>(x.data_ptr(), y.data_ptr(), rows, f, stream); break;
    case at::kBFloat16: launch_fwd<__nv_bfloat16>(x.data_ptr(), y.data_ptr(), rows, f, stream); break;
    default: launch_fwd<__half>(x.data_ptr(), y.data_ptr(), rows, f, stream); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void swiglu_backward_cuda(const at::Tensor& x, const at::Tensor& dy, at::Tensor& dx, int64_t rows,
                          int64_t f) {
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = mq2::current_stream();
  switch (x.scalar_type()) {
    case at::kFloat: launch_bwd<float>(x.data_ptr(), dy.data_ptr(), dx.data_ptr(), rows, f, stream); break;
    case at::kBFloat16:
      launch_bwd<__nv_bfloat16>(x.data_ptr(), dy.data_ptr(), dx.data_ptr(), rows, f, stream);
      break;
    default: launch_bwd<__half>(x.data_ptr(), dy.data_ptr(), dx.data_ptr(), rows, f, stream); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
