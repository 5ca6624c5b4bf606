// Rotary position embedding, HF rotate-half convention, on a 4-D strided input x [n0, n1, n2, d]
// (last dimension contiguous) with cos/sin of the same shape given by strides (0 on broadcast
// dimensions), so the tables computed from the given positions (packing, context parallelism,
// YaRN scaling folded in) are read as they are and never expanded in memory.
//
//   forward:  out[:h] = x[:h] cos[:h] - x[h:] sin[:h],   out[h:] = x[h:] cos[h:] + x[:h] sin[h:]
//   backward: dx[:h] = dy[:h] cos[:h] + dy[h:] sin[h:],  dx[h:] = dy[h:] cos[h:] - dy[:h] sin[:h]
// with h = d / 2; fp32 math, one rounding per output. The output is contiguous.

#include "common.cuh"

namespace {

using namespace mq2;

struct Dims {
  int64_t n1, n2;
  int64_t xs0, xs1, xs2;
  int64_t cs0, cs1, cs2;
  int64_t ss0, ss1, ss2;
};

// One thread per (i0, i1, pack) walks the n2 dimension (the heads): cos/sin are loaded once
// for all heads when they broadcast over it (stride 0), as they do in the model.
template <typename T, int VEC, bool BWD>
__global__ void __launch_bounds__(256) rope_kernel(const T* __restrict__ x, const T* __restrict__ cos,
                                                   const T* __restrict__ sin, T* __restrict__ out, int64_t outer,
                                                   int half, Dims dm) {
  const int per_row = half / VEC;
  const int64_t total = outer * per_row;
  const bool table_per_head = dm.cs2 != 0 || dm.ss2 != 0;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r01 = i / per_row;
    const int c = static_cast<int>(i - r01 * per_row) * VEC;
    const int64_t i1 = r01 % dm.n1, i0 = r01 / dm.n1;
    const T* cr = cos + i0 * dm.cs0 + i1 * dm.cs1;
    const T* sr = sin + i0 * dm.ss0 + i1 * dm.ss1;
    Pack<T, VEC> clo = load_pack<T, VEC>(cr + c), chi = load_pack<T, VEC>(cr + half + c);
    Pack<T, VEC> slo = load_pack<T, VEC>(sr + c), shi = load_pack<T, VEC>(sr + half + c);
    const T* xb = x + i0 * dm.xs0 + i1 * dm.xs1;
    T* ob = out + r01 * dm.n2 * 2 * half;
#pragma unroll 4
    for (int64_t i2 = 0; i2 < dm.n2; ++i2) {
      if (table_per_head && i2 > 0) {
        clo = load_pack<T, VEC>(cr + i2 * dm.cs2 + c);
        chi = load_pack<T, VEC>(cr + i2 * dm.cs2 + half + c);
        slo = load_pack<T, VEC>(sr + i2 * dm.ss2 + c);
        shi = load_pack<T, VEC>(sr + i2 * dm.ss2 + half + c);
      }
      const T* xr = xb + i2 * dm.xs2;
      const Pack<T, VEC> lo = load_pack<T, VEC>(xr + c), hi = load_pack<T, VEC>(xr + half + c);
      Pack<T, VEC> olo, ohi;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float a = to_float(lo.v[e]), b = to_float(hi.v[e]);
        if constexpr (BWD) {
          olo.v[e] = from_float<T>(a * to_float(clo.v[e]) + b * to_float(shi.v[e]));
          ohi.v[e] = from_float<T>(b * to_float(chi.v[e]) - a * to_float(slo.v[e]));
        } else {
          olo.v[e] = from_float<T>(a * to_float(clo.v[e]) - b * to_float(slo.v[e]));
          ohi.v[e] = from_float<T>(b * to_float(chi.v[e]) + a * to_float(shi.v[e]));
        }
      }
      T* orow = ob + i2 * 2 * half;
      store_pack<T, VEC>(orow + c, olo);
      store_pack<T, VEC>(orow + half + c, ohi);
    }
  }
}

}  // namespace

// Validated by bindings.cpp: x, cos, sin CUDA tensors of one dtype, 4-D, same shape (cos/sin may
// be expanded views), last stride 1, d even; out contiguous of x's shape; numel > 0.
void rope_cuda(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& out,
               bool backward) {
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = current_stream();
  const int64_t d = x.size(3), half = d / 2;
  const int64_t outer = x.size(0) * x.size(1);
  Dims dm{x.size(1), x.size(2), x.stride(0), x.stride(1), x.stride(2), cos.stride(0), cos.stride(1), cos.stride(2),
          sin.stride(0), sin.stride(1), sin.stride(2)};
  MQ2_DISPATCH(x.scalar_type(), T, {
    constexpr int kVec = 16 / sizeof(T);
    bool vec = half % kVec == 0;
    for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&x, &cos, &sin, &out}) {
      vec = vec && aligned16(t->data_ptr());
      for (int i = 0; i < 3; ++i) vec = vec && t->stride(i) % kVec == 0;
    }
    auto launch = [&](auto vc) {
      constexpr int V = decltype(vc)::value;
      const int64_t work = outer * (half / V);
      const int grid = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((work + 255) / 256, (int64_t)num_sms() * 16)));
      const T* xp = static_cast<const T*>(x.data_ptr());
      const T* cp = static_cast<const T*>(cos.data_ptr());
      const T* sp = static_cast<const T*>(sin.data_ptr());
      T* op = static_cast<T*>(out.data_ptr());
      if (backward) rope_kernel<T, V, true><<<grid, 256, 0, stream>>>(xp, cp, sp, op, outer, static_cast<int>(half), dm);
      else rope_kernel<T, V, false><<<grid, 256, 0, stream>>>(xp, cp, sp, op, outer, static_cast<int>(half), dm);
    };
    if (vec) launch(std::integral_constant<int, kVec>{});
    else launch(std::integral_constant<int, 1>{});
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
