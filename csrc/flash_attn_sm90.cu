// GQA flash-attention forward for Hopper (sm_90a) in the FlashAttention-3 manner: TMA copies,
// warpgroup MMA and warp specialisation. Same semantics as the forward of flash_attn.cu (read its
// header and FwdParams): K / V read once per kv head by index, causal masks aligned bottom-right
// (causal_offset = sk - sq), packed documents as per-query key ranges [key_lo, key_hi) visiting only
// the key tiles some row of the block can see and masking only the tiles that straddle a boundary,
// strided [b, s, heads, d] views read in place, out bf16 like q, lse fp32 [b, hq, sq] natural log;
// a query that sees no key gets out 0 and lse -inf.
//
// Design:
// - one CTA of three warpgroups per (query head, 128-query tile, batch row), the longest causal tiles
//   first. Warpgroup 0 is the producer: it gives its registers away (setmaxnreg) and one of its
//   threads issues every copy. Warpgroups 1 and 2 are the consumers, each owning 64 query rows; they
//   take the registers (240 a thread) and keep S, P, O and the running max / sum in them.
// - copies: Q once, then K and V in 128-key tiles through a ring of kStages stages each, all by TMA
//   (cp.async.bulk.tensor on rank-4 tensor maps [d, s, heads, b] with the views' strides) in the
//   128-byte swizzle layout, 64 columns of d per box. A "full" mbarrier per stage completes with the
//   copy's bytes; the consumers free a stage by one arrival per warp on its "empty" mbarrier (8 per
//   phase), separately for K (after S = Q K^T) and V (after O += P V).
// - S = Q K^T: wgmma m64n128k16, Q and K both K-major in shared memory. O += P V: wgmma m64nDk16 with
//   P from registers (S's accumulator columns 16k..16k+15 packed to bf16 are the A fragment k) and V
//   in shared memory as an MN-major (transposed) operand.
// - intra-warpgroup overlap: S of tile j + 1 is issued before P V of tile j and its softmax runs while
//   that product is in flight; O is rescaled once the product has completed.
// - inter-warpgroup ping-pong: the two consumers issue their products in turns (named barriers), so
//   the softmax of one overlaps the products of the other.
// - epilogue: O normalised in registers, written (128-byte swizzled) over the warpgroup's own Q rows
//   in shared memory and stored by TMA, which clips rows beyond sq; lse by plain stores.
// Next steps not taken: a persistent grid that overlaps one tile's epilogue with the next tile's
// loads (packed documents make many short tiles), three stages for d 64.

#include "flash_attn.cuh"
#include "sm90.cuh"

#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled (the driver entry point is looked up at run time)

#include <algorithm>

