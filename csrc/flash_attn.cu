// GQA flash attention, forward and backward, bf16 storage with fp32 accumulation.
//
//   forward:  S = scale * Q K^T (masked: causal and / or packed documents), P = softmax(S),
//             O = P V, lse = log(sum exp S) per query row (fp32 [b, hq, sq]).
//   backward: with delta = rowsum(dO * O) (minus the lse gradient when the caller's lse has one),
//             P = exp(S - lse), dV = P^T dO, dP = dO V^T, dS = P * (dP - delta),
//             dQ = scale * dS K, dK = scale * dS^T Q.
//
// Design (FA2 style, tensor cores through mma.sync m16n8k16 and ldmatrix):
// - forward: one block of 8 warps per (query head, 128-query tile, batch row); each warp owns 16
//   query rows, keeps its Q fragments, the O accumulator and the running max / sum in registers
//   and walks 64-key tiles of K and V, double buffered in shared memory by cp.async. Only the key
//   tiles some row of the block can see are visited; the mask is evaluated only on tiles that
//   straddle a boundary (the causal diagonal, a document edge, the sequence end).
// - backward: one block of 4 warps per (query head, 64-key tile, batch row); K and V stay in
//   shared memory, each warp owns 16 keys and accumulates their dK and dV in registers while the
//   block walks the 64-query tiles that can see its keys (Q, dO, lse and delta double buffered).
//   dS goes through shared memory so that each warp then adds the dQ of 16 queries with fp32
//   atomics. With several query heads per kv head the block writes fp32 dK / dV partials per
//   query head that the host sums over the group (no atomics: the result is reproducible).
// - K / V are read once per kv head by index (h / group): repeated K / V are never materialised.
// - strided [b, s, heads, d] inputs: any batch / sequence / head strides that keep rows 16-byte
//   aligned; the host copies other layouts.
// - packed documents: per query the range of keys of its document, [key_lo, key_hi), and per key
//   the range of queries of its document, [query_lo, query_hi) (the host derives both from
//   document ids; for self-attention both are the document bounds of the token). Documents are
//   packed in order, so the ranges are non-decreasing: the first and last row of a tile bound the
//   tiles it must visit.

#include "flash_attn.cuh"

#include <cfloat>
#include <climits>

