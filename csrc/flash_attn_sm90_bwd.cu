// GQA flash-attention backward for Hopper (sm_90a) in the FlashAttention-3 manner: TMA copies,
// warpgroup MMA and warp specialisation. Same contract and results as the backward of flash_attn.cu
// (read its header and BwdParams): K / V read once per kv head by index, causal masks aligned
// bottom-right, packed documents as per-key query ranges [query_lo, query_hi) visiting only the
// query tiles that can see some key of the block and masking only the tiles that straddle a
// boundary, strided [b, s, heads, d] views read in place. dq_acc is the fp32 [b, sq, hq, d] sum of
// the unscaled dQ, accumulated with fp32 adds in L2 (TMA reduce-adds; as in flash_attn.cu, dQ is
// not bitwise reproducible); dK / dV are written once per key without atomics (bf16 of the kv head, or with
// several query heads per kv head fp32 partials per query head that the binding sums over the group
// in a fixed order: reproducible).
//
// Design:
// - preprocessing (one warp per query row): delta = rowsum(dO * O) (minus the lse gradient) and
//   lse * log2(e) (+inf for a row that sees no key, so that its P is 0) into [b, hq, rows] buffers,
//   rows = sq rounded up to the query tile (the padding is (+inf, 0): P = dS = 0), which the
//   producer copies with plain bulk copies.
// - one CTA of three warpgroups per (128-key block, query head, batch row), in groups of 8 key blocks
//   of one head side by side (they share Q / dO reads and dQ rows in L2), the groups of keys that see
//   the most causal queries first. Warpgroup 0 is the producer: it gives its registers away (setmaxnreg)
//   and one of its threads issues every copy: K and V of the block once, then per 64-query tile Q,
//   dO (TMA, rank-4 tensor maps [d, s, heads, b], 128-byte swizzle, 64 columns of d per box) and the
//   tile's lse / delta (bulk copies) into a ring of kStages stages (3 for d 64, 2 for d 128). A
//   "full" mbarrier per stage completes with the copies' bytes; every consumer thread frees a stage
//   by its own arrival on the stage's "empty" mbarrier (256 per phase), after a proxy fence, once
//   the products that read it are done: each thread's generic reads of lse / delta are ordered
//   before the producer's next bulk copy into the stage by that thread's own release.
// - warpgroups 1 and 2 are the consumers, each owning 64 keys of the block; they take the registers
//   (240 a thread) and keep the dK and dV accumulators of their keys in them across the query tiles.
//   Per tile, as wgmma from shared memory (both K-major): S^T = K Q^T and dP^T = V dO^T (64 keys x
//   64 queries); in registers P^T = exp(S^T - lse) and dS^T = P^T (dP^T - delta) (masked), which
//   packed to bf16 are the A fragments of dV += P^T dO and dK += dS^T Q (B: dO and Q as MN-major
//   operands). dS^T also goes to shared memory (keys x queries, 128-byte swizzle, double buffered)
//   for dQ = dS K with both operands MN-major (transposed): for d 128 after a barrier of both
//   consumers each computes 64 of the 128 columns over all 128 keys; for d 64 each computes all
//   columns over its own 64 keys (a barrier of its own warpgroup). Each consumer writes its dQ tile
//   to a shared buffer (64 x 64 fp32, two 128-byte swizzled boxes of 32 columns) and one of its
//   threads adds it to dq_acc with TMA reduce-adds (cp.reduce.async.bulk.tensor), which run while
//   the consumers go on to the next tile; before the buffer is written again that thread waits
//   until the adds have read it.
// - epilogue: dK (times the softmax scale) and dV from registers to global memory.
// Next steps not taken: overlap of one tile's dQ product with the next tile's S / dP (and the two
// consumers' products in turns), a deterministic dQ (per-block partials summed in order, or an
// ordered semaphore).

#include "flash_attn.cuh"
#include "sm90.cuh"

