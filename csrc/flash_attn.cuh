// Building blocks of the flash-attention kernels (flash_attn.cu, flash_attn_sm90.cu): tensor-core
// fragments (mma.sync m16n8k16 bf16 -> fp32, ldmatrix), asynchronous 16-byte copies into swizzled
// shared memory, and the parameter blocks of the launches with their host-side construction.
#pragma once

#include "common.cuh"

#include <cstdint>

namespace mq2 {
namespace fa {

using bf16 = __nv_bfloat16;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

struct FwdParams {
  const bf16* q;
  const bf16* k;
  const bf16* v;
  bf16* o;
  float* lse;                   // [b, hq, sq]
  int64_t q_sb, q_ss, q_sh;     // element strides of q [b, sq, hq, d] (last dimension contiguous)
  int64_t k_sb, k_ss, k_sh;
  int64_t v_sb, v_ss, v_sh;
  int64_t o_sb, o_ss, o_sh;
  const int* key_lo;            // [b, sq] or null: query i may see keys key_lo[i] <= j < key_hi[i]
  const int* key_hi;            // (non-decreasing in i: documents packed in order)
  int b, hq, hkv, sq, sk;
  int causal_offset;            // query i sees key j <= i + causal_offset (sk - sq: bottom-right aligned)
  bool causal;
  float scale_log2;             // softmax_scale * log2(e)
};

// The forward's parameters from the launcher's tensors (validated by bindings.cpp): q [b, sq, hq, d],
// k / v [b, sk, hkv, d], out like q, lse fp32 [b, hq, sq], key_lo / key_hi int32 [b, sq] or absent.
FwdParams make_fwd_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                          at::Tensor& lse, const c10::optional<at::Tensor>& key_lo,
                          const c10::optional<at::Tensor>& key_hi, bool causal, double scale);

// f(std::integral_constant<int, D>{}) for the supported head dims.
template <typename F>
void with_head_dim(int d, F f) {
  if (d == 64) f(std::integral_constant<int, 64>{});
  else if (d == 128) f(std::integral_constant<int, 128>{});
  else TORCH_CHECK(false, "flash attention: head_dim must be 64 or 128, got ", d);
}

struct BwdParams {
  const bf16* q;
  const bf16* k;
  const bf16* v;
  const bf16* dout;
  const float* lse;             // [b, hq, sq]
  const float* delta;           // [b, hq, sq]: rowsum(dout * out) (minus the lse gradient)
  float* dq_acc;                // [b, sq, hq, d] fp32, zeroed; accumulated with atomics
  void* dk;                     // bf16 [b, sk, hkv, d] (strided) when one query head per kv head,
  void* dv;                     // else fp32 [b, sk, hq, d] partials summed over the group afterwards
  int64_t q_sb, q_ss, q_sh;
  int64_t k_sb, k_ss, k_sh;
  int64_t v_sb, v_ss, v_sh;
  int64_t do_sb, do_ss, do_sh;
  int64_t dk_sb, dk_ss, dk_sh;  // strides of dk and dv (same layout for both)
  const int* query_lo;          // [b, sk] or null: key j may be seen by queries query_lo[j] <= i < query_hi[j]
  const int* query_hi;
  int b, hq, hkv, sq, sk;
  int causal_offset;
  bool causal;
  bool partial;                 // dk/dv are the fp32 per-query-head partials
  float scale_log2;
  float scale;
};

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared; `valid` false writes zeros and reads nothing.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// c[16x8] += a[16x16] * b[16x8], bf16 operands, fp32 accumulators.
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// Element offset of (row, col) in a shared tile of rows of W bf16 (W >= 64): the 16-byte chunks
// of a row are permuted by the row's low 3 bits, so the 8 row addresses of an ldmatrix (same
// column, 8 consecutive rows) fall in 8 different bank groups.
template <int W>
__device__ __forceinline__ int swz(int row, int col) {
  return row * W + ((((col >> 3) ^ row) & 7) | ((col >> 3) & ~7)) * 8 + (col & 7);
}

// ROWS x W tile starting at global row `row0` (rows >= `limit` are zero-filled) into `dst`.
template <int ROWS, int W, int NT>
__device__ __forceinline__ void load_tile(bf16* dst, const bf16* base, int64_t row_stride, int row0, int limit,
                                          int tid) {
  constexpr int CHUNKS = W / 8;
#pragma unroll
  for (int c = tid; c < ROWS * CHUNKS; c += NT) {
    const int r = c / CHUNKS, ch = c % CHUNKS;
    const bool valid = row0 + r < limit;
    const bf16* src = valid ? base + (int64_t)(row0 + r) * row_stride + ch * 8 : base;
    cp_async16(smem_u32(dst + swz<W>(r, ch * 8)), src, valid);
  }
}

}  // namespace fa
}  // namespace mq2
