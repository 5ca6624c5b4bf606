// The one binding file of megatron_qwen2._C: every kernel's entry points, with docstrings.

#include <torch/extension.h>

torch::Tensor swiglu_forward(const torch::Tensor& x);
torch::Tensor swiglu_backward(const torch::Tensor& x, const torch::Tensor& dy);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megatron_qwen2 CUDA kernels";
  m.def("version", [] { return std::string("megatron_qwen2._C 0.1.0"); }, "Extension version string.");
  m.def("swiglu_forward", &swiglu_forward, "silu(gate) * up for x = [..., gate | up] (CUDA, contiguous)",
        pybind11::arg("x"));
  m.def("swiglu_backward", &swiglu_backward, "dx of swiglu given x and dy", pybind11::arg("x"),
        pybind11::arg("dy"));
}