namespace {

using namespace mq2;
using namespace mq2::fa;

// ---------------------------------------------------------------------------------------------
// Forward

constexpr int kFwdBM = 128, kFwdBN = 64, kFwdThreads = 256;

template <int D>
constexpr int fwd_smem_bytes() {
  return (kFwdBM * D + 4 * kFwdBN * D) * 2;
}

template <int D>
__global__ void __launch_bounds__(kFwdThreads, 1) flash_fwd_kernel(const FwdParams p) {
  constexpr int BM = kFwdBM, BN = kFwdBN, NT = kFwdThreads;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  bf16* sQ = reinterpret_cast<bf16*>(smem_raw);
  bf16* sK = sQ + BM * D;       // 2 buffers of BN x D
  bf16* sV = sK + 2 * BN * D;   // 2 buffers of BN x D

  const int h = blockIdx.x, b = blockIdx.z;
  const int m0 = (gridDim.y - 1 - blockIdx.y) * BM;  // longest causal tiles first
  const int hk = h / (p.hq / p.hkv);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int m_last = min(m0 + BM, p.sq) - 1;
  const int* ds = p.key_lo ? p.key_lo + (int64_t)b * p.sq : nullptr;
  const int* de = p.key_hi ? p.key_hi + (int64_t)b * p.sq : nullptr;

  // Keys any row of the tile may see, and the bounds under which a whole key tile is visible.
  int n_lo = ds ? ds[m0] : 0;
  int n_hi = de ? min(p.sk, de[m_last]) : p.sk;
  if (p.causal) n_hi = min(n_hi, m_last + p.causal_offset + 1);
  const int lo_max = ds ? ds[m_last] : 0;
  const int hi_min = de ? min(p.sk, de[m0]) : p.sk;

  // Visible keys of this thread's two rows.
  const RowKeys rows[2] = {row_keys(p, ds, de, m0 + warp * 16 + g), row_keys(p, ds, de, m0 + warp * 16 + g + 8)};

  const bf16* qb = p.q + b * p.q_sb + h * p.q_sh;
  const bf16* kb = p.k + b * p.k_sb + hk * p.k_sh;
  const bf16* vb = p.v + b * p.v_sb + hk * p.v_sh;

  const int n_start = max(0, n_lo) / BN * BN;
  const int ntiles = n_hi > n_start ? (n_hi - n_start + BN - 1) / BN : 0;

  load_tile<BM, D, NT>(sQ, qb, p.q_ss, m0, p.sq, tid);
  if (ntiles > 0) {
    load_tile<BN, D, NT>(sK, kb, p.k_ss, n_start, p.sk, tid);
    load_tile<BN, D, NT>(sV, vb, p.v_ss, n_start, p.sk, tid);
  }
  cp_async_commit();

  float acc[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
  uint32_t qf[D / 16][4];

  for (int it = 0; it < ntiles; ++it) {
    cp_async_wait<0>();
    __syncthreads();
    if (it == 0) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk)
        ldsm_x4(qf[kk], smem_u32(sQ + swz<D>(warp * 16 + (lane & 15), kk * 16 + (lane >> 4) * 8)));
    }
    if (it + 1 < ntiles) {
      const int nn0 = n_start + (it + 1) * BN, buf = (it + 1) & 1;
      load_tile<BN, D, NT>(sK + buf * BN * D, kb, p.k_ss, nn0, p.sk, tid);
      load_tile<BN, D, NT>(sV + buf * BN * D, vb, p.v_ss, nn0, p.sk, tid);
    }
    cp_async_commit();
    const bf16* cK = sK + (it & 1) * BN * D;
    const bf16* cV = sV + (it & 1) * BN * D;
    const int n0 = n_start + it * BN;

    float s[BN / 8][4];
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int nn = 0; nn < BN / 16; ++nn) {
        uint32_t bfr[4];
        ldsm_x4(bfr, smem_u32(cK + swz<D>(nn * 16 + (lane & 7) + ((lane >> 4) << 3), kk * 16 + ((lane >> 3) & 1) * 8)));
        mma16816(s[2 * nn], qf[kk], bfr[0], bfr[1]);
        mma16816(s[2 * nn + 1], qf[kk], bfr[2], bfr[3]);
      }
    }

    const bool full = n0 >= lo_max && n0 + BN <= hi_min && (!p.causal || n0 + BN - 1 <= m0 + p.causal_offset);
    if (!full) mask_scores(s, n0, t, rows);

    // Online softmax over the tile; each quad of lanes shares a row.
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const float alpha = softmax_row(s, i, row_max[i], row_sum[i], p.scale_log2);
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        acc[j][2 * i] *= alpha;
        acc[j][2 * i + 1] *= alpha;
      }
    }

    // O += P V: P's accumulator layout is the A-fragment layout of the next product.
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t a[4];
      p_fragment(s, kk, a);
#pragma unroll
      for (int dn = 0; dn < D / 16; ++dn) {
        uint32_t bfr[4];
        ldsm_x4_t(bfr, smem_u32(cV + swz<D>(kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, dn * 16 + (lane >> 4) * 8)));
        mma16816(acc[2 * dn], a, bfr[0], bfr[1]);
        mma16816(acc[2 * dn + 1], a, bfr[2], bfr[3]);
      }
    }
  }
  cp_async_wait<0>();

  // Normalise, write lse, stage the warp's 16 rows of O in its own rows of sQ, store 16 bytes a lane.
  float* lse_row = p.lse + ((int64_t)b * p.hq + h) * p.sq;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float lse;
    const float inv = finish_row(row_sum[i], row_max[i], p.scale_log2, lse);
    const int row = m0 + warp * 16 + g + 8 * i;
    if (t == 0 && row < p.sq) lse_row[row] = lse;
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      const int r = warp * 16 + g + 8 * i, c = j * 8 + 2 * t;
      *reinterpret_cast<uint32_t*>(sQ + swz<D>(r, c)) = pack_bf16(acc[j][2 * i] * inv, acc[j][2 * i + 1] * inv);
    }
  }
  __syncwarp();
  bf16* ob = p.o + b * p.o_sb + h * p.o_sh;
#pragma unroll
  for (int c = lane; c < 16 * D / 8; c += 32) {
    const int r = c / (D / 8), ch = c % (D / 8), row = m0 + warp * 16 + r;
    if (row < p.sq)
      *reinterpret_cast<uint4*>(ob + row * p.o_ss + ch * 8) =
          *reinterpret_cast<const uint4*>(sQ + swz<D>(warp * 16 + r, ch * 8));
  }
}

// ---------------------------------------------------------------------------------------------
// Backward

constexpr int kBwdBM = 64, kBwdBN = 64, kBwdThreads = 128;

