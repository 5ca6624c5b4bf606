// Building blocks of the flash-attention kernels (flash_attn.cu, flash_attn_sm90.cu): tensor-core
// fragments (mma.sync m16n8k16 bf16 -> fp32, ldmatrix), asynchronous 16-byte copies into swizzled
// shared memory, and the parameter blocks of the launches with their host-side construction.
#pragma once

#include "common.cuh"

#include <climits>
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

// The backward's parameters from the launcher's tensors (validated by bindings.cpp): dout like q,
// dq_acc fp32 [b, sq, hq, d] contiguous and zeroed, dk / dv (one layout) bf16 [b, sk, hkv, d] or,
// with `partial`, fp32 [b, sk, hq, d]; query_lo / query_hi int32 [b, sk] or absent. lse and delta
// are left null: each kernel reads them in its own form.
BwdParams make_bwd_params(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          at::Tensor& dq_acc, at::Tensor& dk, at::Tensor& dv,
                          const c10::optional<at::Tensor>& query_lo, const c10::optional<at::Tensor>& query_hi,
                          bool causal, double scale, bool partial);

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

// ---- The forward's per-row pieces, shared by both kernels. A thread holds two rows of a score tile
// in the mma / wgmma accumulator layout: s[j][e] is row i = e / 2 (its rows g and g + 8), column
// 8 j + 2 t + e % 2 (t = lane % 4); the quad of lanes with one g shares the rows.

// The keys a row may see: lo <= j < hi and j <= cap (a row beyond sq sees none).
struct RowKeys {
  int lo, hi, cap;
};
__device__ __forceinline__ RowKeys row_keys(const FwdParams& p, const int* key_lo, const int* key_hi, int row) {
  if (row >= p.sq) return {1, 0, -1};
  return {key_lo ? key_lo[row] : 0, key_hi ? min(p.sk, key_hi[row]) : p.sk,
          p.causal ? row + p.causal_offset : INT_MAX};
}

// Scores of the keys n0 + column that a row may not see become -inf.
template <int J>
__device__ __forceinline__ void mask_scores(float (&s)[J][4], int n0, int t, const RowKeys (&rows)[2]) {
#pragma unroll
  for (int j = 0; j < J; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const RowKeys& r = rows[e >> 1];
      const int key = n0 + j * 8 + 2 * t + (e & 1);
      if (key < r.lo || key >= r.hi || key > r.cap) s[j][e] = -INFINITY;
    }
}

// Online softmax of row i over the tile: its scores become exp2(scale_log2 * (s - max)) with the
// running max (raw scores) moved on, row_sum (this thread's share) rescaled and added to. Returns
// the factor that brings what was accumulated before to the new max.
template <int J>
__device__ __forceinline__ float softmax_row(float (&s)[J][4], int i, float& row_max, float& row_sum,
                                             float scale_log2) {
  float mx = row_max;
#pragma unroll
  for (int j = 0; j < J; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * i], s[j][2 * i + 1]));
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
  const float base = mx == -INFINITY ? 0.f : mx * scale_log2;
  const float alpha = exp2f(row_max * scale_log2 - base);
  row_max = mx;
  float sum = 0.f;
#pragma unroll
  for (int j = 0; j < J; ++j) {
    s[j][2 * i] = exp2f(fmaf(s[j][2 * i], scale_log2, -base));
    s[j][2 * i + 1] = exp2f(fmaf(s[j][2 * i + 1], scale_log2, -base));
    sum += s[j][2 * i] + s[j][2 * i + 1];
  }
  row_sum = row_sum * alpha + sum;
  return alpha;
}

// Columns 16 kk .. 16 kk + 15 of the probabilities as the A fragment of the next product (bf16).
template <int J>
__device__ __forceinline__ void p_fragment(const float (&s)[J][4], int kk, uint32_t (&a)[4]) {
  a[0] = pack_bf16(s[2 * kk][0], s[2 * kk][1]);
  a[1] = pack_bf16(s[2 * kk][2], s[2 * kk][3]);
  a[2] = pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]);
  a[3] = pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
}

// The end of a row: returns 1 / sum (0 for a row that saw no key) and sets lse = log(sum exp S)
// (natural log; -inf for a row that saw no key).
__device__ __forceinline__ float finish_row(float row_sum, float row_max, float scale_log2, float& lse) {
  float l = row_sum;
  l += __shfl_xor_sync(0xffffffffu, l, 1);
  l += __shfl_xor_sync(0xffffffffu, l, 2);
  lse = l > 0.f ? (row_max * scale_log2 + __log2f(l)) * kLn2 : -INFINITY;
  return l > 0.f ? 1.f / l : 0.f;
}

// ---- The backward's per-key pieces, shared by both kernels. A thread holds two keys of a transposed
// score tile S^T (keys x queries) in the mma / wgmma accumulator layout: st[j][e] is key e / 2 (its
// rows g and g + 8), query column 8 j + 2 t + e % 2.

