// The one binding file of megatron_qwen2._C: argument checks and allocation live here (host
// C++), the kernels and their launchers in the .cu files.

#include <torch/extension.h>

void swiglu_forward_cuda(const torch::Tensor& x, torch::Tensor& y, int64_t rows, int64_t f);
void swiglu_backward_cuda(const torch::Tensor& x, const torch::Tensor& dy, torch::Tensor& dx, int64_t rows,
                          int64_t f);

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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megatron_qwen2 CUDA kernels";
  m.def("version", [] { return std::string("megatron_qwen2._C 0.1.0"); }, "Extension version string.");
  m.def("swiglu_forward", &swiglu_forward, "silu(gate) * up for x = [..., gate | up] (CUDA, contiguous)",
        pybind11::arg("x"));
  m.def("swiglu_backward", &swiglu_backward, "dx of swiglu given x and dy", pybind11::arg("x"),
        pybind11::arg("dy"));
}