namespace {

using namespace mq2;
using namespace mq2::fa;
using namespace mq2::sm90;

constexpr int kBN = 128, kBM = 64, kThreads = 384;  // keys per CTA, queries per tile
constexpr int kKeyGroup = 8;  // key blocks of a head that run side by side (the grid's x)
constexpr int kProducerRegs = 24, kConsumerRegs = 240;          // 128 * 24 + 256 * 240 <= 64K registers
// named barriers: kBarDS (both consumers, d 128), kBarDS + 1 + cw (one, d 64), kBarDQ + cw (one)
constexpr int kBarDS = 1, kBarDQ = 4;

// Shared memory of one CTA (byte offsets from a 1024-byte aligned base; every 128-byte swizzle atom,
// 8 rows of 128 bytes, starts 1024-byte aligned). A tile of R rows x D columns is D / 64 boxes of
// R rows x 128 bytes, one after the other.
template <int D>
struct Smem {
  static constexpr int kStages = D == 64 ? 3 : 2;    // stages of the Q / dO ring (d 128 has room for 2)
  static constexpr int kChunks = D / 64;             // 64-column boxes along d
  static constexpr int kKVBox = kBN * 128;           // bytes of one box of K or V (128 key rows)
  static constexpr int kKV = kChunks * kKVBox;       // K or V of the block
  static constexpr int kQBox = kBM * 128;            // bytes of one box of Q or dO (64 query rows)
  static constexpr int kQ = kChunks * kQBox;         // one stage of Q or of dO
  static constexpr int kDS = kBN * kBM * 2;          // dS^T: 128 key rows of 64 queries (128 bytes)
  static constexpr int kDQBox = kBM * 128;          // 64 query rows x 32 fp32 columns of dQ
  static constexpr int kDQ = 2 * kDQBox;             // one consumer's 64 x 64 tile of dQ
  static constexpr int kRow = kBM * 4;               // one stage of lse or delta (fp32)
  static constexpr int k = 0;
  static constexpr int v = k + kKV;
  static constexpr int q = v + kKV;
  static constexpr int dout = q + kStages * kQ;
  static constexpr int ds = dout + kStages * kQ;     // 2 buffers
  static constexpr int dq = ds + 2 * kDS;            // 2 buffers, one per consumer
  static constexpr int lse = dq + 2 * kDQ;
  static constexpr int delta = lse + kStages * kRow;
  static constexpr int bars = delta + kStages * kRow;  // kv_full, full[], empty[]
  static constexpr int bytes = bars + 8 * (1 + 2 * kStages);
  static constexpr int launch_bytes = bytes + 1024;  // room to align the dynamic base
};

// lse_log2 / delta [b, hq, rows] (see the header) from lse [b, hq, sq], out / dout [b, sq, hq, d]
// views and the optional lse gradient dlse [b, hq, sq]; one warp per (b, i, h), i < rows.
template <int D>
__global__ void flash_bwd_sm90_prep_kernel(const bf16* __restrict__ out, const bf16* __restrict__ dout,
                                           const float* __restrict__ lse, const float* __restrict__ dlse,
                                           float* __restrict__ lse_log2, float* __restrict__ delta, int64_t o_sb,
                                           int64_t o_ss, int64_t o_sh, int64_t d_sb, int64_t d_ss, int64_t d_sh,
                                           int b, int s, int hq, int rows) {
  const int64_t row = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (row >= (int64_t)b * rows * hq) return;
  const int h = row % hq;
  const int i = (row / hq) % rows;
  const int bi = row / ((int64_t)hq * rows);
  const int64_t dst = ((int64_t)bi * hq + h) * rows + i;
  if (i >= s) {
    if (lane == 0) lse_log2[dst] = INFINITY, delta[dst] = 0.f;
    return;
  }
  const float acc = row_dot<D>(out + bi * o_sb + i * o_ss + h * o_sh, dout + bi * d_sb + i * d_ss + h * d_sh, lane);
  if (lane == 0) {
    const int64_t src = ((int64_t)bi * hq + h) * s + i;
    const float l = lse[src];
    lse_log2[dst] = l == -INFINITY ? INFINITY : l * kLog2e;
    delta[dst] = dlse ? acc - dlse[src] : acc;
  }
}

template <int D>
__global__ void __launch_bounds__(kThreads, 1)
    flash_bwd_sm90_kernel(const __grid_constant__ CUtensorMap tm_q, const __grid_constant__ CUtensorMap tm_do,
                          const __grid_constant__ CUtensorMap tm_k, const __grid_constant__ CUtensorMap tm_v,
                          const __grid_constant__ CUtensorMap tm_dq, const BwdParams p, const float* __restrict__ lse_log2, const float* __restrict__ delta,
                          int rows) {
#if MQ2_SM90A
  using L = Smem<D>;
  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t base = (raw + 1023u) & ~1023u;
  unsigned char* smem = smem_raw + (base - raw);
  const uint32_t sK = base + L::k, sV = base + L::v, sQ = base + L::q, sdO = base + L::dout, sdS = base + L::ds;
  const uint32_t bars = base + L::bars;
  const uint32_t kv_full = bars;
  auto full = [&](int s) { return bars + 8u * (1 + s); };
  auto empty = [&](int s) { return bars + 8u * (1 + L::kStages + s); };

  // kKeyGroup key blocks of a head run side by side: they read the same Q / dO tiles and add into the
  // same dQ rows, which then stay in L2. The groups go in key order, every head's first group before
  // any second one: causal, the first keys are seen by the most queries and go first.
  const int groups = (p.sk + kKeyGroup * kBN - 1) / (kKeyGroup * kBN);
  const int n0 = ((blockIdx.z % groups) * kKeyGroup + blockIdx.x) * kBN, h = blockIdx.y, b = blockIdx.z / groups;
  if (n0 >= p.sk) return;
  const int hk = h / (p.hq / p.hkv);
  const int n_last = min(n0 + kBN, p.sk) - 1;
  const int* ds = p.query_lo ? p.query_lo + (int64_t)b * p.sk : nullptr;
  const int* de = p.query_hi ? p.query_hi + (int64_t)b * p.sk : nullptr;

  // Queries that see some key of the block: the query tiles both roles walk.
  const QueryTiles tiles = query_tiles<kBM>(p, ds, de, n0, n_last);
  const int m_start = tiles.start, mtiles = tiles.count;

  const int wg = threadIdx.x / 128;
  if (threadIdx.x == 0) {
    mbar_init(kv_full, 1);
    for (int s = 0; s < L::kStages; ++s) {
      mbar_init(full(s), 1);
      mbar_init(empty(s), 256);  // one arrival per consumer thread (after its own reads of the stage)
    }
    mbar_init_fence();
  }
  __syncthreads();

  if (wg == 0) {
    // ---- producer
    setmaxnreg_dec<kProducerRegs>();
    if (threadIdx.x == 0 && mtiles > 0) {
      tma_prefetch_map(&tm_q);
      tma_prefetch_map(&tm_do);
      tma_prefetch_map(&tm_k);
      tma_prefetch_map(&tm_v);
      mbar_arrive_expect_tx(kv_full, 2 * L::kKV);
      for (int c = 0; c < L::kChunks; ++c) {
        tma_load_4d(sK + c * L::kKVBox, &tm_k, kv_full, c * 64, n0, hk, b);
        tma_load_4d(sV + c * L::kKVBox, &tm_v, kv_full, c * 64, n0, hk, b);
      }
      const float* lse_row = lse_log2 + ((int64_t)b * p.hq + h) * rows;
      const float* delta_row = delta + ((int64_t)b * p.hq + h) * rows;
      for (int it = 0; it < mtiles; ++it) {
        const int s = it % L::kStages;
        const uint32_t phase = (it / L::kStages) & 1;
        const int m0 = m_start + it * kBM;
        mbar_wait(empty(s), phase ^ 1);
        mbar_arrive_expect_tx(full(s), 2 * L::kQ + 2 * L::kRow);
        for (int c = 0; c < L::kChunks; ++c) {
          tma_load_4d(sQ + s * L::kQ + c * L::kQBox, &tm_q, full(s), c * 64, m0, h, b);
          tma_load_4d(sdO + s * L::kQ + c * L::kQBox, &tm_do, full(s), c * 64, m0, h, b);
        }
        bulk_load(base + L::lse + s * L::kRow, lse_row + m0, L::kRow, full(s));
        bulk_load(base + L::delta + s * L::kRow, delta_row + m0, L::kRow, full(s));
      }
    }
    return;
  }

  // ---- consumers
  setmaxnreg_inc<kConsumerRegs>();
  const int cw = wg - 1;  // keys n0 + 64 cw ..
  const int tid = threadIdx.x % 128, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int nw = n0 + 64 * cw;

  // This thread's two keys and the queries that may see them.
  const KeyQueries keys[2] = {key_queries(p, ds, de, nw + warp * 16 + g), key_queries(p, ds, de, nw + warp * 16 + g + 8)};
  // Bounds under which a query tile sees every key of this warpgroup.
  const int q_lo_max = ds ? ds[min(nw + 63, p.sk - 1)] : 0;
  const int q_hi_min = de ? min(p.sq, de[min(nw, p.sk - 1)]) : p.sq;
  const bool keys_in = nw + 64 <= p.sk;
  const int diag = nw + 63 - p.causal_offset;  // the first query that sees all 64 keys causally

  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[j][e] = dv[j][e] = 0.f;
  float st[kBM / 8][4], dpt[kBM / 8][4];  // S^T, dP^T, then P^T, dS^T
  uint32_t pf[kBM / 16][4], sf[kBM / 16][4];  // P^T and dS^T as bf16 A fragments
  float dq[8][4];                             // 64 queries x 64 columns of dQ

  const uint32_t k_rows = sK + cw * 64 * 128, v_rows = sV + cw * 64 * 128;  // this warpgroup's keys
  unsigned char* const ds_rows = smem + L::ds + cw * 64 * 128;
  const uint32_t dq_s = base + L::dq + cw * L::kDQ;  // this warpgroup's dQ tile
  unsigned char* const dq_w = smem + L::dq + cw * L::kDQ;
  const int dq_col = D == 128 ? 64 * cw : 0;

  if (mtiles > 0) mbar_wait(kv_full, 0);
  for (int it = 0; it < mtiles; ++it) {
    const int s = it % L::kStages;
    const uint32_t phase = (it / L::kStages) & 1;
    const int m0 = m_start + it * kBM;
    const uint32_t q_s = sQ + s * L::kQ, do_s = sdO + s * L::kQ, ds_buf = sdS + (it & 1) * L::kDS;
    mbar_wait(full(s), phase);

    // S^T = K Q^T and dP^T = V dO^T over the D / 16 reduction steps: step kk is box kk / 4, bytes
    // 32 (kk % 4) of each row.
    pin(st);
    pin(dpt);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint32_t off = (kk / 4) * L::kKVBox + (kk % 4) * 32, qoff = (kk / 4) * L::kQBox + (kk % 4) * 32;
      wgmma_m64n64k16_ss<0, 0>(st, smem_desc_sw128(k_rows + off, 16, 1024), smem_desc_sw128(q_s + qoff, 16, 1024),
                               kk > 0);
    }
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint32_t off = (kk / 4) * L::kKVBox + (kk % 4) * 32, qoff = (kk / 4) * L::kQBox + (kk % 4) * 32;
      wgmma_m64n64k16_ss<0, 0>(dpt, smem_desc_sw128(v_rows + off, 16, 1024), smem_desc_sw128(do_s + qoff, 16, 1024),
                               kk > 0);
    }
    wgmma_commit();
    wgmma_wait<0>();
    pin(st);
    pin(dpt);