// sum_d out * dout of one row of D elements, by a warp (D / 32 a lane); every lane gets the sum.
template <int D>
__device__ __forceinline__ float row_dot(const bf16* out, const bf16* dout, int lane) {
  constexpr int PER = D / 32;  // 2 or 4 elements a lane
  const Pack<bf16, PER> a = load_pack<bf16, PER>(out + lane * PER), c = load_pack<bf16, PER>(dout + lane * PER);
  float acc = 0.f;
#pragma unroll
  for (int k = 0; k < PER; ++k) acc += to_float(a.v[k]) * to_float(c.v[k]);
  return warp_sum(acc);
}

// The tiles of BM queries that some key n0 <= j <= n_last may see: `count` tiles from query `start`.
struct QueryTiles {
  int start, count;
};
template <int BM>
__device__ __forceinline__ QueryTiles query_tiles(const BwdParams& p, const int* query_lo, const int* query_hi,
                                                  int n0, int n_last) {
  int begin = p.causal ? max(0, n0 - p.causal_offset) : 0;
  if (query_lo) begin = max(begin, query_lo[n0]);
  const int end = query_hi ? min(p.sq, query_hi[n_last]) : p.sq;
  const int start = max(0, begin) / BM * BM;
  return {start, end > start ? (end - start + BM - 1) / BM : 0};
}

// The queries that may see a key: lo <= i < hi and i >= cap (a key beyond sk is seen by none).
struct KeyQueries {
  int lo, hi, cap;
};
__device__ __forceinline__ KeyQueries key_queries(const BwdParams& p, const int* query_lo, const int* query_hi,
                                                  int key) {
  if (key >= p.sk) return {1, 0, INT_MAX};
  return {query_lo ? query_lo[key] : 0, query_hi ? min(p.sq, query_hi[key]) : p.sq,
          p.causal ? key - p.causal_offset : INT_MIN};
}

// The tile of queries m0 + column: st (S^T) becomes P^T = exp2(scale_log2 S^T - lse_log2), 0 where
// a query may not see the key unless the whole tile is visible (`full`), and dpt (dP^T) becomes
// dS^T = P^T (dP^T - delta). lse_log2 (lse * log2(e); +inf for a query that sees nothing, so that
// its P is 0) and delta: the tile's per-query values in shared memory.
template <int J>
__device__ __forceinline__ void probs_and_dscores(float (&st)[J][4], float (&dpt)[J][4], const float* lse_log2,
                                                  const float* delta, int m0, int t, const KeyQueries (&keys)[2],
                                                  bool full, float scale_log2) {
#pragma unroll
  for (int j = 0; j < J; ++j) {
    const int c = j * 8 + 2 * t;
    const float2 l2 = *reinterpret_cast<const float2*>(lse_log2 + c);
    const float2 d2 = *reinterpret_cast<const float2*>(delta + c);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float lq = (e & 1) ? l2.y : l2.x, dq = (e & 1) ? d2.y : d2.x;
      float pv = exp2f(fmaf(st[j][e], scale_log2, -lq));
      if (!full) {
        const KeyQueries& kq = keys[e >> 1];
        const int q = m0 + c + (e & 1);
        if (q < kq.lo || q >= kq.hi || q < kq.cap) pv = 0.f;
      }
      st[j][e] = pv;
      dpt[j][e] = pv * (dpt[j][e] - dq);
    }
  }
}

// dK (times scale) and dV of a thread's two keys `key` and `key + 8` (accumulator rows g and g + 8;
// keys beyond sk are skipped) of query head h / kv head hk: fp32 partials of h when p.partial, else
// bf16 of hk.
template <int D>
__device__ __forceinline__ void store_dk_dv(const BwdParams& p, const float (&dk)[D / 8][4], const float (&dv)[D / 8][4],
                                            int b, int h, int hk, int key, int t) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int row = key + 8 * i;
    if (row >= p.sk) continue;
    if (p.partial) {
      float* dkp = static_cast<float*>(p.dk) + b * p.dk_sb + row * p.dk_ss + h * p.dk_sh + 2 * t;
      float* dvp = static_cast<float*>(p.dv) + b * p.dk_sb + row * p.dk_ss + h * p.dk_sh + 2 * t;
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        *reinterpret_cast<float2*>(dkp + j * 8) = make_float2(dk[j][2 * i] * p.scale, dk[j][2 * i + 1] * p.scale);
        *reinterpret_cast<float2*>(dvp + j * 8) = make_float2(dv[j][2 * i], dv[j][2 * i + 1]);
      }
    } else {
      bf16* dkp = static_cast<bf16*>(p.dk) + b * p.dk_sb + row * p.dk_ss + hk * p.dk_sh + 2 * t;
      bf16* dvp = static_cast<bf16*>(p.dv) + b * p.dk_sb + row * p.dk_ss + hk * p.dk_sh + 2 * t;
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        *reinterpret_cast<uint32_t*>(dkp + j * 8) = pack_bf16(dk[j][2 * i] * p.scale, dk[j][2 * i + 1] * p.scale);
        *reinterpret_cast<uint32_t*>(dvp + j * 8) = pack_bf16(dv[j][2 * i], dv[j][2 * i + 1]);
      }
    }
  }
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