template <int D>
constexpr int bwd_smem_bytes() {
  return (2 * kBwdBN * D + 4 * kBwdBM * D + kBwdBN * kBwdBM) * 2 + 4 * kBwdBM * 4;
}

// delta[b, h, i] = sum_d dout * out (fp32), one warp per (b, i, h) row.
template <int D>
__global__ void flash_bwd_delta_kernel(const bf16* __restrict__ out, const bf16* __restrict__ dout,
                                       const float* __restrict__ dlse, float* __restrict__ delta, int64_t o_sb,
                                       int64_t o_ss, int64_t o_sh, int64_t d_sb, int64_t d_ss, int64_t d_sh, int b,
                                       int s, int hq) {
  const int64_t row = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (row >= (int64_t)b * s * hq) return;
  const int h = row % hq;
  const int i = (row / hq) % s;
  const int bi = row / ((int64_t)hq * s);
  const float acc = row_dot<D>(out + bi * o_sb + i * o_ss + h * o_sh, dout + bi * d_sb + i * d_ss + h * d_sh, lane);
  if (lane == 0) {
    const int64_t idx = ((int64_t)bi * hq + h) * s + i;
    delta[idx] = dlse ? acc - dlse[idx] : acc;
  }
}

template <int D>
__global__ void __launch_bounds__(kBwdThreads, 2) flash_bwd_kernel(const BwdParams p) {
  constexpr int BM = kBwdBM, BN = kBwdBN, NT = kBwdThreads;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  bf16* sK = reinterpret_cast<bf16*>(smem_raw);  // BN x D
  bf16* sV = sK + BN * D;                        // BN x D
  bf16* sQ = sV + BN * D;                        // 2 buffers of BM x D
  bf16* sdO = sQ + 2 * BM * D;                   // 2 buffers of BM x D
  bf16* sdS = sdO + 2 * BM * D;                  // BN x BM (keys x queries)
  float* sL = reinterpret_cast<float*>(sdS + BN * BM);  // 2 buffers of BM: lse * log2(e)
  float* sD = sL + 2 * BM;                               // 2 buffers of BM: delta

  const int h = blockIdx.x, b = blockIdx.z;
  const int n0 = blockIdx.y * BN;
  const int hk = h / (p.hq / p.hkv);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int n_last = min(n0 + BN, p.sk) - 1;
  const int* ds = p.query_lo ? p.query_lo + (int64_t)b * p.sk : nullptr;
  const int* de = p.query_hi ? p.query_hi + (int64_t)b * p.sk : nullptr;

  // Queries that see some key of the tile, and the bounds under which a query tile sees all keys.
  const QueryTiles tiles = query_tiles<BM>(p, ds, de, n0, n_last);
  const int q_lo_max = ds ? ds[n_last] : 0;
  const int q_hi_min = de ? min(p.sq, de[n0]) : p.sq;

  // This thread's two keys and the queries that may see them.
  const KeyQueries keys[2] = {key_queries(p, ds, de, n0 + warp * 16 + g), key_queries(p, ds, de, n0 + warp * 16 + g + 8)};

  const bf16* qb = p.q + b * p.q_sb + h * p.q_sh;
  const bf16* dob = p.dout + b * p.do_sb + h * p.do_sh;
  const bf16* kb = p.k + b * p.k_sb + hk * p.k_sh;
  const bf16* vb = p.v + b * p.v_sb + hk * p.v_sh;
  const float* lse_row = p.lse + ((int64_t)b * p.hq + h) * p.sq;
  const float* delta_row = p.delta + ((int64_t)b * p.hq + h) * p.sq;

  const int m_start = tiles.start, mtiles = tiles.count;

  auto load_rows = [&](int m, int buf) {
    load_tile<BM, D, NT>(sQ + buf * BM * D, qb, p.q_ss, m, p.sq, tid);
    load_tile<BM, D, NT>(sdO + buf * BM * D, dob, p.do_ss, m, p.sq, tid);
    for (int r = tid; r < BM; r += NT) {
      const int row = m + r;
      float l = row < p.sq ? lse_row[row] : INFINITY;
      if (l == -INFINITY) l = INFINITY;  // a row that sees nothing: P = 0
      sL[buf * BM + r] = l * kLog2e;
      sD[buf * BM + r] = row < p.sq ? delta_row[row] : 0.f;
    }
  };

  load_tile<BN, D, NT>(sK, kb, p.k_ss, n0, p.sk, tid);
  load_tile<BN, D, NT>(sV, vb, p.v_ss, n0, p.sk, tid);
  if (mtiles > 0) load_rows(m_start, 0);
  cp_async_commit();

  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[j][e] = dv[j][e] = 0.f;

  const int krow = warp * 16 + (lane & 15), kcol = (lane >> 4) * 8;  // A fragments of this warp's keys

  for (int it = 0; it < mtiles; ++it) {
    cp_async_wait<0>();
    __syncthreads();
    if (it + 1 < mtiles) load_rows(m_start + (it + 1) * BM, (it + 1) & 1);
    cp_async_commit();
    const int m0 = m_start + it * BM, buf = it & 1;
    const bf16* cQ = sQ + buf * BM * D;
    const bf16* cdO = sdO + buf * BM * D;
    const float* cL = sL + buf * BM;
    const float* cD = sD + buf * BM;

    // S^T = K Q^T and dP^T = V dO^T: this warp's 16 keys x BM queries.
    float st[BM / 8][4], dpt[BM / 8][4];
#pragma unroll
    for (int j = 0; j < BM / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) st[j][e] = dpt[j][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t ak[4], av[4];
      ldsm_x4(ak, smem_u32(sK + swz<D>(krow, kk * 16 + kcol)));
      ldsm_x4(av, smem_u32(sV + swz<D>(krow, kk * 16 + kcol)));
#pragma unroll
      for (int nn = 0; nn < BM / 16; ++nn) {
        const int r = nn * 16 + (lane & 7) + ((lane >> 4) << 3), c = kk * 16 + ((lane >> 3) & 1) * 8;
        uint32_t bq[4], bo[4];
        ldsm_x4(bq, smem_u32(cQ + swz<D>(r, c)));
        ldsm_x4(bo, smem_u32(cdO + swz<D>(r, c)));
        mma16816(st[2 * nn], ak, bq[0], bq[1]);
        mma16816(st[2 * nn + 1], ak, bq[2], bq[3]);
        mma16816(dpt[2 * nn], av, bo[0], bo[1]);
        mma16816(dpt[2 * nn + 1], av, bo[2], bo[3]);
      }
    }

    const bool full = m0 >= q_lo_max && m0 + BM <= q_hi_min && n0 + BN <= p.sk &&
                      (!p.causal || m0 >= n0 + BN - 1 - p.causal_offset);
    // P^T = exp(S^T - lse), dS^T = P^T (dP^T - delta).
    probs_and_dscores(st, dpt, cL, cD, m0, t, keys, full, p.scale_log2);

    // dV += P^T dO and dK += dS^T Q (B operands: dO and Q transposed out of shared memory).
#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk) {
      uint32_t ap[4], as[4];
      ap[0] = pack_bf16(st[2 * kk][0], st[2 * kk][1]);
      ap[1] = pack_bf16(st[2 * kk][2], st[2 * kk][3]);
      ap[2] = pack_bf16(st[2 * kk + 1][0], st[2 * kk + 1][1]);
      ap[3] = pack_bf16(st[2 * kk + 1][2], st[2 * kk + 1][3]);
      as[0] = pack_bf16(dpt[2 * kk][0], dpt[2 * kk][1]);
      as[1] = pack_bf16(dpt[2 * kk][2], dpt[2 * kk][3]);
      as[2] = pack_bf16(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]);
      as[3] = pack_bf16(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3]);
      // dS^T to shared memory for the dQ product (rows: this warp's keys; columns: queries).
      const int kr = warp * 16 + g;
      *reinterpret_cast<uint32_t*>(sdS + swz<BM>(kr, kk * 16 + 2 * t)) = as[0];
      *reinterpret_cast<uint32_t*>(sdS + swz<BM>(kr + 8, kk * 16 + 2 * t)) = as[1];
      *reinterpret_cast<uint32_t*>(sdS + swz<BM>(kr, kk * 16 + 8 + 2 * t)) = as[2];
      *reinterpret_cast<uint32_t*>(sdS + swz<BM>(kr + 8, kk * 16 + 8 + 2 * t)) = as[3];
