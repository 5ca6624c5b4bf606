// The one binding file of megatron_qwen2._C: argument checks and allocation live here (host
// C++), the kernels and their launchers in the .cu files.

#include <torch/extension.h>

void swiglu_forward_cuda(const torch::Tensor& x, torch::Tensor& y, int64_t rows, int64_t f);
void swiglu_backward_cuda(const torch::Tensor& x, const torch::Tensor& dy, torch::Tensor& dx, int64_t rows,
                          int64_t f);
void rms_norm_forward_cuda(const torch::Tensor& x, const c10::optional<torch::Tensor>& residual,
                           const torch::Tensor& w, torch::Tensor& y, c10::optional<torch::Tensor>& sum_out,
                           torch::Tensor& rstd, int64_t rows, int64_t h, double eps);
void rms_norm_backward_cuda(const torch::Tensor& dy, const torch::Tensor& x, const torch::Tensor& w,
                            const torch::Tensor& rstd, const c10::optional<torch::Tensor>& dsum, torch::Tensor& dx,
                            torch::Tensor& dw, int64_t rows, int64_t h);
void permute_forward_cuda(const torch::Tensor& x, const torch::Tensor& row_map, torch::Tensor& out, int64_t tokens,
                          int64_t k, int64_t h);
void permute_backward_cuda(const torch::Tensor& dout, const torch::Tensor& row_map, torch::Tensor& dx, int64_t tokens,
                           int64_t k, int64_t h);
void unpermute_forward_cuda(const torch::Tensor& y, const torch::Tensor& row_map, const torch::Tensor& probs,
                            torch::Tensor& out, int64_t tokens, int64_t k, int64_t h);
void unpermute_backward_cuda(const torch::Tensor& dout, const torch::Tensor& y, const torch::Tensor& row_map,
                             const torch::Tensor& probs, torch::Tensor& dy, torch::Tensor& dprobs, int64_t tokens,
                             int64_t k, int64_t h);
void expert_rows_cuda(const torch::Tensor& ids, int64_t experts, torch::Tensor& counts, torch::Tensor& row_map);
void rope_cuda(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin, torch::Tensor& out,
               bool backward);
void ce_forward_cuda(const torch::Tensor& logits, const torch::Tensor& target, torch::Tensor& row_max,
                     torch::Tensor& row_sum, torch::Tensor& tgt_logit, int64_t rows, int64_t v);
void ce_backward_cuda(const torch::Tensor& logits, const torch::Tensor& target, const torch::Tensor& lse,
                      const torch::Tensor& grad, torch::Tensor& dx, int64_t rows, int64_t v);
void flash_attn_forward_cuda(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                             torch::Tensor& out, torch::Tensor& lse, const c10::optional<torch::Tensor>& key_lo,
                             const c10::optional<torch::Tensor>& key_hi, bool causal, double scale);
void flash_attn_forward_sm90_cuda(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                  torch::Tensor& out, torch::Tensor& lse, const c10::optional<torch::Tensor>& key_lo,
                                  const c10::optional<torch::Tensor>& key_hi, bool causal, double scale);
void flash_attn_delta_cuda(const torch::Tensor& out, const torch::Tensor& dout,
                           const c10::optional<torch::Tensor>& dlse, torch::Tensor& delta);
void flash_attn_backward_cuda(const torch::Tensor& dout, const torch::Tensor& q, const torch::Tensor& k,
                              const torch::Tensor& v, const torch::Tensor& lse, const torch::Tensor& delta,
                              torch::Tensor& dq_acc, torch::Tensor& dk, torch::Tensor& dv,
                              const c10::optional<torch::Tensor>& query_lo,
                              const c10::optional<torch::Tensor>& query_hi, bool causal, double scale, bool partial);
void flash_attn_backward_sm90_cuda(const torch::Tensor& dout, const torch::Tensor& q, const torch::Tensor& k,
                                   const torch::Tensor& v, const torch::Tensor& out, const torch::Tensor& lse,
                                   const c10::optional<torch::Tensor>& dlse, torch::Tensor& dq_acc, torch::Tensor& dk,
                                   torch::Tensor& dv, const c10::optional<torch::Tensor>& query_lo,
                                   const c10::optional<torch::Tensor>& query_hi, bool causal, double scale,
                                   bool partial);
void fp8_quantize_cuda(const torch::Tensor& x, const std::string& tiling, torch::Tensor& data, torch::Tensor& scale_inv,
                       const c10::optional<torch::Tensor>& data_t, const c10::optional<torch::Tensor>& scale_inv_t,
                       const c10::optional<torch::Tensor>& amax);
void fp8_transpose_cuda(const torch::Tensor& x, torch::Tensor& y, int64_t groups, int64_t rows, int64_t cols);
void fp8_gemm_accumulate_cuda(const torch::Tensor& a, const torch::Tensor& a_scale_inv, const std::string& a_tiling,
                              const torch::Tensor& b, const torch::Tensor& b_scale_inv, const std::string& b_tiling,
                              torch::Tensor& out);
bool rms_norm_fp8_forward_cuda(const torch::Tensor& x, const c10::optional<torch::Tensor>& residual,
                               const torch::Tensor& w, c10::optional<torch::Tensor>& sum_out, torch::Tensor& rstd,
                               const std::string& tiling, torch::Tensor& data, torch::Tensor& scale_inv,
                               torch::Tensor& data_t, const c10::optional<torch::Tensor>& scale_inv_t,
                               torch::Tensor& amax, int64_t rows, int64_t rows_pad, int64_t h, double eps);
bool swiglu_fp8_cuda(const torch::Tensor& x, const std::string& tiling, torch::Tensor& data, torch::Tensor& scale_inv,
                     torch::Tensor& data_t, const c10::optional<torch::Tensor>& scale_inv_t, torch::Tensor& amax,
                     int64_t rows, int64_t rows_pad, int64_t f);

namespace {

void check_input(const torch::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op, ": ", name,
              " must be float32, bfloat16 or float16, got ", dtype);
}

int64_t half_last_dim(const torch::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) % 2 == 0, op, ": the last dimension of x must be even, got shape ",
              x.sizes());
  return x.size(-1) / 2;
}

