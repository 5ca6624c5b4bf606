// out [M, N] (fp32) += a [M, K] @ b [N, K]^T on FP8 operands, as one cuBLASLt GEMM with beta = 1:
// a weight gradient accumulated into main_grad where it is made, with no fp32 product beside it
// (docs/architecture.md, "FP8"). bindings.cpp checks the arguments.
//
// cuBLAS is column-major: out row-major [M, N] is out^T column-major [N, M] (ld N), the product
// op(A) op(B) with A = b (column-major [K, N], ld = b's row stride, transposed) and B = a (column-major
// [K, M], ld = a's row stride): the "TN" layout Hopper's FP8 GEMMs take. A's scales are b's, B's a's.

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublasLt.h>
#include <torch/extension.h>

namespace {

void check(cublasStatus_t status, const char* call) {
  TORCH_CHECK(status == CUBLAS_STATUS_SUCCESS, "fp8_gemm_accumulate: ", call, " failed: ",
              cublasLtGetStatusString(status));
}

cublasLtMatmulMatrixScale_t scale_mode(const std::string& tiling) {
  if (tiling == "tensor") return CUBLASLT_MATMUL_MATRIX_SCALE_SCALAR_32F;
  if (tiling == "row") return CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F;
  if (tiling == "1x128") return CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
  return CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F;  // "128x128" (bindings.cpp admits no other)
}

cudaDataType_t fp8_type(const torch::Tensor& t) {
  return t.scalar_type() == at::kFloat8_e5m2 ? CUDA_R_8F_E5M2 : CUDA_R_8F_E4M3;
}

// The largest power of two up to 256 bytes that divides the address: the heuristic is told each
// operand's alignment (a main_grad view may start anywhere in the flat gradient buffer).
uint32_t alignment_of(const void* ptr) {
  const auto address = reinterpret_cast<uintptr_t>(ptr);
  uint32_t align = 256;
  while (align > 1 && address % align != 0) align /= 2;
  return align;
}

struct MatmulDesc {
  cublasLtMatmulDesc_t desc = nullptr;
  MatmulDesc() { check(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), "cublasLtMatmulDescCreate"); }
  ~MatmulDesc() { cublasLtMatmulDescDestroy(desc); }
  template <typename T>
  void set(cublasLtMatmulDescAttributes_t attr, const T& value) {
    check(cublasLtMatmulDescSetAttribute(desc, attr, &value, sizeof(value)), "cublasLtMatmulDescSetAttribute");
  }
};

struct Layout {
  cublasLtMatrixLayout_t layout = nullptr;
  Layout(cudaDataType_t type, int64_t rows, int64_t cols, int64_t ld) {
    check(cublasLtMatrixLayoutCreate(&layout, type, rows, cols, ld), "cublasLtMatrixLayoutCreate");
  }
  ~Layout() { cublasLtMatrixLayoutDestroy(layout); }
};

struct Preference {
  cublasLtMatmulPreference_t pref = nullptr;
  Preference() { check(cublasLtMatmulPreferenceCreate(&pref), "cublasLtMatmulPreferenceCreate"); }
  ~Preference() { cublasLtMatmulPreferenceDestroy(pref); }
  template <typename T>
  void set(cublasLtMatmulPreferenceAttributes_t attr, const T& value) {
    check(cublasLtMatmulPreferenceSetAttribute(pref, attr, &value, sizeof(value)),
          "cublasLtMatmulPreferenceSetAttribute");
  }
};

constexpr size_t kWorkspaceBytes = 32 << 20;

}  // namespace

void fp8_gemm_accumulate_cuda(const torch::Tensor& a, const torch::Tensor& a_scale_inv, const std::string& a_tiling,
                              const torch::Tensor& b, const torch::Tensor& b_scale_inv, const std::string& b_tiling,
                              torch::Tensor& out) {
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t m = a.size(0), n = b.size(0), k = a.size(1);
  MatmulDesc desc;
  desc.set(CUBLASLT_MATMUL_DESC_TRANSA, CUBLAS_OP_T);
  desc.set(CUBLASLT_MATMUL_DESC_TRANSB, CUBLAS_OP_N);
  const void* a_scale = b_scale_inv.data_ptr();
  const void* b_scale = a_scale_inv.data_ptr();
  desc.set(CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, a_scale);
  desc.set(CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, b_scale);
  desc.set(CUBLASLT_MATMUL_DESC_A_SCALE_MODE, static_cast<int32_t>(scale_mode(b_tiling)));
  desc.set(CUBLASLT_MATMUL_DESC_B_SCALE_MODE, static_cast<int32_t>(scale_mode(a_tiling)));
  const Layout a_layout(fp8_type(b), k, n, b.stride(0));
  const Layout b_layout(fp8_type(a), k, m, a.stride(0));
  const Layout out_layout(CUDA_R_32F, n, m, out.stride(0));

  Preference pref;
  pref.set(CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, static_cast<uint64_t>(kWorkspaceBytes));
  pref.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, alignment_of(b.data_ptr()));
  pref.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, alignment_of(a.data_ptr()));
  pref.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, alignment_of(out.data_ptr()));
  pref.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, alignment_of(out.data_ptr()));

  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  cublasLtMatmulHeuristicResult_t heuristic = {};
  int found = 0;
  check(cublasLtMatmulAlgoGetHeuristic(handle, desc.desc, a_layout.layout, b_layout.layout, out_layout.layout,
                                       out_layout.layout, pref.pref, 1, &heuristic, &found),
        "cublasLtMatmulAlgoGetHeuristic");
  TORCH_CHECK(found > 0, "fp8_gemm_accumulate: cuBLASLt has no kernel for a [", m, ", ", k, "] ", a_tiling,
              " x b [", n, ", ", k, "] ", b_tiling, " into fp32 out (ld ", out.stride(0), ")");
  auto workspace = torch::empty({static_cast<int64_t>(kWorkspaceBytes)}, out.options().dtype(at::kByte));
  const float alpha = 1.0f, beta = 1.0f;
  check(cublasLtMatmul(handle, desc.desc, &alpha, b.data_ptr(), a_layout.layout, a.data_ptr(), b_layout.layout, &beta,
                       out.data_ptr(), out_layout.layout, out.data_ptr(), out_layout.layout, &heuristic.algo,
                       workspace.data_ptr(), kWorkspaceBytes, at::cuda::getCurrentCUDAStream()),
        "cublasLtMatmul");
}
