// Torch binding of the affine_coupling CUDA kernels: checks, allocation, stream, launch status.
// Registers the same schemas as the CPU extension under the fastomni_cuda namespace.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "affine_coupling_checks.h"
#include "affine_coupling_cuda.cuh"
#include "affine_coupling_schema.h"

namespace {

namespace k = fastomni::affine_coupling_cuda;

// The layer's tensors, contiguous: y, code_bias, proj_w, proj_b, in_w, w1, b1, w2, b2, out_w, out_b, sigma,
// then the transposes proj_w^T, in_w^T, w1^T, w2^T (the forward products' coalesced reads).
struct Layer {
  std::vector<at::Tensor> t;
  k::Sizes sizes;
};

Layer check(const at::Tensor& y, const at::Tensor& code_bias, const at::Tensor& proj_w, const at::Tensor& proj_b,
            const at::Tensor& in_w, at::TensorList hid_w, at::TensorList hid_b, const at::Tensor& out_w,
            const at::Tensor& out_b, const at::Tensor& sigma, int64_t transformed, bool inverse,
            double negative_slope) {
  const auto s = fastomni::affine_coupling::check_layer(y, code_bias, proj_w, proj_b, in_w, hid_w, hid_b, out_w,
                                                        out_b, sigma, transformed, negative_slope);
  TORCH_CHECK(y.is_cuda(), "affine_coupling (cuda): tensors must be CUDA tensors, got ", y.device());
  TORCH_CHECK(y.scalar_type() == at::kFloat || y.scalar_type() == at::kDouble,
              "affine_coupling (cuda): float32 or float64, got ", y.scalar_type());
  TORCH_CHECK(hid_w.size() == 2, "affine_coupling (cuda): the kernels take exactly 2 hidden layers, got ",
              hid_w.size());
  for (int64_t w : s.widths) {
    TORCH_CHECK(w <= k::kMaxWidth, "affine_coupling (cuda): layer widths must be <= ", k::kMaxWidth, ", got ", w);
  }
  TORCH_CHECK(s.n <= 65535, "affine_coupling (cuda): at most 65535 frames per call, got ", s.n);
  Layer layer;
  for (const at::Tensor& t : {y, code_bias, proj_w, proj_b, in_w, hid_w[0], hid_b[0], hid_w[1], hid_b[1], out_w,
                              out_b, sigma}) {
    layer.t.push_back(t.contiguous());
  }
  for (const at::Tensor& t : {proj_w, in_w, hid_w[0], hid_w[1]}) layer.t.push_back(t.t().contiguous());
  layer.sizes = {s.n,
                 s.P,
                 static_cast<int>(s.n_freq),
                 static_cast<int>(s.widths[0]),
                 static_cast<int>(s.widths[1]),
                 static_cast<int>(s.widths[2]),
                 static_cast<int>(s.widths[3]),
                 static_cast<int>(transformed),
                 inverse,
                 negative_slope};
  return layer;
}

template <typename T>
k::Weights<T> weights(const Layer& layer) {
  const auto p = [&](size_t i) { return layer.t[i].data_ptr<T>(); };
  return {p(2), p(3), p(4), p(5), p(6), p(7), p(8), p(9), p(10), p(11), p(12), p(13), p(14), p(15)};
}

void check_launch(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, what, " failed: ", cudaGetErrorString(status));
}

at::Tensor affine_coupling_fwd(const at::Tensor& y, const at::Tensor& code_bias, const at::Tensor& proj_w,
                               const at::Tensor& proj_b, const at::Tensor& in_w, at::TensorList hid_w,
                               at::TensorList hid_b, const at::Tensor& out_w, const at::Tensor& out_b,
                               const at::Tensor& sigma, int64_t transformed, bool inverse, double negative_slope) {
  const Layer layer = check(y, code_bias, proj_w, proj_b, in_w, hid_w, hid_b, out_w, out_b, sigma, transformed,
                            inverse, negative_slope);
  const c10::cuda::CUDAGuard guard(y.device());
  at::Tensor out = at::empty_like(layer.t[0]);
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "affine_coupling_fwd_cuda", [&] {
    check_launch(k::affine_coupling_fwd<scalar_t>(layer.t[0].data_ptr<scalar_t>(), layer.t[1].data_ptr<scalar_t>(),
                                                  weights<scalar_t>(layer), layer.sizes, out.data_ptr<scalar_t>(),
                                                  c10::cuda::getCurrentCUDAStream()),
                 "affine_coupling_fwd");
  });
  return out;
}

std::vector<at::Tensor> affine_coupling_bwd(const at::Tensor& grad_out, const at::Tensor& y,
                                            const at::Tensor& code_bias, const at::Tensor& proj_w,
                                            const at::Tensor& proj_b, const at::Tensor& in_w, at::TensorList hid_w,
                                            at::TensorList hid_b, const at::Tensor& out_w, const at::Tensor& out_b,
                                            const at::Tensor& sigma, int64_t transformed, bool inverse,
                                            double negative_slope) {
  const Layer layer = check(y, code_bias, proj_w, proj_b, in_w, hid_w, hid_b, out_w, out_b, sigma, transformed,
                            inverse, negative_slope);
  fastomni::affine_coupling::check_grad_out(grad_out, y);
  const c10::cuda::CUDAGuard guard(y.device());
  const at::Tensor go = grad_out.contiguous();
  // kernel order: y, code_bias, proj_w, proj_b, in_w, w1, b1, w2, b2, out_w, out_b (atomic sums start at 0)
  std::vector<at::Tensor> g = {at::empty_like(layer.t[0])};
  for (size_t i = 1; i <= 10; ++i) g.push_back(at::zeros_like(layer.t[i]));
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "affine_coupling_bwd_cuda", [&] {
    const auto p = [&](size_t i) { return g[i].data_ptr<scalar_t>(); };
    const k::Grads<scalar_t> grads{p(0), p(1), p(2), p(3), p(4), p(5), p(6), p(7), p(8), p(9), p(10)};
    check_launch(k::affine_coupling_bwd<scalar_t>(go.data_ptr<scalar_t>(), layer.t[0].data_ptr<scalar_t>(),
                                                  layer.t[1].data_ptr<scalar_t>(), weights<scalar_t>(layer),
                                                  layer.sizes, grads, c10::cuda::getCurrentCUDAStream()),
                 "affine_coupling_bwd");
  });
  // the op's order: y, code_bias, proj_w, proj_b, in_w, w1, w2, b1, b2, out_w, out_b
  return {g[0], g[1], g[2], g[3], g[4], g[5], g[7], g[6], g[8], g[9], g[10]};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastomni_cuda, m) {
  m.def(fastomni::schema::kAffineCouplingFwd);
  m.def(fastomni::schema::kAffineCouplingBwd);
}

TORCH_LIBRARY_IMPL(fastomni_cuda, CUDA, m) {
  m.impl("affine_coupling_fwd", &affine_coupling_fwd);
  m.impl("affine_coupling_bwd", &affine_coupling_bwd);
}