torch::Tensor swiglu_forward(const torch::Tensor& x) {
  check_input(x, "swiglu_forward", "x");
  const int64_t f = half_last_dim(x, "swiglu_forward");
  auto shape = x.sizes().vec();
  shape.back() = f;
  auto y = torch::empty(shape, x.options());
  const int64_t rows = f == 0 ? 0 : x.numel() / (2 * f);
  if (rows > 0) swiglu_forward_cuda(x, y, rows, f);
  return y;
}

torch::Tensor swiglu_backward(const torch::Tensor& x, const torch::Tensor& dy) {
  check_input(x, "swiglu_backward", "x");
  check_input(dy, "swiglu_backward", "dy");
  TORCH_CHECK(x.scalar_type() == dy.scalar_type(), "swiglu_backward: x is ", x.scalar_type(), " but dy is ",
              dy.scalar_type());
  TORCH_CHECK(x.device() == dy.device(), "swiglu_backward: x and dy are on different devices");
  const int64_t f = half_last_dim(x, "swiglu_backward");
  auto shape = x.sizes().vec();
  shape.back() = f;
  TORCH_CHECK(dy.sizes().vec() == shape, "swiglu_backward: dy has shape ", dy.sizes(), ", expected ",
              at::IntArrayRef(shape));
  auto dx = torch::empty_like(x);
  const int64_t rows = f == 0 ? 0 : x.numel() / (2 * f);
  if (rows > 0) swiglu_backward_cuda(x, dy, dx, rows, f);
  return dx;
}

void check_same(const torch::Tensor& a, const torch::Tensor& b, const char* op, const char* name) {
  check_input(b, op, name);
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", name, " is ", b.scalar_type(), ", expected ",
              a.scalar_type());
  TORCH_CHECK(a.device() == b.device(), op, ": ", name, " is on ", b.device(), ", expected ", a.device());
}

void check_shape(const torch::Tensor& t, at::IntArrayRef shape, const char* op, const char* name) {
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " has shape ", t.sizes(), ", expected ", shape);
}

void check_aux(const torch::Tensor& t, at::ScalarType dtype, at::IntArrayRef shape, const torch::Tensor& like,
               const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device(), op, ": ", name, " must be on ", like.device());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  check_shape(t, shape, op, name);
}

// ---- RMSNorm: x [rows, h] (callers flatten leading dimensions), w [h].
void check_rms_norm_inputs(const torch::Tensor& x, const c10::optional<torch::Tensor>& residual,
                           const torch::Tensor& w, double eps, const char* op) {
  check_input(x, op, "x");
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [rows, hidden], got shape ", x.sizes());
  check_same(x, w, op, "weight");
  check_shape(w, {x.size(1)}, op, "weight");
  if (residual) {
    check_same(x, *residual, op, "residual");
    check_shape(*residual, x.sizes(), op, "residual");
  }
  TORCH_CHECK(eps >= 0, op, ": eps must be >= 0, got ", eps);
}

std::vector<torch::Tensor> rms_norm_forward(const torch::Tensor& x, const c10::optional<torch::Tensor>& residual,
                                            const torch::Tensor& w, double eps) {
  check_rms_norm_inputs(x, residual, w, eps, "rms_norm_forward");
  auto y = torch::empty_like(x);
  auto rstd = torch::empty({x.size(0)}, x.options().dtype(at::kFloat));
  c10::optional<torch::Tensor> sum_out;
  if (residual) sum_out = torch::empty_like(x);
  if (x.numel() > 0) rms_norm_forward_cuda(x, residual, w, y, sum_out, rstd, x.size(0), x.size(1), eps);
  if (sum_out) return {y, rstd, *sum_out};
  return {y, rstd};
}

std::vector<torch::Tensor> rms_norm_backward(const torch::Tensor& dy, const torch::Tensor& x, const torch::Tensor& w,
                                             const torch::Tensor& rstd, const c10::optional<torch::Tensor>& dsum) {
  const char* op = "rms_norm_backward";
  check_input(x, op, "x");
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [rows, hidden], got shape ", x.sizes());
  check_same(x, dy, op, "dy");
  check_shape(dy, x.sizes(), op, "dy");
  check_same(x, w, op, "weight");
  check_shape(w, {x.size(1)}, op, "weight");
  check_aux(rstd, at::kFloat, {x.size(0)}, x, op, "rstd");
  if (dsum) {
    check_same(x, *dsum, op, "dsum");
    check_shape(*dsum, x.sizes(), op, "dsum");
  }
  auto dx = torch::empty_like(x);
  auto dw = torch::empty_like(w);
  if (x.numel() > 0) rms_norm_backward_cuda(dy, x, w, rstd, dsum, dx, dw, x.size(0), x.size(1));
  else dw.zero_();
  return {dx, dw};
}

// ---- MoE permutation: x [tokens, h]; row_map int32 [tokens * k]; probs fp32 [tokens, k]. The
// permuted rows may hold more than tokens * k rows (experts' groups padded for FP8 GEMMs): the rows
// no copy maps to are zero in the permuted rows and in their gradient.
void check_row_map(const torch::Tensor& row_map, int64_t n, const torch::Tensor& like, const char* op) {
  check_aux(row_map, at::kInt, {n}, like, op, "row_map");
}

torch::Tensor permute_forward(const torch::Tensor& x, const torch::Tensor& row_map, int64_t k, int64_t rows) {
  const char* op = "permute_forward";
  check_input(x, op, "x");
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [tokens, hidden], got shape ", x.sizes());
  TORCH_CHECK(k > 0, op, ": top-k must be > 0, got ", k);
  check_row_map(row_map, x.size(0) * k, x, op);
  TORCH_CHECK(rows >= x.size(0) * k, op, ": rows (", rows, ") below tokens * k = ", x.size(0) * k);
  auto out = rows > x.size(0) * k ? torch::zeros({rows, x.size(1)}, x.options())
                                  : torch::empty({rows, x.size(1)}, x.options());
  if (out.numel() > 0) permute_forward_cuda(x, row_map, out, x.size(0), k, x.size(1));
  return out;
}

torch::Tensor permute_backward(const torch::Tensor& dout, const torch::Tensor& row_map, int64_t k) {
  const char* op = "permute_backward";
  check_input(dout, op, "dout");
  TORCH_CHECK(dout.dim() == 2, op, ": dout must be 2-D [rows >= tokens * k, hidden], got shape ", dout.sizes());
  TORCH_CHECK(k > 0 && row_map.numel() % k == 0, op, ": row_map's ", row_map.numel(),
              " entries are no multiple of k = ", k);
  const int64_t tokens = row_map.numel() / k;
  TORCH_CHECK(dout.size(0) >= tokens * k, op, ": dout has ", dout.size(0), " rows, below tokens * k = ", tokens * k);
  check_row_map(row_map, tokens * k, dout, op);
  auto dx = torch::empty({tokens, dout.size(1)}, dout.options());
  if (dx.numel() > 0) permute_backward_cuda(dout, row_map, dx, tokens, k, dout.size(1));
  return dx;
}