#pragma unroll
      for (int dn = 0; dn < D / 16; ++dn) {
        const int r = kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, c = dn * 16 + (lane >> 4) * 8;
        uint32_t bo[4], bq[4];
        ldsm_x4_t(bo, smem_u32(cdO + swz<D>(r, c)));
        ldsm_x4_t(bq, smem_u32(cQ + swz<D>(r, c)));
        mma16816(dv[2 * dn], ap, bo[0], bo[1]);
        mma16816(dv[2 * dn + 1], ap, bo[2], bo[3]);
        mma16816(dk[2 * dn], as, bq[0], bq[1]);
        mma16816(dk[2 * dn + 1], as, bq[2], bq[3]);
      }
    }
    __syncthreads();

    // dQ (unscaled) += dS K: warp w takes queries [16w, 16w + 16) of the tile, 64 columns at a time.
    float* dq_base = p.dq_acc + ((int64_t)b * p.sq * p.hq + h) * D;
#pragma unroll
    for (int half = 0; half < D / 64; ++half) {
      float dq[8][4];
#pragma unroll
      for (int j = 0; j < 8; ++j) dq[j][0] = dq[j][1] = dq[j][2] = dq[j][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        uint32_t a[4];
        ldsm_x4_t(a, smem_u32(sdS + swz<BM>(kk * 16 + (lane & 7) + (lane >> 4) * 8, warp * 16 + ((lane >> 3) & 1) * 8)));
#pragma unroll
        for (int dn = 0; dn < 4; ++dn) {
          uint32_t bk[4];
          ldsm_x4_t(bk, smem_u32(sK + swz<D>(kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8,
                                             half * 64 + dn * 16 + (lane >> 4) * 8)));
          mma16816(dq[2 * dn], a, bk[0], bk[1]);
          mma16816(dq[2 * dn + 1], a, bk[2], bk[3]);
        }
      }
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int q = m0 + warp * 16 + g + 8 * i;
        if (q < p.sq) {
          float* dst = dq_base + (int64_t)q * p.hq * D + half * 64 + 2 * t;
#pragma unroll
          for (int j = 0; j < 8; ++j) atomicAdd(reinterpret_cast<float2*>(dst + j * 8), make_float2(dq[j][2 * i], dq[j][2 * i + 1]));
        }
      }
    }
  }

  // dK (scaled) and dV of this warp's 16 keys.
  store_dk_dv<D>(p, dk, dv, b, h, hk, n0 + warp * 16 + g, t);
}

}  // namespace

