// Torch binding of the composite CUDA kernels: checks, allocation, stream, launch status. Registers the
// same schemas as the CPU extension under the fastomni_cuda namespace.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "composite_cuda.cuh"
#include "composite_schema.h"

namespace {

void check_cuda(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), ", density on ", like.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " dtype ", t.scalar_type(), " differs from ",
              like.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_inputs(const at::Tensor& density, const at::Tensor& colors, const at::Tensor& points,
                  const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(density.scalar_type() == at::kFloat || density.scalar_type() == at::kDouble,
              "density must be float32 or float64, got ", density.scalar_type());
  TORCH_CHECK(density.dim() == 2 && density.size(1) >= 1, "density must have shape [R, K>=1], got ",
              density.sizes());
  const int64_t R = density.size(0), K = density.size(1);
  TORCH_CHECK(colors.dim() == 3 && colors.size(0) == R && colors.size(1) == K,
              "colors must have shape [", R, ", ", K, ", C], got ", colors.sizes());
  TORCH_CHECK(points.dim() == 3 && points.size(0) == R && points.size(1) == K,
              "points must have shape [", R, ", ", K, ", D], got ", points.sizes());
  check_cuda(density, density, "density");
  check_cuda(colors, density, "colors");
  check_cuda(points, density, "points");
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->sizes() == density.sizes() && mask->is_contiguous() &&
                    mask->device() == density.device(),
                "mask must be a contiguous bool tensor of shape ", density.sizes(), " on ", density.device());
  }
}

void check_launch(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, what, " launch failed: ", cudaGetErrorString(status));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> composite_fwd(
    const at::Tensor& density, const at::Tensor& colors, const at::Tensor& points,
    const std::optional<at::Tensor>& mask, bool select_max) {
  check_inputs(density, colors, points, mask);
  const c10::cuda::CUDAGuard guard(density.device());
  const int64_t R = density.size(0), K = density.size(1), C = colors.size(2), D = points.size(2);
  const auto opts = density.options();
  at::Tensor weights = at::empty({R, K}, opts), alphas = at::empty({R, K}, opts);
  at::Tensor rgb = at::empty({R, C}, opts), point = at::empty({R, D}, opts), opacity = at::empty({R, 1}, opts);
  const bool* mk = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(density.scalar_type(), "composite_fwd_cuda", [&] {
    check_launch(fastomni::composite_cuda::composite_fwd<scalar_t>(
                     density.data_ptr<scalar_t>(), colors.data_ptr<scalar_t>(), points.data_ptr<scalar_t>(), mk,
                     weights.data_ptr<scalar_t>(), alphas.data_ptr<scalar_t>(), rgb.data_ptr<scalar_t>(),
                     point.data_ptr<scalar_t>(), opacity.data_ptr<scalar_t>(), R, K, static_cast<int>(C),
                     static_cast<int>(D), select_max, c10::cuda::getCurrentCUDAStream()),
                 "composite_fwd");
  });
  return {weights, alphas, rgb, point, opacity};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> composite_bwd(
    const at::Tensor& grad_weights, const at::Tensor& grad_alphas, const at::Tensor& grad_rgb,
    const at::Tensor& grad_point, const at::Tensor& grad_opacity, const at::Tensor& density,
    const at::Tensor& colors, const at::Tensor& points, const std::optional<at::Tensor>& mask,
    bool select_max) {
  check_inputs(density, colors, points, mask);
  const int64_t R = density.size(0), K = density.size(1), C = colors.size(2), D = points.size(2);
  for (const auto& [g, shape, name] :
       {std::make_tuple(&grad_weights, std::vector<int64_t>{R, K}, "grad_weights"),
        std::make_tuple(&grad_alphas, std::vector<int64_t>{R, K}, "grad_alphas"),
        std::make_tuple(&grad_rgb, std::vector<int64_t>{R, C}, "grad_rgb"),
        std::make_tuple(&grad_point, std::vector<int64_t>{R, D}, "grad_point"),
        std::make_tuple(&grad_opacity, std::vector<int64_t>{R, 1}, "grad_opacity")}) {
    TORCH_CHECK(g->sizes() == at::IntArrayRef(shape), name, " must have shape ", shape, ", got ", g->sizes());
    check_cuda(*g, density, name);
  }
  const c10::cuda::CUDAGuard guard(density.device());
  at::Tensor grad_density = at::empty({R, K}, density.options());
  at::Tensor grad_colors = at::empty({R, K, C}, density.options());
  at::Tensor grad_points = at::empty({R, K, D}, density.options());
  const bool* mk = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(density.scalar_type(), "composite_bwd_cuda", [&] {
    check_launch(fastomni::composite_cuda::composite_bwd<scalar_t>(
                     grad_weights.data_ptr<scalar_t>(), grad_alphas.data_ptr<scalar_t>(),
                     grad_rgb.data_ptr<scalar_t>(), grad_point.data_ptr<scalar_t>(),
                     grad_opacity.data_ptr<scalar_t>(), density.data_ptr<scalar_t>(), colors.data_ptr<scalar_t>(),
                     points.data_ptr<scalar_t>(), mk, grad_density.data_ptr<scalar_t>(),
                     grad_colors.data_ptr<scalar_t>(), grad_points.data_ptr<scalar_t>(), R, K, static_cast<int>(C),
                     static_cast<int>(D), select_max, c10::cuda::getCurrentCUDAStream()),
                 "composite_bwd");
  });
  return {grad_density, grad_colors, grad_points};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastomni_cuda, m) {
  m.def(fastomni::schema::kCompositeFwd);
  m.def(fastomni::schema::kCompositeBwd);
}

TORCH_LIBRARY_IMPL(fastomni_cuda, CUDA, m) {
  m.impl("composite_fwd", &composite_fwd);
  m.impl("composite_bwd", &composite_bwd);
}