torch::Tensor unpermute_forward(const torch::Tensor& y, const torch::Tensor& row_map, const torch::Tensor& probs) {
  const char* op = "unpermute_forward";
  check_input(y, op, "y");
  TORCH_CHECK(y.dim() == 2, op, ": y must be 2-D [tokens * k, hidden], got shape ", y.sizes());
  TORCH_CHECK(probs.dim() == 2, op, ": probs must be 2-D [tokens, k], got shape ", probs.sizes());
  const int64_t tokens = probs.size(0), k = probs.size(1);
  TORCH_CHECK(y.size(0) >= tokens * k, op, ": y has ", y.size(0), " rows, below tokens * k = ", tokens * k);
  check_aux(probs, at::kFloat, {tokens, k}, y, op, "probs");
  check_row_map(row_map, tokens * k, y, op);
  auto out = torch::empty({tokens, y.size(1)}, y.options());
  if (out.numel() > 0 && k > 0) unpermute_forward_cuda(y, row_map, probs, out, tokens, k, y.size(1));
  else out.zero_();
  return out;
}

std::vector<torch::Tensor> unpermute_backward(const torch::Tensor& dout, const torch::Tensor& y,
                                              const torch::Tensor& row_map, const torch::Tensor& probs) {
  const char* op = "unpermute_backward";
  check_input(y, op, "y");
  TORCH_CHECK(y.dim() == 2 && probs.dim() == 2, op, ": y must be [tokens * k, hidden] and probs [tokens, k]");
  const int64_t tokens = probs.size(0), k = probs.size(1);
  TORCH_CHECK(y.size(0) >= tokens * k, op, ": y has ", y.size(0), " rows, below tokens * k = ", tokens * k);
  check_same(y, dout, op, "dout");
  check_shape(dout, {tokens, y.size(1)}, op, "dout");
  check_aux(probs, at::kFloat, {tokens, k}, y, op, "probs");
  check_row_map(row_map, tokens * k, y, op);
  auto dy = y.size(0) > tokens * k ? torch::zeros_like(y) : torch::empty_like(y);
  auto dprobs = torch::zeros_like(probs);
  if (dy.numel() > 0) unpermute_backward_cuda(dout, y, row_map, probs, dy, dprobs, tokens, k, y.size(1));
  return {dy, dprobs};
}

// routing ids [tokens, k] (int32/int64) -> [row_map int32 [tokens * k], tokens_per_expert int64 [experts]]
std::vector<torch::Tensor> expert_rows(const torch::Tensor& ids, int64_t experts) {
  const char* op = "expert_rows";
  TORCH_CHECK(ids.is_cuda(), op, ": routing ids must be a CUDA tensor");
  TORCH_CHECK(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt, op,
              ": routing ids must be int64 or int32, got ", ids.scalar_type());
  TORCH_CHECK(experts > 0 && experts <= (1 << 20), op, ": num_experts must be in [1, 2^20], got ", experts);
  TORCH_CHECK(ids.numel() < (int64_t(1) << 31), op, ": too many routed slots for int32 rows: ", ids.numel());
  auto flat = ids.contiguous().view(-1);
  auto counts = torch::empty({experts}, ids.options().dtype(at::kLong));
  auto row_map = torch::empty({flat.numel()}, ids.options().dtype(at::kInt));
  if (flat.numel() > 0) expert_rows_cuda(flat, experts, counts, row_map);
  else counts.zero_();
  return {row_map, counts};
}

// ---- RoPE: x [n0, n1, n2, d] strided with a contiguous last dimension; cos/sin broadcastable to it.
torch::Tensor rope_apply(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin, bool backward) {
  const char* op = "rope";
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor");
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D, got shape ", x.sizes());
  TORCH_CHECK(x.size(3) % 2 == 0, op, ": head_dim must be even, got ", x.size(3));
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op,
              ": x must be float32, bfloat16 or float16, got ", dtype);
  for (const torch::Tensor* t : std::initializer_list<const torch::Tensor*>{&cos, &sin})
    TORCH_CHECK(t->scalar_type() == dtype && t->device() == x.device(), op, ": cos/sin must match x's dtype and device");
  auto c = cos.expand(x.sizes());
  auto s = sin.expand(x.sizes());
  for (const torch::Tensor* t : std::initializer_list<const torch::Tensor*>{&x, &c, &s})
    TORCH_CHECK(t->stride(3) == 1 || t->size(3) == 1, op, ": the last dimension must be contiguous");
  auto out = torch::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (x.numel() > 0) rope_cuda(x, c, s, out, backward);
  return out;
}

// ---- Cross-entropy over a vocabulary shard: logits [rows, v], target int64 [rows] (shard-local ids).
std::vector<torch::Tensor> ce_forward(const torch::Tensor& logits, const torch::Tensor& target) {
  const char* op = "cross_entropy_forward";
  check_input(logits, op, "logits");
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0, op, ": logits must be [rows, vocab > 0], got ", logits.sizes());
  check_aux(target, at::kLong, {logits.size(0)}, logits, op, "target");
  auto opts = logits.options().dtype(at::kFloat);
  auto m = torch::empty({logits.size(0)}, opts), s = torch::empty({logits.size(0)}, opts),
       t = torch::empty({logits.size(0)}, opts);
  if (logits.size(0) > 0) ce_forward_cuda(logits, target, m, s, t, logits.size(0), logits.size(1));
  return {m, s, t};
}

torch::Tensor ce_backward(const torch::Tensor& logits, const torch::Tensor& target, const torch::Tensor& lse,
                          const torch::Tensor& grad) {
  const char* op = "cross_entropy_backward";
  check_input(logits, op, "logits");
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0, op, ": logits must be [rows, vocab > 0], got ", logits.sizes());
  check_aux(target, at::kLong, {logits.size(0)}, logits, op, "target");
  check_aux(lse, at::kFloat, {logits.size(0)}, logits, op, "lse");
  check_aux(grad, at::kFloat, {logits.size(0)}, logits, op, "grad");
  auto dx = torch::empty_like(logits);
  if (logits.size(0) > 0) ce_backward_cuda(logits, target, lse, grad, dx, logits.size(0), logits.size(1));
  return dx;
}