namespace {

template <typename T>
const T* cptr(const at::Tensor& t) {
  return static_cast<const T*>(t.data_ptr());
}
const int* opt_int(const c10::optional<at::Tensor>& t) { return t ? t->data_ptr<int>() : nullptr; }

}  // namespace

FwdParams mq2::fa::make_fwd_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                                   at::Tensor& lse, const c10::optional<at::Tensor>& key_lo,
                                   const c10::optional<at::Tensor>& key_hi, bool causal, double scale) {
  FwdParams p{};
  p.q = cptr<bf16>(q);
  p.k = cptr<bf16>(k);
  p.v = cptr<bf16>(v);
  p.o = static_cast<bf16*>(out.data_ptr());
  p.lse = lse.data_ptr<float>();
  p.q_sb = q.stride(0), p.q_ss = q.stride(1), p.q_sh = q.stride(2);
  p.k_sb = k.stride(0), p.k_ss = k.stride(1), p.k_sh = k.stride(2);
  p.v_sb = v.stride(0), p.v_ss = v.stride(1), p.v_sh = v.stride(2);
  p.o_sb = out.stride(0), p.o_ss = out.stride(1), p.o_sh = out.stride(2);
  p.key_lo = opt_int(key_lo);
  p.key_hi = opt_int(key_hi);
  p.b = q.size(0), p.sq = q.size(1), p.hq = q.size(2), p.sk = k.size(1), p.hkv = k.size(2);
  p.causal = causal;
  p.causal_offset = p.sk - p.sq;
  p.scale_log2 = static_cast<float>(scale) * kLog2e;
  return p;
}