    const bool full_tile = keys_in && m0 >= q_lo_max && m0 + kBM <= q_hi_min && (!p.causal || m0 >= diag);
    probs_and_dscores(st, dpt, reinterpret_cast<const float*>(smem + L::lse + s * L::kRow),
                      reinterpret_cast<const float*>(smem + L::delta + s * L::kRow), m0, t, keys, full_tile,
                      p.scale_log2);
#pragma unroll
    for (int kk = 0; kk < kBM / 16; ++kk) {
      p_fragment(st, kk, pf[kk]);
      p_fragment(dpt, kk, sf[kk]);
    }

    // dS^T to this warpgroup's rows of the buffer: A fragment kk holds query chunks 2 kk (a[0], a[1])
    // and 2 kk + 1 (a[2], a[3]) of rows g (a[0], a[2]) and g + 8; the swizzle puts chunk c of row r
    // at 16-byte slot c ^ (r % 8), and r % 8 == g.
    unsigned char* const ds_w = ds_rows + (it & 1) * L::kDS;
#pragma unroll
    for (int kk = 0; kk < kBM / 16; ++kk)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = warp * 16 + g + 8 * (e & 1), c = 2 * kk + (e >> 1);
        *reinterpret_cast<uint32_t*>(ds_w + r * 128 + ((c ^ g) << 4) + 4 * t) = sf[kk][e];
      }
    fence_proxy_async();

    // dV += P^T dO and dK += dS^T Q over the kBM / 16 query steps: step kk is rows 16 kk.. of every
    // box; the boxes (64 columns of d each) are L::kQBox apart.
    pin(pf);
    pin(sf);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBM / 16; ++kk) {
      const uint64_t bdo = smem_desc_sw128(do_s + kk * 16 * 128, L::kQBox, 1024);
      if constexpr (D == 128) wgmma_m64n128k16_rs<1>(dv, pf[kk], bdo);
      else wgmma_m64n64k16_rs<1>(dv, pf[kk], bdo);
    }