// ---- Flash attention: q [b, sq, hq, d], k / v [b, sk, hkv, d] bf16 views with a contiguous last
// dimension (any batch / sequence / head strides; layouts whose rows are not 16-byte aligned are
// copied). Packed documents: key_lo / key_hi int32 [b, sq] (query i sees keys key_lo[i] <= j <
// key_hi[i]) for the forward, query_lo / query_hi int32 [b, sk] (key j is seen by queries
// query_lo[j] <= i < query_hi[j]) for the backward; non-decreasing along the row.

// t itself when its rows suit the kernels (last dimension contiguous, 16-byte aligned rows), else a contiguous copy.
torch::Tensor attn_rows(const torch::Tensor& t) {
  bool ok = t.stride(3) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int i = 0; i < 3; ++i) ok = ok && (t.stride(i) % 8 == 0 || t.size(i) == 1);
  return ok ? t : t.contiguous();
}

// empty tensor shaped like t: t's layout when t is dense (a transposed view stays transposed), else contiguous.
torch::Tensor attn_empty_like(const torch::Tensor& t) {
  auto out = torch::empty_like(t);
  return attn_rows(out);
}

void check_attn(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                const c10::optional<torch::Tensor>& lo, const c10::optional<torch::Tensor>& hi, int64_t range_len,
                double scale, const char* op) {
  for (auto [t, name] : {std::pair{&q, "q"}, std::pair{&k, "k"}, std::pair{&v, "v"}}) {
    TORCH_CHECK(t->is_cuda() && t->device() == q.device(), op, ": ", name, " must be a CUDA tensor on ", q.device());
    TORCH_CHECK(t->scalar_type() == at::kBFloat16, op, ": ", name, " must be bfloat16, got ", t->scalar_type());
    TORCH_CHECK(t->dim() == 4, op, ": ", name, " must be 4-D [b, s, heads, head_dim], got shape ", t->sizes());
  }
  const int64_t d = q.size(3);
  TORCH_CHECK(d == 64 || d == 128, op, ": head_dim must be 64 or 128, got ", d);
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k has shape ", k.sizes(), " but v has ", v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == d, op, ": q has shape ", q.sizes(), ", k ", k.sizes(),
              ": batch and head_dim must match");
  TORCH_CHECK(k.size(2) > 0 && q.size(2) % k.size(2) == 0, op, ": query heads ", q.size(2),
              " are not a multiple of kv heads ", k.size(2));
  // launch grids: heads in x, sequence tiles in y (at most 65535 tiles of 64), batch in z
  TORCH_CHECK(q.size(1) <= (int64_t(1) << 22) && k.size(1) <= (int64_t(1) << 22), op,
              ": sequences up to 4194304 tokens, got ", q.size(1), " queries and ", k.size(1), " keys");
  TORCH_CHECK(q.size(0) <= 65535, op, ": batch up to 65535, got ", q.size(0));
  TORCH_CHECK(scale > 0, op, ": softmax_scale must be > 0, got ", scale);
  TORCH_CHECK(lo.has_value() == hi.has_value(), op, ": the lower and upper document ranges go together");
  if (lo) {
    check_aux(*lo, at::kInt, {q.size(0), range_len}, q, op, "document range (lo)");
    check_aux(*hi, at::kInt, {q.size(0), range_len}, q, op, "document range (hi)");
  }
}

using AttnForwardLauncher = void (*)(const torch::Tensor&, const torch::Tensor&, const torch::Tensor&, torch::Tensor&,
                                     torch::Tensor&, const c10::optional<torch::Tensor>&,
                                     const c10::optional<torch::Tensor>&, bool, double);

// [out, lse] of one of the forward kernels (they share arguments, checks and results).
std::vector<torch::Tensor> attention_forward(AttnForwardLauncher launch, const char* op, const torch::Tensor& q_in,
                                             const torch::Tensor& k_in, const torch::Tensor& v_in, bool causal,
                                             double scale, const c10::optional<torch::Tensor>& key_lo,
                                             const c10::optional<torch::Tensor>& key_hi) {
  check_attn(q_in, k_in, v_in, key_lo, key_hi, q_in.size(1), scale, op);
  auto q = attn_rows(q_in), k = attn_rows(k_in), v = attn_rows(v_in);
  auto out = attn_empty_like(q);
  auto lse = torch::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse};
  if (k.size(1) == 0) {
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  launch(q, k, v, out, lse, key_lo, key_hi, causal, scale);
  return {out, lse};
}

std::vector<torch::Tensor> flash_attention_forward(const torch::Tensor& q, const torch::Tensor& k,
                                                   const torch::Tensor& v, bool causal, double scale,
                                                   const c10::optional<torch::Tensor>& key_lo,
                                                   const c10::optional<torch::Tensor>& key_hi) {
  return attention_forward(flash_attn_forward_cuda, "flash_attention_forward", q, k, v, causal, scale, key_lo,
                           key_hi);
}

// The Hopper kernel (flash_attn_sm90.cu: TMA, wgmma, warp specialisation); same results, sm_90 only.
std::vector<torch::Tensor> flash_attention_forward_sm90(const torch::Tensor& q, const torch::Tensor& k,
                                                        const torch::Tensor& v, bool causal, double scale,
                                                        const c10::optional<torch::Tensor>& key_lo,
                                                        const c10::optional<torch::Tensor>& key_hi) {
  return attention_forward(flash_attn_forward_sm90_cuda, "flash_attention_forward_sm90", q, k, v, causal, scale,
                           key_lo, key_hi);
}