BwdParams mq2::fa::make_bwd_params(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                   const at::Tensor& v, at::Tensor& dq_acc, at::Tensor& dk, at::Tensor& dv,
                                   const c10::optional<at::Tensor>& query_lo,
                                   const c10::optional<at::Tensor>& query_hi, bool causal, double scale,
                                   bool partial) {
  TORCH_CHECK(dk.strides() == dv.strides(), "flash attention backward: dk and dv must share one layout");
  BwdParams p{};
  p.q = cptr<bf16>(q);
  p.k = cptr<bf16>(k);
  p.v = cptr<bf16>(v);
  p.dout = cptr<bf16>(dout);
  p.dq_acc = dq_acc.data_ptr<float>();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.q_sb = q.stride(0), p.q_ss = q.stride(1), p.q_sh = q.stride(2);
  p.k_sb = k.stride(0), p.k_ss = k.stride(1), p.k_sh = k.stride(2);
  p.v_sb = v.stride(0), p.v_ss = v.stride(1), p.v_sh = v.stride(2);
  p.do_sb = dout.stride(0), p.do_ss = dout.stride(1), p.do_sh = dout.stride(2);
  p.dk_sb = dk.stride(0), p.dk_ss = dk.stride(1), p.dk_sh = dk.stride(2);
  p.query_lo = opt_int(query_lo);
  p.query_hi = opt_int(query_hi);
  p.b = q.size(0), p.sq = q.size(1), p.hq = q.size(2), p.sk = k.size(1), p.hkv = k.size(2);
  p.causal = causal;
  p.causal_offset = p.sk - p.sq;
  p.partial = partial;
  p.scale = static_cast<float>(scale);
  p.scale_log2 = static_cast<float>(scale) * kLog2e;
  return p;
}

// Validated by bindings.cpp: bf16 CUDA tensors q [b, sq, hq, d], k / v [b, sk, hkv, d] with a
// contiguous last dimension and 16-byte aligned rows; out like q; lse fp32 [b, hq, sq] contiguous;
// key_lo / key_hi int32 [b, sq] contiguous or both absent.
void flash_attn_forward_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                             at::Tensor& lse, const c10::optional<at::Tensor>& key_lo,
                             const c10::optional<at::Tensor>& key_hi, bool causal, double scale) {
  const c10::cuda::CUDAGuard guard(q.device());
  const FwdParams p = make_fwd_params(q, k, v, out, lse, key_lo, key_hi, causal, scale);
  auto stream = current_stream();
  with_head_dim(q.size(3), [&](auto dc) {
    constexpr int D = decltype(dc)::value;
    constexpr int smem = fwd_smem_bytes<D>();
    auto kernel = flash_fwd_kernel<D>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    const dim3 grid(p.hq, (p.sq + kFwdBM - 1) / kFwdBM, p.b);
    kernel<<<grid, kFwdThreads, smem, stream>>>(p);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// out / dout: [b, s, hq, d] with 16-byte aligned rows; dlse (optional) and delta fp32 [b, hq, s] contiguous.
void flash_attn_delta_cuda(const at::Tensor& out, const at::Tensor& dout, const c10::optional<at::Tensor>& dlse,
                           at::Tensor& delta) {
  const c10::cuda::CUDAGuard guard(out.device());
  auto stream = current_stream();
  const int b = out.size(0), s = out.size(1), hq = out.size(2);
  const int64_t rows = (int64_t)b * s * hq;
  if (rows == 0) return;
  with_head_dim(out.size(3), [&](auto dc) {
    constexpr int D = decltype(dc)::value;
    const int grid = static_cast<int>((rows + 7) / 8);
    flash_bwd_delta_kernel<D><<<grid, 256, 0, stream>>>(
        cptr<bf16>(out), cptr<bf16>(dout), dlse ? dlse->data_ptr<float>() : nullptr, delta.data_ptr<float>(),
        out.stride(0), out.stride(1), out.stride(2), dout.stride(0), dout.stride(1), dout.stride(2), b, s, hq);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// dout like q; lse, delta fp32 [b, hq, sq]; dq_acc fp32 [b, sq, hq, d] contiguous and zeroed.
// partial: dk / dv are fp32 [b, sk, hq, d] (one slice per query head), else bf16 [b, sk, hkv, d].
// query_lo / query_hi int32 [b, sk] contiguous or both absent.
void flash_attn_backward_cuda(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& lse, const at::Tensor& delta, at::Tensor& dq_acc, at::Tensor& dk,
                              at::Tensor& dv, const c10::optional<at::Tensor>& query_lo,
                              const c10::optional<at::Tensor>& query_hi, bool causal, double scale, bool partial) {
  const c10::cuda::CUDAGuard guard(q.device());
  BwdParams p = make_bwd_params(dout, q, k, v, dq_acc, dk, dv, query_lo, query_hi, causal, scale, partial);
  p.lse = lse.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  auto stream = current_stream();
  with_head_dim(q.size(3), [&](auto dc) {
    constexpr int D = decltype(dc)::value;
    constexpr int smem = bwd_smem_bytes<D>();
    auto kernel = flash_bwd_kernel<D>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    const dim3 grid(p.hq, (p.sk + kBwdBN - 1) / kBwdBN, p.b);
    kernel<<<grid, kBwdThreads, smem, stream>>>(p);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