namespace {

using namespace mq2;
using namespace mq2::fa;
using namespace mq2::sm90;

constexpr int kBM = 128, kBN = 128, kStages = 2, kThreads = 384;
constexpr int kProducerRegs = 24, kConsumerRegs = 240;  // 128 * 24 + 256 * 240 <= 64K registers

// Shared memory of one CTA (byte offsets from a 1024-byte aligned base; every 128-byte swizzle atom,
// 8 rows of 128 bytes, starts 1024-byte aligned). A tile of R rows x D columns is D / 64 boxes of
// R rows x 128 bytes, one after the other.
template <int D>
struct Smem {
  static constexpr int kChunks = D / 64;                 // 64-column boxes along d
  static constexpr int kQRows = 64 * 128;                // bytes of one box of 64 rows
  static constexpr int kQHalf = kChunks * kQRows;        // one consumer's 64 rows of Q (later of O)
  static constexpr int kKVRows = kBN * 128;              // bytes of one box of kBN rows
  static constexpr int kTile = kChunks * kKVRows;        // one stage of K or of V
  static constexpr int q = 0;
  static constexpr int k = q + 2 * kQHalf;
  static constexpr int v = k + kStages * kTile;
  static constexpr int bars = v + kStages * kTile;       // q_full, k_full[], k_empty[], v_full[], v_empty[]
  static constexpr int bytes = bars + 8 * (1 + 4 * kStages);
  static constexpr int launch_bytes = bytes + 1024;      // room to align the dynamic base
};

template <int D>
__global__ void __launch_bounds__(kThreads, 1)
    flash_fwd_sm90_kernel(const __grid_constant__ CUtensorMap tm_q, const __grid_constant__ CUtensorMap tm_k,
                          const __grid_constant__ CUtensorMap tm_v, const __grid_constant__ CUtensorMap tm_o,
                          const FwdParams p) {
#if MQ2_SM90A
  using L = Smem<D>;
  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t base = (raw + 1023u) & ~1023u;
  unsigned char* smem = smem_raw + (base - raw);
  const uint32_t sQ = base + L::q, sK = base + L::k, sV = base + L::v, bars = base + L::bars;
  const uint32_t q_full = bars;
  auto k_full = [&](int s) { return bars + 8u * (1 + s); };
  auto k_empty = [&](int s) { return bars + 8u * (1 + kStages + s); };
  auto v_full = [&](int s) { return bars + 8u * (1 + 2 * kStages + s); };
  auto v_empty = [&](int s) { return bars + 8u * (1 + 3 * kStages + s); };

  const int h = blockIdx.x, b = blockIdx.z;
  const int m0 = (gridDim.y - 1 - blockIdx.y) * kBM;  // longest causal tiles first
  const int hk = h / (p.hq / p.hkv);
  const int m_last = min(m0 + kBM, p.sq) - 1;
  const int* ds = p.key_lo ? p.key_lo + (int64_t)b * p.sq : nullptr;
  const int* de = p.key_hi ? p.key_hi + (int64_t)b * p.sq : nullptr;

  // Keys any row of the block may see: the key tiles both roles walk.
  int n_hi = de ? min(p.sk, de[m_last]) : p.sk;
  if (p.causal) n_hi = min(n_hi, m_last + p.causal_offset + 1);
  const int n_start = max(0, ds ? ds[m0] : 0) / kBN * kBN;
  const int ntiles = n_hi > n_start ? (n_hi - n_start + kBN - 1) / kBN : 0;

  const int wg = threadIdx.x / 128;
  if (threadIdx.x == 0) {
    mbar_init(q_full, 1);
    for (int s = 0; s < kStages; ++s) {
      mbar_init(k_full(s), 1);
      mbar_init(v_full(s), 1);
      mbar_init(k_empty(s), 8);  // one arrival per consumer warp
      mbar_init(v_empty(s), 8);
    }
    mbar_init_fence();
  }
  __syncthreads();

  if (wg == 0) {
    // ---- producer
    setmaxnreg_dec<kProducerRegs>();
    if (threadIdx.x == 0 && ntiles > 0) {
      tma_prefetch_map(&tm_q);
      tma_prefetch_map(&tm_k);
      tma_prefetch_map(&tm_v);
      const int halves = m0 + 64 < p.sq ? 2 : 1;  // the second consumer's rows may all lie beyond sq
      mbar_arrive_expect_tx(q_full, halves * L::kQHalf);
      for (int w = 0; w < halves; ++w)
        for (int c = 0; c < L::kChunks; ++c)
          tma_load_4d(sQ + w * L::kQHalf + c * L::kQRows, &tm_q, q_full, c * 64, m0 + 64 * w, h, b);
      for (int it = 0; it < ntiles; ++it) {
        const int s = it % kStages;
        const uint32_t phase = (it / kStages) & 1;
        const int n0 = n_start + it * kBN;
        mbar_wait(k_empty(s), phase ^ 1);
        mbar_arrive_expect_tx(k_full(s), L::kTile);
        for (int c = 0; c < L::kChunks; ++c)
          tma_load_4d(sK + s * L::kTile + c * L::kKVRows, &tm_k, k_full(s), c * 64, n0, hk, b);
        mbar_wait(v_empty(s), phase ^ 1);
        mbar_arrive_expect_tx(v_full(s), L::kTile);
        for (int c = 0; c < L::kChunks; ++c)
          tma_load_4d(sV + s * L::kTile + c * L::kKVRows, &tm_v, v_full(s), c * 64, n0, hk, b);
      }
    }
    return;
  }

  // ---- consumers
  setmaxnreg_inc<kConsumerRegs>();
  const int cw = wg - 1;  // rows m0 + 64 cw ..
  const int tid = threadIdx.x % 128, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int row0 = m0 + 64 * cw;

  // Visible keys of this thread's two rows.
  const RowKeys rows[2] = {row_keys(p, ds, de, row0 + warp * 16 + g), row_keys(p, ds, de, row0 + warp * 16 + g + 8)};
  // Bounds under which a whole key tile is visible to every row of this warpgroup.
  const int lo_max = ds ? ds[min(row0 + 63, p.sq - 1)] : 0;
  const int hi_min = de ? min(p.sk, de[min(row0, p.sq - 1)]) : p.sk;
  const int diag = row0 + p.causal_offset;

  float o[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  float s[kBN / 8][4];  // scores, then probabilities
  uint32_t pf[kBN / 16][4];
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f}, alpha[2];

  const uint32_t q_rows = sQ + cw * L::kQHalf;

  // S = Q K^T over the D / 16 reduction steps: step kk is box kk / 4, bytes 32 (kk % 4) of each row.
  auto issue_qk = [&](int stage) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint32_t off = (kk % 4) * 32;
      const uint64_t da = smem_desc_sw128(q_rows + (kk / 4) * L::kQRows + off, 16, 1024);
      const uint64_t db = smem_desc_sw128(sK + stage * L::kTile + (kk / 4) * L::kKVRows + off, 16, 1024);
      wgmma_m64n128k16_ss(s, da, db, kk > 0);
    }
  };
  // O += P V over the kBN / 16 key steps: step kk is rows 16 kk.. of every box; the boxes (64 columns
  // of d each) are L::kKVRows apart.
  auto issue_pv = [&](int stage) {
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      const uint64_t db = smem_desc_sw128(sV + stage * L::kTile + kk * 16 * 128, L::kKVRows, 1024);
      if constexpr (D == 128) wgmma_m64n128k16_rs<1>(o, pf[kk], db);
      else wgmma_m64n64k16_rs<1>(o, pf[kk], db);
    }
  };
  auto release = [&](uint32_t bar) {
    if (lane == 0) mbar_arrive(bar);
  };
  auto mask = [&](int n0) {
    const bool full = n0 >= lo_max && n0 + kBN <= hi_min && (!p.causal || n0 + kBN - 1 <= diag);
    if (!full) mask_scores(s, n0, t, rows);
  };
  auto softmax = [&]() {
#pragma unroll
    for (int i = 0; i < 2; ++i) alpha[i] = softmax_row(s, i, row_max[i], row_sum[i], p.scale_log2);
  };
  auto to_p = [&]() {
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) p_fragment(s, kk, pf[kk]);
  };
  auto rescale_o = [&]() {
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      o[j][0] *= alpha[0];
      o[j][1] *= alpha[0];
      o[j][2] *= alpha[1];
      o[j][3] *= alpha[1];
    }
  };

  // Ping-pong of the two consumers: each issues its products only in its turn (barrier 3 + cw, with
  // the other's 128 threads arriving), so one's softmax overlaps the other's products. Consumer 0
  // goes first (consumer 1 arrives once up front); both take ntiles + 1 turns, and consumer 1 leaves
  // out its last hand-over, which nobody waits for.
  // A turn begins with O and P final in registers (pinned before the fence) and the fence.
  auto turn_begin = [&]() {
    pin(o);
    pin(pf);
    named_barrier_sync(3 + cw, 256);
    wgmma_fence();
  };
  auto turn_end = [&](bool last) {
    if (!(last && cw == 1)) named_barrier_arrive(3 + (1 - cw), 256);
  };

  if (ntiles > 0) {
    if (cw == 1) named_barrier_arrive(3, 256);
    mbar_wait(q_full, 0);
    // tile 0: S, softmax, P (O is still zero)
    mbar_wait(k_full(0), 0);
    turn_begin();
    issue_qk(0);
    wgmma_commit();
    turn_end(false);
    wgmma_wait<0>();
    pin(s);
    release(k_empty(0));
    mask(n_start);
    softmax();
    to_p();
    int stage = 0;
    uint32_t phase = 0;
    for (int it = 1; it < ntiles; ++it) {
      const int next = it % kStages;
      const uint32_t next_phase = (it / kStages) & 1;
      mbar_wait(k_full(next), next_phase);
      mbar_wait(v_full(stage), phase);
      turn_begin();
      issue_qk(next);  // S of tile it ...
      wgmma_commit();
      issue_pv(stage);  // ... while P V of tile it - 1 follows it
      wgmma_commit();
      turn_end(false);
      wgmma_wait<1>();  // S done (groups complete in order)
      pin(s);
      release(k_empty(next));
      mask(n_start + it * kBN);
      softmax();
      wgmma_wait<0>();  // P V done: O and P may be touched
      pin(o);
      pin(pf);
      release(v_empty(stage));
      rescale_o();
      to_p();
      stage = next;
      phase = next_phase;
    }
    mbar_wait(v_full(stage), phase);
    turn_begin();
    issue_pv(stage);
    wgmma_commit();
    turn_end(true);
    wgmma_wait<0>();
    pin(o);
    release(v_empty(stage));
  }

  // ---- epilogue: lse, O normalised, staged swizzled over this warpgroup's Q rows, TMA store.
  float* lse_row = p.lse + ((int64_t)b * p.hq + h) * p.sq;
  float inv[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float lse;
    inv[i] = finish_row(row_sum[i], row_max[i], p.scale_log2, lse);
    const int row = row0 + warp * 16 + g + 8 * i;
    if (t == 0 && row < p.sq) lse_row[row] = lse;
  }
  unsigned char* so = smem + L::q + cw * L::kQHalf;