// [dq, dk, dv] of one of the backward kernels (they share arguments, checks and results): the FA2-style
// kernel of flash_attn.cu or, with `sm90`, the Hopper kernel of flash_attn_sm90_bwd.cu. dlse: the
// gradient arriving at lse (optional; context parallelism merges partial outputs with lse).
std::vector<torch::Tensor> attention_backward(bool sm90, const char* op, const torch::Tensor& dout_in,
                                              const torch::Tensor& q_in, const torch::Tensor& k_in,
                                              const torch::Tensor& v_in, const torch::Tensor& out_in,
                                              const torch::Tensor& lse, const c10::optional<torch::Tensor>& dlse,
                                              bool causal, double scale, const c10::optional<torch::Tensor>& query_lo,
                                              const c10::optional<torch::Tensor>& query_hi) {
  check_attn(q_in, k_in, v_in, query_lo, query_hi, k_in.size(1), scale, op);
  for (auto [t, name] : {std::pair{&dout_in, "dout"}, std::pair{&out_in, "out"}}) {
    TORCH_CHECK(t->is_cuda() && t->device() == q_in.device() && t->scalar_type() == at::kBFloat16, op, ": ", name,
                " must be a bfloat16 CUDA tensor on ", q_in.device());
    check_shape(*t, q_in.sizes(), op, name);
  }
  const int64_t b = q_in.size(0), sq = q_in.size(1), hq = q_in.size(2), d = q_in.size(3), sk = k_in.size(1),
                hkv = k_in.size(2);
  check_aux(lse, at::kFloat, {b, hq, sq}, q_in, op, "lse");
  if (dlse) check_aux(*dlse, at::kFloat, {b, hq, sq}, q_in, op, "dlse");
  auto q = attn_rows(q_in), k = attn_rows(k_in), v = attn_rows(v_in), dout = attn_rows(dout_in),
       out = attn_rows(out_in);
  auto dq = attn_empty_like(q);
  if (q.numel() == 0 || k.numel() == 0) {
    return {dq.zero_(), attn_empty_like(k).zero_(), attn_empty_like(v).zero_()};
  }
  auto f32 = q.options().dtype(at::kFloat);
  torch::Tensor delta;
  if (!sm90) {
    delta = torch::empty({b, hq, sq}, f32);
    flash_attn_delta_cuda(out, dout, dlse, delta);
  }
  auto dq_acc = torch::zeros({b, sq, hq, d}, f32);
  auto launch = [&](torch::Tensor& dk_out, torch::Tensor& dv_out, bool partial) {
    if (sm90)
      flash_attn_backward_sm90_cuda(dout, q, k, v, out, lse, dlse, dq_acc, dk_out, dv_out, query_lo, query_hi, causal,
                                    scale, partial);
    else
      flash_attn_backward_cuda(dout, q, k, v, lse, delta, dq_acc, dk_out, dv_out, query_lo, query_hi, causal, scale,
                               partial);
  };
  const bool partial = hq != hkv;
  torch::Tensor dk, dv;
  if (partial) {
    auto dk_part = torch::empty({b, sk, hq, d}, f32), dv_part = torch::empty({b, sk, hq, d}, f32);
    launch(dk_part, dv_part, true);
    dk = attn_empty_like(k);
    dv = torch::empty_strided(dk.sizes(), dk.strides(), dk.options());
    dk.copy_(dk_part.view({b, sk, hkv, hq / hkv, d}).sum(3));
    dv.copy_(dv_part.view({b, sk, hkv, hq / hkv, d}).sum(3));
  } else {
    dk = attn_empty_like(k);
    dv = torch::empty_strided(dk.sizes(), dk.strides(), dk.options());
    launch(dk, dv, false);
  }
  dq.copy_(dq_acc.mul_(scale));
  return {dq, dk, dv};
}

std::vector<torch::Tensor> flash_attention_backward(const torch::Tensor& dout, const torch::Tensor& q,
                                                    const torch::Tensor& k, const torch::Tensor& v,
                                                    const torch::Tensor& out, const torch::Tensor& lse,
                                                    const c10::optional<torch::Tensor>& dlse, bool causal,
                                                    double scale, const c10::optional<torch::Tensor>& query_lo,
                                                    const c10::optional<torch::Tensor>& query_hi) {
  return attention_backward(false, "flash_attention_backward", dout, q, k, v, out, lse, dlse, causal, scale, query_lo,
                            query_hi);
}

// The Hopper kernel (flash_attn_sm90_bwd.cu: TMA, wgmma, warp specialisation); same results, sm_90 only.
std::vector<torch::Tensor> flash_attention_backward_sm90(const torch::Tensor& dout, const torch::Tensor& q,
                                                         const torch::Tensor& k, const torch::Tensor& v,
                                                         const torch::Tensor& out, const torch::Tensor& lse,
                                                         const c10::optional<torch::Tensor>& dlse, bool causal,
                                                         double scale, const c10::optional<torch::Tensor>& query_lo,
                                                         const c10::optional<torch::Tensor>& query_hi) {
  return attention_backward(true, "flash_attention_backward_sm90", dout, q, k, v, out, lse, dlse, causal, scale,
                            query_lo, query_hi);
}

// ---- FP8 (e4m3) quantisation of x [R, C] along its rows, bit for bit as ops/fp8.py's quantize,
// and of x^T [C, R] along x's columns. Returns [data, scale_inv] (+ [data_t, scale_inv_t]):
//   "row"     scale_inv [R, 1]                          (scale_inv_t [C, 1])
//   "1x128"   scale_inv [R, ceil(C/128)], column-major  (scale_inv_t [C, ceil(R/128)], column-major)
//   "tensor"  scale_inv [] (data_t shares it)
// A group with no elements (a row when C = 0, an empty tensor) takes the scale of amax = 0.

torch::Tensor fp8_input(const torch::Tensor& x_in, const char* op) {
  TORCH_CHECK(x_in.dim() == 2, op, ": x must be 2-D [rows, cols], got shape ", x_in.sizes());
  auto x = x_in.contiguous();
  check_input(x, op, "x");
  return x;
}

// 1 / ((1 / 1e-12) * 448) in fp32, each step rounded to nearest as the kernels round it: the
// scale_inv of an all-zero (or empty) group.
float fp8_floor_scale_inv() {
  const float scale = (1.0f / 1e-12f) * 448.0f;
  return 1.0f / scale;
}

// scale_inv of a [rows, cols] quantisation: [rows, 1] ("row"), or [rows, ceil(cols / 128)] column-major
// ("1x128": [n, rows] storage seen as [rows, n]).
torch::Tensor fp8_scale_inv(const torch::Tensor& like, int64_t rows, int64_t cols, const std::string& tiling) {
  const auto f32 = like.options().dtype(at::kFloat);
  return tiling == "row" ? torch::empty({rows, 1}, f32) : torch::empty({(cols + 127) / 128, rows}, f32).t();
}