#pragma unroll
    for (int kk = 0; kk < kBM / 16; ++kk) {
      const uint64_t bq = smem_desc_sw128(q_s + kk * 16 * 128, L::kQBox, 1024);
      if constexpr (D == 128) wgmma_m64n128k16_rs<1>(dk, sf[kk], bq);
      else wgmma_m64n64k16_rs<1>(dk, sf[kk], bq);
    }
    wgmma_commit();

    // dQ = dS K, A = dS^T and B = K both MN-major (rows: keys): a 16-key step is 2048 bytes.
    if (tid == 0) tma_store_wait_read();  // the last tile's dQ add has read dq_s (ordered by the barrier)
    if constexpr (D == 128) {
      named_barrier_sync(kBarDS, 256);  // both halves of dS^T written
      pin(dq);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kBN / 16; ++kk)
        wgmma_m64n64k16_ss<1, 1>(dq, smem_desc_sw128(ds_buf + kk * 2048, L::kDS, 1024),
                                 smem_desc_sw128(sK + cw * L::kKVBox + kk * 2048, L::kKVBox, 1024), kk > 0);
    } else {
      named_barrier_sync(kBarDS + 1 + cw, 128);  // this warpgroup's dS^T written
      pin(dq);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
        wgmma_m64n64k16_ss<1, 1>(dq, smem_desc_sw128(ds_buf + (4 * cw + kk) * 2048, L::kDS, 1024),
                                 smem_desc_sw128(sK + (4 * cw + kk) * 2048, L::kKVBox, 1024), kk > 0);
    }
    wgmma_commit();

    wgmma_wait<1>();  // dV, dK done: the stage's Q, dO, lse and delta are no longer read
    pin(dk);
    pin(dv);
    fence_proxy_async();  // this thread's generic reads of lse / delta before the producer's next bulk copy
    mbar_arrive(empty(s));
    wgmma_wait<0>();
    pin(dq);

    // dQ to dq_s, two boxes of 32 columns (columns 8 j + 2 t, + 1 of rows g, g + 8 of the warp's 16;
    // the swizzle puts 16-byte chunk c of row r at slot c ^ (r % 8), r % 8 == g), then one thread
    // adds the tile to dq_acc with TMA reduce-adds (rows beyond sq dropped) and goes on.
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int r = warp * 16 + g + 8 * i, chunk = (j % 4) * 2 + t / 2;
        *reinterpret_cast<float2*>(dq_w + (j / 4) * L::kDQBox + r * 128 + ((chunk ^ g) << 4) + 8 * (t % 2)) =
            make_float2(dq[j][2 * i], dq[j][2 * i + 1]);
      }
    fence_proxy_async();
    named_barrier_sync(kBarDQ + cw, 128);
    if (tid == 0) {
      for (int c = 0; c < 2; ++c) tma_reduce_add_4d(&tm_dq, dq_s + c * L::kDQBox, dq_col + 32 * c, m0, h, b);
      tma_store_commit();
    }
  }
  if (tid == 0) tma_store_wait_all();

  store_dk_dv<D>(p, dk, dv, b, h, hk, nw + warp * 16 + g, t);