#pragma unroll
  for (int j = 0; j < D / 8; ++j) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int r = warp * 16 + g + 8 * i;  // r % 8 == g: the swizzle permutes 16-byte chunks by it
      const int off = (j / 8) * L::kQRows + r * 128 + (((j % 8) ^ g) << 4) + 4 * t;
      *reinterpret_cast<uint32_t*>(so + off) = pack_bf16(o[j][2 * i] * inv[i], o[j][2 * i + 1] * inv[i]);
    }
  }
  fence_proxy_async();
  named_barrier_sync(1 + cw, 128);
  if (tid == 0 && row0 < p.sq) {
    for (int c = 0; c < L::kChunks; ++c) tma_store_4d(&tm_o, q_rows + c * L::kQRows, c * 64, row0, h, b);
    tma_store_commit();
    tma_store_wait_read();
  }
#else
  __trap();  // built without sm_90a: the launcher refuses other devices, so this is never reached
#endif
}

}  // namespace

// ---- host: the Hopper helpers of sm90.cuh and the launch

namespace {

PFN_cuTensorMapEncodeTiled_v12000 encode_tiled() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult found{};
#if CUDART_VERSION >= 12050
    C10_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &found));
#else
    C10_CUDA_CHECK(cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &ptr, cudaEnableDefault, &found));