std::vector<torch::Tensor> fp8_quantize(const torch::Tensor& x_in, const std::string& tiling, bool with_transpose) {
  const char* op = "fp8_quantize";
  TORCH_CHECK(tiling == "row" || tiling == "1x128", op, ": tiling must be \"row\" or \"1x128\", got \"", tiling, "\"");
  auto x = fp8_input(x_in, op);
  const int64_t r = x.size(0), c = x.size(1);
  const auto e4m3 = x.options().dtype(at::kFloat8_e4m3fn);
  auto data = torch::empty({r, c}, e4m3);
  auto sinv = fp8_scale_inv(x, r, c, tiling);
  c10::optional<torch::Tensor> data_t, sinv_t, amax;
  if (with_transpose) {
    data_t = torch::empty({c, r}, e4m3);
    sinv_t = fp8_scale_inv(x, c, r, tiling);
    if (tiling == "row") amax = torch::zeros({r + c}, x.options().dtype(at::kInt));
  }
  if (x.numel() > 0) {
    fp8_quantize_cuda(x, tiling, data, sinv, data_t, sinv_t, amax);
  } else {
    sinv.fill_(fp8_floor_scale_inv());
    if (sinv_t) sinv_t->fill_(fp8_floor_scale_inv());
  }
  if (with_transpose) return {data, sinv, *data_t, *sinv_t};
  return {data, sinv};
}

std::vector<torch::Tensor> fp8_quantize_tensorwise(const torch::Tensor& x_in, bool with_transpose) {
  const char* op = "fp8_quantize_tensorwise";
  auto x = fp8_input(x_in, op);
  const int64_t r = x.size(0), c = x.size(1);
  const auto e4m3 = x.options().dtype(at::kFloat8_e4m3fn);
  auto data = torch::empty({r, c}, e4m3);
  auto sinv = torch::empty({}, x.options().dtype(at::kFloat));
  c10::optional<torch::Tensor> data_t;
  if (with_transpose) data_t = torch::empty({c, r}, e4m3);
  if (x.numel() > 0) {
    c10::optional<torch::Tensor> amax = torch::zeros({1}, x.options().dtype(at::kInt));
    fp8_quantize_cuda(x, "tensor", data, sinv, data_t, c10::nullopt, amax);
  } else {
    sinv.fill_(fp8_floor_scale_inv());
  }
  if (with_transpose) return {data, sinv, *data_t};
  return {data, sinv};
}

// ---- Ops that hand their output to an FP8 linear layer already quantised (docs/architecture.md,
// "FP8"): y [rows, cols] is never written; the result is fp8_quantize's (or fp8_quantize_tensorwise's)
// with the transpose for y padded with zero rows to rows_pad: [data [rows_pad, cols], scale_inv,
// data_t [cols, rows_pad](, scale_inv_t unless "tensor")]. Where the fused kernels do not serve the
// input, y is made (padded) and quantised by the separate kernels: the same values.

struct Fp8Outputs {
  torch::Tensor data, sinv, data_t, amax;
  c10::optional<torch::Tensor> sinv_t;

  std::vector<torch::Tensor> list() const {
    if (sinv_t) return {data, sinv, data_t, *sinv_t};
    return {data, sinv, data_t};
  }
};

Fp8Outputs fp8_outputs(const torch::Tensor& x, const std::string& tiling, int64_t rows_pad, int64_t cols,
                       const char* op) {
  TORCH_CHECK(tiling == "tensor" || tiling == "row" || tiling == "1x128", op,
              ": tiling must be \"tensor\", \"row\" or \"1x128\", got \"", tiling, "\"");
  const auto e4m3 = x.options().dtype(at::kFloat8_e4m3fn), i32 = x.options().dtype(at::kInt);
  Fp8Outputs o;
  o.data = torch::empty({rows_pad, cols}, e4m3);
  o.data_t = torch::empty({cols, rows_pad}, e4m3);
  if (tiling == "tensor") {
    o.sinv = torch::empty({}, x.options().dtype(at::kFloat));
    o.amax = torch::zeros({1}, i32);
  } else {
    o.sinv = fp8_scale_inv(x, rows_pad, cols, tiling);
    o.sinv_t = fp8_scale_inv(x, cols, rows_pad, tiling);
    o.amax = tiling == "row" ? torch::zeros({rows_pad + cols}, i32) : torch::empty({0}, i32);
  }
  return o;
}

// The composed path: y [rows_pad, cols] with its rows past `rows` zero, made by `make(y_rows)`, then
// quantised with the transpose.
template <typename F>
void quantize_made(const torch::Tensor& x, int64_t rows, int64_t rows_pad, int64_t cols, const std::string& tiling,
                   Fp8Outputs& o, F make) {
  auto y = torch::empty({rows_pad, cols}, x.options());
  if (rows_pad > rows) y.narrow(0, rows, rows_pad - rows).zero_();
  auto y_rows = y.narrow(0, 0, rows);
  make(y_rows);
  fp8_quantize_cuda(y, tiling, o.data, o.sinv, o.data_t, o.sinv_t,
                    tiling == "1x128" ? c10::optional<torch::Tensor>() : c10::optional<torch::Tensor>(o.amax));
}

int64_t check_rows_pad(int64_t rows, int64_t rows_pad, const char* op) {
  TORCH_CHECK(rows > 0, op, ": x has no rows");
  TORCH_CHECK(rows_pad >= rows, op, ": rows_pad ", rows_pad, " is below the ", rows, " rows of x");
  return rows_pad;
}

// RMSNorm (fused with the residual add when given) of x [rows, h] quantised: the list above, then
// rstd (and x + residual).
std::vector<torch::Tensor> rms_norm_fp8_forward(const torch::Tensor& x, const c10::optional<torch::Tensor>& residual,
                                                const torch::Tensor& w, double eps, const std::string& tiling,
                                                int64_t rows_pad) {
  const char* op = "rms_norm_fp8_forward";
  check_rms_norm_inputs(x, residual, w, eps, op);
  TORCH_CHECK(x.size(1) > 0, op, ": x has no columns");
  const int64_t rows = x.size(0), h = x.size(1);
  check_rows_pad(rows, rows_pad, op);
  auto o = fp8_outputs(x, tiling, rows_pad, h, op);
  auto rstd = torch::empty({rows}, x.options().dtype(at::kFloat));
  c10::optional<torch::Tensor> sum_out;
  if (residual) sum_out = torch::empty_like(x);
  if (!rms_norm_fp8_forward_cuda(x, residual, w, sum_out, rstd, tiling, o.data, o.sinv, o.data_t, o.sinv_t, o.amax,
                                 rows, rows_pad, h, eps)) {
    quantize_made(x, rows, rows_pad, h, tiling, o,
                  [&](torch::Tensor& y) { rms_norm_forward_cuda(x, residual, w, y, sum_out, rstd, rows, h, eps); });
  }
  auto out = o.list();
  out.push_back(rstd);
  if (sum_out) out.push_back(*sum_out);
  return out;
}

