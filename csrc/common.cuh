// Device helpers shared by the kernels: storage <-> fp32 conversion, 16-byte packs, warp and
// block reductions, launch sizing. Every kernel does its arithmetic in fp32 whatever the storage.
#pragma once

// Only core ATen and c10/cuda headers: the .cu files then compile against any torch's headers
// (the CPU wheel's too, for CI's compile-only check) without the CUDA math libraries' headers.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Optional.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace mq2 {

template <typename T> __device__ __forceinline__ float to_float(T v) { return static_cast<float>(v); }
template <> __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_float(float v) { return __float2half(v); }

// VEC consecutive elements moved as one access (16 bytes when VEC = 16 / sizeof(T)).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC> __device__ __forceinline__ Pack<T, VEC> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, VEC>*>(p);
}
template <typename T, int VEC> __device__ __forceinline__ void store_pack(T* p, const Pack<T, VEC>& v) {
  *reinterpret_cast<Pack<T, VEC>*>(p) = v;
}

// A 16-byte pack of T held as four 32-bit words (uint4), for data that stays in registers a while:
// the bf16 and fp16 values are unpacked from the words by bit operations when used, so the compiler
// keeps the 4 words rather than 8 half-filled 16-bit registers.
template <typename T> __device__ __forceinline__ float unpack(const uint4& p, int k);
template <> __device__ __forceinline__ float unpack<float>(const uint4& p, int k) {
  return __uint_as_float(reinterpret_cast<const uint32_t*>(&p)[k]);
}
template <> __device__ __forceinline__ float unpack<__nv_bfloat16>(const uint4& p, int k) {
  const uint32_t w = reinterpret_cast<const uint32_t*>(&p)[k / 2];
  return __uint_as_float(k % 2 ? w & 0xffff0000u : w << 16);
}
template <> __device__ __forceinline__ float unpack<__half>(const uint4& p, int k) {
  const uint32_t w = reinterpret_cast<const uint32_t*>(&p)[k / 2];
  return __half2float(__ushort_as_half(static_cast<unsigned short>(k % 2 ? w >> 16 : w & 0xffffu)));
}

// The pack of 16 / sizeof(T) fp32 values, each rounded as from_float<T> rounds.
template <typename T> __device__ __forceinline__ uint4 repack(const float* v);
template <> __device__ __forceinline__ uint4 repack<float>(const float* v) {
  return make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]), __float_as_uint(v[3]));
}
// Two values per word: `pair` rounds two floats into a 4-byte __nv_bfloat162 or __half2.
template <typename F> __device__ __forceinline__ uint4 repack_pairs(const float* v, F pair) {
  uint4 p;
  uint32_t* w = reinterpret_cast<uint32_t*>(&p);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const auto two = pair(v[2 * j], v[2 * j + 1]);
    w[j] = *reinterpret_cast<const uint32_t*>(&two);
  }
  return p;
}
template <> __device__ __forceinline__ uint4 repack<__nv_bfloat16>(const float* v) {
  return repack_pairs(v, [](float a, float b) { return __floats2bfloat162_rn(a, b); });
}
template <> __device__ __forceinline__ uint4 repack<__half>(const float* v) {
  return repack_pairs(v, [](float a, float b) { return __floats2half2_rn(a, b); });
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum of N values per thread over the whole block; every thread gets the N totals. The order of
// additions is fixed by the launch shape, so results are bitwise reproducible. `scratch` holds
// N * 32 floats; the trailing barrier lets the caller reuse it at once.
template <int N>
__device__ __forceinline__ void block_sum(float (&v)[N], float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = warp_sum(v[i]);
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) scratch[i * 32 + warp] = v[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < N; ++i) {
    float t = lane < warps ? scratch[i * 32 + lane] : 0.0f;
    v[i] = warp_sum(t);
  }
  __syncthreads();
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Multiprocessor count of the current device (asked once per device).
inline int num_sms() {
  static int cached[64] = {0};
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev >= 64) dev = 63;
  if (cached[dev] == 0) C10_CUDA_CHECK(cudaDeviceGetAttribute(&cached[dev], cudaDevAttrMultiProcessorCount, dev));
  return cached[dev];
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

}  // namespace mq2

// Dispatch on the three storage types the kernels support.
#define MQ2_DISPATCH(dtype, T, ...)                      \
  switch (dtype) {                                       \
    case at::kFloat: {                                   \
      using T = float;                                   \
      __VA_ARGS__;                                       \
      break;                                             \
    }                                                    \
    case at::kBFloat16: {                                \
      using T = __nv_bfloat16;                           \
      __VA_ARGS__;                                       \
      break;                                             \
    }                                                    \
    case at::kHalf: {                                    \
      using T = __half;                                  \
      __VA_ARGS__;                                       \
      break;                                             \
    }                                                    \
    default: TORCH_CHECK(false, "unsupported dtype ", dtype); \
  }