#else
  __trap();  // built without sm_90a: the launcher refuses other devices, so this is never reached
#endif
}

}  // namespace

// Validated by bindings.cpp as for flash_attn_backward_cuda: bf16 CUDA views q [b, sq, hq, d], k / v
// [b, sk, hkv, d], out / dout like q (contiguous last dimension, 16-byte aligned rows); lse fp32
// [b, hq, sq] contiguous, dlse likewise or absent; dq_acc fp32 [b, sq, hq, d] contiguous and zeroed;
// dk / dv bf16 [b, sk, hkv, d] or, with `partial`, fp32 [b, sk, hq, d] (one layout for both);
// query_lo / query_hi int32 [b, sk] or both absent. The device must be a Hopper GPU.
void flash_attn_backward_sm90_cuda(const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in,
                                   const at::Tensor& v_in, const at::Tensor& out, const at::Tensor& lse,
                                   const c10::optional<at::Tensor>& dlse, at::Tensor& dq_acc, at::Tensor& dk,
                                   at::Tensor& dv, const c10::optional<at::Tensor>& query_lo,
                                   const c10::optional<at::Tensor>& query_hi, bool causal, double scale,
                                   bool partial) {
  const c10::cuda::CUDAGuard guard(q_in.device());
  const char* op = "flash_attention_backward_sm90";
  require_hopper(q_in, op);
  const at::Tensor q = tma_readable(q_in), k = tma_readable(k_in), v = tma_readable(v_in),
                   dout = tma_readable(dout_in);
  const BwdParams p = make_bwd_params(dout, q, k, v, dq_acc, dk, dv, query_lo, query_hi, causal, scale, partial);
  const int rows = (p.sq + kBM - 1) / kBM * kBM;
  at::Tensor lse_log2 = lse.new_empty({p.b, p.hq, rows}), delta = lse.new_empty({p.b, p.hq, rows});
  const CUtensorMap tm_q = tile_map(q, kBM, op), tm_do = tile_map(dout, kBM, op), tm_k = tile_map(k, kBN, op),
                    tm_v = tile_map(v, kBN, op), tm_dq = tile_map(dq_acc, kBM, op);
  auto stream = current_stream();
  with_head_dim(q.size(3), [&](auto dc) {
    constexpr int D = decltype(dc)::value;
    const int64_t warps = (int64_t)p.b * rows * p.hq;
    flash_bwd_sm90_prep_kernel<D><<<static_cast<unsigned>((warps + 7) / 8), 256, 0, stream>>>(
        static_cast<const bf16*>(out.data_ptr()), p.dout, lse.data_ptr<float>(),
        dlse ? dlse->data_ptr<float>() : nullptr, lse_log2.data_ptr<float>(), delta.data_ptr<float>(),
        out.stride(0), out.stride(1), out.stride(2), p.do_sb, p.do_ss, p.do_sh, p.b, p.sq, p.hq, rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    constexpr int smem = Smem<D>::launch_bytes;
    auto kernel = flash_bwd_sm90_kernel<D>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    const dim3 grid(kKeyGroup, p.hq, (p.sk + kKeyGroup * kBN - 1) / (kKeyGroup * kBN) * p.b);
    kernel<<<grid, kThreads, smem, stream>>>(tm_q, tm_do, tm_k, tm_v, tm_dq, p, lse_log2.data_ptr<float>(),
                                             delta.data_ptr<float>(), rows);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