#endif
    TORCH_CHECK(found == cudaDriverEntryPointSuccess && ptr != nullptr,
                "flash attention (sm90): the CUDA driver has no cuTensorMapEncodeTiled (needs a CUDA 12 driver)");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr);
  }();
  return fn;
}

}  // namespace

void mq2::sm90::require_hopper(const at::Tensor& t, const char* op) {
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, t.get_device()));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, t.get_device()));
  TORCH_CHECK(major == 9 && minor == 0, op, " needs a Hopper GPU (compute capability 9.0), got ", major, ".", minor,
              "; use the FA2-style flash_attention_forward / flash_attention_backward");
}

CUtensorMap mq2::sm90::tile_map(const at::Tensor& t, int rows, const char* op) {
  const bool fp32 = t.scalar_type() == at::kFloat;
  const cuuint64_t elem = fp32 ? 4 : 2;
  const int dim_of[3] = {1, 2, 0};  // map dimensions 1..3 are the view's s, heads, b
  cuuint64_t sizes[4] = {static_cast<cuuint64_t>(t.size(3)), 0, 0, 0};
  cuuint64_t strides[3];
  cuuint64_t extent = t.size(3) * elem;  // bytes spanned by the dimensions of several elements
  for (int dim = 0; dim < 3; ++dim)
    if (t.size(dim) > 1)
      extent = std::max<cuuint64_t>(extent, static_cast<cuuint64_t>(t.stride(dim)) * elem * t.size(dim));
  for (int i = 0; i < 3; ++i) {
    const int dim = dim_of[i];
    sizes[i + 1] = static_cast<cuuint64_t>(t.size(dim));
    // a dimension of one element is never stepped along (its stride may be anything in the view):
    // it is placed outside the others, 16-byte aligned
    strides[i] = t.size(dim) == 1 ? (extent + 15) / 16 * 16 : static_cast<cuuint64_t>(t.stride(dim)) * elem;
  }
  const cuuint32_t box[4] = {static_cast<cuuint32_t>(128 / elem), static_cast<cuuint32_t>(rows), 1, 1};
  const cuuint32_t steps[4] = {1, 1, 1, 1};
  CUtensorMap map;
  const CUresult r = encode_tiled()(&map, fp32 ? CU_TENSOR_MAP_DATA_TYPE_FLOAT32 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 4, t.data_ptr(), sizes, strides, box, steps,
                                    CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                    CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TORCH_CHECK(r == CUDA_SUCCESS, op, ": cuTensorMapEncodeTiled failed (CUresult ", r, ") for a tensor of shape ",
              t.sizes(), " and strides ", t.strides());
  return map;
}

at::Tensor mq2::sm90::tma_readable(const at::Tensor& t) {
  for (int i = 0; i < 3; ++i)
    if (t.stride(i) == 0 && t.size(i) > 1) return t.contiguous();
  return t;
}

// Validated by bindings.cpp as for flash_attn_forward_cuda (bf16 CUDA views [b, s, heads, d] with a
// contiguous last dimension and 16-byte aligned rows; out like q; lse fp32 [b, hq, sq]; key_lo /
// key_hi int32 [b, sq] or both absent); the device must be a Hopper GPU (compute capability 9.0).
void flash_attn_forward_sm90_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                  at::Tensor& out, at::Tensor& lse, const c10::optional<at::Tensor>& key_lo,
                                  const c10::optional<at::Tensor>& key_hi, bool causal, double scale) {
  const c10::cuda::CUDAGuard guard(q_in.device());
  const char* op = "flash_attention_forward_sm90";
  require_hopper(q_in, op);
  const at::Tensor q = tma_readable(q_in), k = tma_readable(k_in), v = tma_readable(v_in);
  const FwdParams p = make_fwd_params(q, k, v, out, lse, key_lo, key_hi, causal, scale);
  const CUtensorMap tm_q = tile_map(q, 64, op), tm_k = tile_map(k, kBN, op), tm_v = tile_map(v, kBN, op),
                    tm_o = tile_map(out, 64, op);
  auto stream = current_stream();
  with_head_dim(q.size(3), [&](auto dc) {
    constexpr int D = decltype(dc)::value;
    constexpr int smem = Smem<D>::launch_bytes;
    auto kernel = flash_fwd_sm90_kernel<D>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    const dim3 grid(p.hq, (p.sq + kBM - 1) / kBM, p.b);
    kernel<<<grid, kThreads, smem, stream>>>(tm_q, tm_k, tm_v, tm_o, p);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
