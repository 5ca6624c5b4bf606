// Fused SwiGLU: y = silu(gate) * up for x laid out [..., gate | up] along the last dimension.
// Forward reads 2F and writes F elements per row; backward reads x and dy and writes dx.
// Math is fp32 whatever the storage type. Rows are processed with vectors of 16 bytes when
// F and the pointers allow it, with a scalar loop otherwise.
//
// Forward with y quantised to FP8 for the down projection (swiglu_fp8_cuda; docs/architecture.md,
// "FP8"): fp8_quant.cuh's kernels read y through SwigluRows, which computes it from gate and up as
// the forward does, so y never goes to memory. "1x128": one tile pass writes y's codes along rows
// and along tokens (2F read, 2 x F written, bytes per output element 4 + 2 in bf16, against 4 + 2
// then 2 + 2 for swiglu then quantize_pair). "row" and "tensor" need their amaxes first: an amax
// pass then the tile pass (4, then 4 + 2, against 4 + 2 then 4 + 2).

#include "fp8_quant.cuh"

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

// silu(gate) * up of rows [rows, f] of x [rows, 2f], each rounded to T as the forward rounds it: the
// source of the FP8 kernels. Needs f % 8 == 0 and x 16-byte aligned. kMinBlocks 1: the compiler's
// own budget for the tile kernel (64 registers) spills here; 72 keep 3 blocks of 256 per SM.
template <typename T>
struct SwigluRows {
  using Type = T;
  static constexpr int kMinBlocks = 1;
  const T* x;
  int64_t rows, f;

  __device__ __forceinline__ Chunk<T> load(int64_t r, int64_t col) const {
    if (r >= rows || col >= f) return zero_chunk<T>();
    const Chunk<T> g = load_chunk<T, true>(x + r * 2 * f, col, f), u = load_chunk<T, true>(x + r * 2 * f + f, col, f);
    float v[kChunk];
#pragma unroll
    for (int k = 0; k < kChunk; ++k) {
      const float gv = elem<T>(g.w, k);
      v[k] = gv * sigmoidf(gv) * elem<T>(u.w, k);
    }
    return chunk_of<T>(v);
  }
};

}  // namespace

// Validated and allocated by bindings.cpp (swiglu_fp8_forward): x [rows, 2f] contiguous, rows >= 1;
// data e4m3 [rows_pad, f], data_t e4m3 [f, rows_pad], scale_inv and scale_inv_t as fp8_quantize's for
// `tiling` (none for "tensor"); amax int32 zeros, [1] ("tensor") or [rows_pad + f] ("row"). Rows past
// `rows` are zero rows. Returns false, having written nothing, where f % 8 != 0 or x is not 16-byte
// aligned: the caller then composes swiglu_forward_cuda and fp8_quantize_cuda, the same values.
bool swiglu_fp8_cuda(const at::Tensor& x, const std::string& tiling, at::Tensor& data, at::Tensor& scale_inv,
                     at::Tensor& data_t, const c10::optional<at::Tensor>& scale_inv_t, at::Tensor& amax, int64_t rows,
                     int64_t rows_pad, int64_t f) {
  if (f % kChunk != 0 || !mq2::aligned16(x.data_ptr())) return false;
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = mq2::current_stream();
  uint8_t* q = static_cast<uint8_t*>(data.data_ptr());
  uint8_t* qt = static_cast<uint8_t*>(data_t.data_ptr());
  float* sinv = scale_inv.data_ptr<float>();
  float* sinv_t = scale_inv_t ? scale_inv_t->data_ptr<float>() : nullptr;
  uint32_t* am = reinterpret_cast<uint32_t*>(amax.data_ptr<int32_t>());
  MQ2_DISPATCH(x.scalar_type(), T, {
    const SwigluRows<T> src{static_cast<const T*>(x.data_ptr()), rows, f};
    using Src = SwigluRows<T>;
    if (tiling == "tensor") {
      launch_amax<Src, Amax::kTensor>(src, nullptr, am, rows_pad, f, stream);
      launch_tiles<Src, Scales::kTensor>(src, q, qt, sinv, nullptr, am, rows_pad, f, stream);
    } else if (tiling == "row") {
      launch_amax<Src, Amax::kRowsCols>(src, am, am + rows_pad, rows_pad, f, stream);
      launch_tiles<Src, Scales::kRowCol>(src, q, qt, sinv, sinv_t, am, rows_pad, f, stream);
    } else {
      launch_tiles<Src, Scales::kTile>(src, q, qt, sinv, sinv_t, nullptr, rows_pad, f, stream);
    }
  });
  return true;
}

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