// SwiGLU of x [rows, 2f] quantised: the list above.
std::vector<torch::Tensor> swiglu_fp8_forward(const torch::Tensor& x, const std::string& tiling, int64_t rows_pad) {
  const char* op = "swiglu_fp8_forward";
  check_input(x, op, "x");
  TORCH_CHECK(x.dim() == 2 && x.size(1) > 0, op, ": x must be 2-D [rows, 2f], got shape ", x.sizes());
  const int64_t f = half_last_dim(x, op), rows = x.size(0);
  check_rows_pad(rows, rows_pad, op);
  auto o = fp8_outputs(x, tiling, rows_pad, f, op);
  if (!swiglu_fp8_cuda(x, tiling, o.data, o.sinv, o.data_t, o.sinv_t, o.amax, rows, rows_pad, f)) {
    quantize_made(x, rows, rows_pad, f, tiling, o, [&](torch::Tensor& y) { swiglu_forward_cuda(x, y, rows, f); });
  }
  return o.list();
}

// FP8 codes x [R, C] or [G, R, C] (contiguous) -> the contiguous transpose of each matrix.
torch::Tensor fp8_transpose(const torch::Tensor& x) {
  const char* op = "fp8_transpose";
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor");
  TORCH_CHECK(x.is_contiguous(), op, ": x must be contiguous");
  TORCH_CHECK(x.element_size() == 1, op, ": x must hold 1-byte FP8 codes, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2 || x.dim() == 3, op, ": x must be [R, C] or [G, R, C], got shape ", x.sizes());
  auto shape = x.sizes().vec();
  std::swap(shape[shape.size() - 1], shape[shape.size() - 2]);
  auto y = torch::empty(shape, x.options());
  const int64_t groups = x.dim() == 3 ? x.size(0) : 1;
  if (x.numel() > 0) fp8_transpose_cuda(x, y, groups, x.size(-2), x.size(-1));
  return y;
}

// ---- out [M, N] (fp32) += a [M, K] @ b [N, K]^T on FP8 codes quantised along K (fp8_gemm.cpp): a
// and b row-major with unit column stride (a row stride of their own: column slices serve), scales
// in the layouts ops/fp8.py's Fp8Tensor names for each tiling.

void check_fp8_operand(const torch::Tensor& x, const torch::Tensor& scale_inv, const std::string& tiling,
                       const char* name) {
  const char* op = "fp8_gemm_accumulate";
  TORCH_CHECK(x.is_cuda() && x.dim() == 2, op, ": ", name, " must be a 2-D CUDA tensor, got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat8_e4m3fn || x.scalar_type() == at::kFloat8_e5m2, op, ": ", name,
              " must be float8_e4m3fn or float8_e5m2, got ", x.scalar_type());
  TORCH_CHECK(x.stride(1) == 1 && x.stride(0) >= x.size(1) && x.stride(0) % 16 == 0, op, ": ", name,
              " must be row-major with a row stride that is a multiple of 16, got strides ", x.strides());
  TORCH_CHECK(scale_inv.is_cuda() && scale_inv.scalar_type() == at::kFloat, op, ": ", name,
              "'s scale_inv must be a float32 CUDA tensor");
  const int64_t rows = x.size(0), blocks = (x.size(1) + 127) / 128;
  int64_t expected = 0;
  bool layout = true;
  if (tiling == "tensor") {
    expected = 1;
  } else if (tiling == "row") {
    expected = rows;
    layout = scale_inv.is_contiguous();
  } else if (tiling == "1x128") {
    expected = rows * blocks;
    layout = scale_inv.dim() == 2 && scale_inv.stride(0) == 1 && scale_inv.stride(1) == rows;
  } else if (tiling == "128x128") {
    expected = ((rows + 127) / 128) * blocks;
    layout = scale_inv.is_contiguous();
  } else {
    TORCH_CHECK(false, op, ": ", name, "'s tiling must be \"tensor\", \"row\", \"1x128\" or \"128x128\", got \"",
                tiling, "\"");
  }
  TORCH_CHECK(scale_inv.numel() == expected && layout, op, ": ", name, "'s ", tiling, " scale_inv of shape ",
              scale_inv.sizes(), " and strides ", scale_inv.strides(), " does not fit ", name, " of shape ", x.sizes());
}

void fp8_gemm_accumulate(const torch::Tensor& a, const torch::Tensor& a_scale_inv, const std::string& a_tiling,
                         const torch::Tensor& b, const torch::Tensor& b_scale_inv, const std::string& b_tiling,
                         torch::Tensor out) {
  const char* op = "fp8_gemm_accumulate";
  check_fp8_operand(a, a_scale_inv, a_tiling, "a");
  check_fp8_operand(b, b_scale_inv, b_tiling, "b");
  TORCH_CHECK(a.size(1) == b.size(1) && a.size(1) % 16 == 0, op, ": a ", a.sizes(), " and b ", b.sizes(),
              " must share K, a multiple of 16");
  TORCH_CHECK(out.is_cuda() && out.scalar_type() == at::kFloat && out.dim() == 2 && out.size(0) == a.size(0) &&
                  out.size(1) == b.size(0) && out.stride(1) == 1 && out.stride(0) >= out.size(1),
              op, ": out must be float32 [", a.size(0), ", ", b.size(0), "] with unit column stride, got ",
              out.scalar_type(), " ", out.sizes(), " strides ", out.strides());
  TORCH_CHECK(a.device() == out.device() && b.device() == out.device(), op, ": a, b and out must share a device");
  if (a.size(0) == 0 || b.size(0) == 0 || a.size(1) == 0) return;
  fp8_gemm_accumulate_cuda(a, a_scale_inv, a_tiling, b, b_scale_inv, b_tiling, out);
}
}  // namespace

