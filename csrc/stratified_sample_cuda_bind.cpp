// Torch binding of the stratified_sample CUDA kernels: checks, allocation, stream, launch status.
// Registers the same schemas as the CPU extension under the fastomni_cuda namespace.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "stratified_sample_cuda.cuh"
#include "stratified_sample_schema.h"

namespace {

void check_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
              " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_launch(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, what, " launch failed: ", cudaGetErrorString(status));
}

std::tuple<at::Tensor, at::Tensor> stratified_sample_fwd(const at::Tensor& px, const std::optional<at::Tensor>& noise,
                                                         int64_t h, int64_t w, int64_t num_samples,
                                                         double min_depth, double max_depth) {
  check_tensor(px, "px");
  TORCH_CHECK(px.dim() == 2 && px.size(1) == 2, "px must have shape [R, 2], got ", px.sizes());
  TORCH_CHECK(h >= 2 && w >= 2, "image size must be at least 2x2, got h=", h, ", w=", w);
  TORCH_CHECK(num_samples >= 1, "num_samples must be >= 1, got ", num_samples);
  const int64_t R = px.size(0), K = num_samples;
  if (noise.has_value()) {
    check_tensor(*noise, "noise");
    TORCH_CHECK(noise->scalar_type() == px.scalar_type() && noise->device() == px.device(),
                "noise must match px's dtype and device");
    TORCH_CHECK(noise->dim() == 2 && noise->size(0) == R && noise->size(1) == K, "noise must have shape [", R, ", ",
                K, "], got ", noise->sizes());
  }
  const c10::cuda::CUDAGuard guard(px.device());
  at::Tensor points = at::empty({R, K, 3}, px.options()), depths = at::empty({R, K, 1}, px.options());
  AT_DISPATCH_FLOATING_TYPES(px.scalar_type(), "stratified_sample_fwd_cuda", [&] {
    check_launch(fastomni::stratified_sample_cuda::stratified_sample_fwd<scalar_t>(
                     px.data_ptr<scalar_t>(), noise.has_value() ? noise->data_ptr<scalar_t>() : nullptr,
                     points.data_ptr<scalar_t>(), depths.data_ptr<scalar_t>(), R, K, h, w, min_depth, max_depth,
                     c10::cuda::getCurrentCUDAStream()),
                 "stratified_sample_fwd");
  });
  return {points, depths};
}

at::Tensor stratified_sample_bwd(const at::Tensor& grad_points, int64_t h, int64_t w) {
  check_tensor(grad_points, "grad_points");
  TORCH_CHECK(grad_points.dim() == 3 && grad_points.size(2) == 3, "grad_points must have shape [R, K, 3], got ",
              grad_points.sizes());
  TORCH_CHECK(h >= 2 && w >= 2, "image size must be at least 2x2, got h=", h, ", w=", w);
  const c10::cuda::CUDAGuard guard(grad_points.device());
  const int64_t R = grad_points.size(0), K = grad_points.size(1);
  at::Tensor grad_px = at::empty({R, 2}, grad_points.options());
  AT_DISPATCH_FLOATING_TYPES(grad_points.scalar_type(), "stratified_sample_bwd_cuda", [&] {
    check_launch(fastomni::stratified_sample_cuda::stratified_sample_bwd<scalar_t>(
                     grad_points.data_ptr<scalar_t>(), grad_px.data_ptr<scalar_t>(), R, K, h, w,
                     c10::cuda::getCurrentCUDAStream()),
                 "stratified_sample_bwd");
  });
  return grad_px;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastomni_cuda, m) {
  m.def(fastomni::schema::kStratifiedSampleFwd);
  m.def(fastomni::schema::kStratifiedSampleBwd);
}

TORCH_LIBRARY_IMPL(fastomni_cuda, CUDA, m) {
  m.impl("stratified_sample_fwd", &stratified_sample_fwd);
  m.impl("stratified_sample_bwd", &stratified_sample_bwd);
}