#ifndef MQ2_HOPPER_KERNELS
#define MQ2_HOPPER_KERNELS 0  // setup.py sets it: 1 when the build targets sm_90a
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megatron_qwen2 CUDA kernels";
  m.def("version", [] { return std::string("megatron_qwen2._C 0.1.0"); }, "Extension version string.");
  // Whether the Hopper attention kernels were compiled (an sm_90a target); without them their ops trap.
  m.attr("hopper_kernels") = pybind11::bool_(MQ2_HOPPER_KERNELS != 0);
  m.def("swiglu_forward", &swiglu_forward, "silu(gate) * up for x = [..., gate | up] (CUDA, contiguous)",
        pybind11::arg("x"));
  m.def("swiglu_backward", &swiglu_backward, "dx of swiglu given x and dy", pybind11::arg("x"),
        pybind11::arg("dy"));
  m.def("rms_norm_forward", &rms_norm_forward, "[y, rstd(, x + residual)] of RMSNorm on x [rows, h]",
        pybind11::arg("x"), pybind11::arg("residual"), pybind11::arg("weight"), pybind11::arg("eps"));
  m.def("rms_norm_backward", &rms_norm_backward, "[dx, dweight] of RMSNorm (dsum: gradient arriving at x itself)",
        pybind11::arg("dy"), pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("rstd"), pybind11::arg("dsum"));
  m.def("permute_forward", &permute_forward, "expert-sorted copies of x's rows", pybind11::arg("x"),
        pybind11::arg("row_map"), pybind11::arg("k"), pybind11::arg("rows"));
  m.def("permute_backward", &permute_backward, "dx of permute_forward", pybind11::arg("dout"), pybind11::arg("row_map"),
        pybind11::arg("k"));
  m.def("unpermute_forward", &unpermute_forward, "probability-weighted sum of each token's expert rows",
        pybind11::arg("y"), pybind11::arg("row_map"), pybind11::arg("probs"));
  m.def("unpermute_backward", &unpermute_backward, "[dy, dprobs] of unpermute_forward", pybind11::arg("dout"),
        pybind11::arg("y"), pybind11::arg("row_map"), pybind11::arg("probs"));
  m.def("expert_rows", &expert_rows, "[row_map, tokens_per_expert] of a stable sort of routing ids by expert",
        pybind11::arg("ids"), pybind11::arg("experts"));
  m.def("rope", &rope_apply, "rotate-half RoPE (backward=True applies its transpose)", pybind11::arg("x"),
        pybind11::arg("cos"), pybind11::arg("sin"), pybind11::arg("backward"));
  m.def("cross_entropy_forward", &ce_forward, "[row max, sum exp(x - max), target logit] over a vocab shard",
        pybind11::arg("logits"), pybind11::arg("target"));
  m.def("cross_entropy_backward", &ce_backward, "(softmax - onehot) * grad from logits and the global lse",
        pybind11::arg("logits"), pybind11::arg("target"), pybind11::arg("lse"), pybind11::arg("grad"));
  m.def("flash_attention_forward", &flash_attention_forward,
        "[out, lse] of causal / packed-document GQA attention on bf16 [b, s, heads, d] views",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("causal"), pybind11::arg("scale"),
        pybind11::arg("key_lo"), pybind11::arg("key_hi"));
  m.def("flash_attention_forward_sm90", &flash_attention_forward_sm90,
        "flash_attention_forward by the Hopper kernel (TMA, wgmma, warp specialisation; compute capability 9.0)",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("causal"), pybind11::arg("scale"),
        pybind11::arg("key_lo"), pybind11::arg("key_hi"));
  m.def("flash_attention_backward", &flash_attention_backward,
        "[dq, dk, dv] of flash_attention_forward from out, lse (and an optional lse gradient)",
        pybind11::arg("dout"), pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("out"),
        pybind11::arg("lse"), pybind11::arg("dlse"), pybind11::arg("causal"), pybind11::arg("scale"),
        pybind11::arg("query_lo"), pybind11::arg("query_hi"));
  m.def("flash_attention_backward_sm90", &flash_attention_backward_sm90,
        "flash_attention_backward by the Hopper kernel (TMA, wgmma, warp specialisation; compute capability 9.0)",
        pybind11::arg("dout"), pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("out"),
        pybind11::arg("lse"), pybind11::arg("dlse"), pybind11::arg("causal"), pybind11::arg("scale"),
        pybind11::arg("query_lo"), pybind11::arg("query_hi"));
  m.def("fp8_quantize", &fp8_quantize,
        "[data, scale_inv(, data_t, scale_inv_t)] of the e4m3 quantisation of x [R, C] along rows (and of x^T)",
        pybind11::arg("x"), pybind11::arg("tiling"), pybind11::arg("with_transpose"));
  m.def("fp8_quantize_tensorwise", &fp8_quantize_tensorwise,
        "[data, scale_inv [](, data_t)] of the e4m3 quantisation of x [R, C] with one scale (amax on the device)",
        pybind11::arg("x"), pybind11::arg("with_transpose"));
  m.def("rms_norm_fp8_forward", &rms_norm_fp8_forward,
        "[data, scale_inv, data_t(, scale_inv_t), rstd(, x + residual)]: RMSNorm of x [rows, h] quantised as "
        "fp8_quantize with the transpose, rows zero-padded to rows_pad, y never written",
        pybind11::arg("x"), pybind11::arg("residual"), pybind11::arg("weight"), pybind11::arg("eps"),
        pybind11::arg("tiling"), pybind11::arg("rows_pad"));
  m.def("swiglu_fp8_forward", &swiglu_fp8_forward,
        "[data, scale_inv, data_t(, scale_inv_t)]: silu(gate) * up of x [rows, 2f] quantised as fp8_quantize with "
        "the transpose, rows zero-padded to rows_pad, y never written",
        pybind11::arg("x"), pybind11::arg("tiling"), pybind11::arg("rows_pad"));
  m.def("fp8_transpose", &fp8_transpose, "the contiguous transpose of FP8 codes x [R, C] or of each [R, C] of [G, R, C]",
        pybind11::arg("x"));
  m.def("fp8_gemm_accumulate", &fp8_gemm_accumulate,
        "out [M, N] (float32) += a [M, K] @ b [N, K]^T on FP8 codes with their scales, one cuBLASLt GEMM (beta 1)",
        pybind11::arg("a"), pybind11::arg("a_scale_inv"), pybind11::arg("a_tiling"), pybind11::arg("b"),
        pybind11::arg("b_scale_inv"), pybind11::arg("b_tiling"), pybind11::arg("out"));
}
