// Ray sampling of OmniMotion's orthographic camera on the CPU (spec:
// fastomni/reference/stratified_sample.py).
//
// Forward: pixels px [R, 2] -> points [R, K, 3] = (x_n, y_n, depth_k) and depths [R, K, 1], with
// x_n = x / (w-1) * 2 - 1 and depth_k on linspace(min, max, K) (float32, then cast), jittered
// inside the interval between the midpoints to its neighbours by noise [R, K] when given.
// Backward: grad_px [R, 2] = sum_k grad_points[:, k, :2] * 2 / (w-1, h-1). One ray per loop
// iteration, rays split across threads by at::parallel_for; the depth grid and interval bounds are
// computed once per call.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linspace.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "stratified_sample_schema.h"

namespace {

// Rays per parallel chunk: a ray is ~K * 3 stores, so a chunk of this many samples amortizes the
// thread hand-off.
int64_t grain_rays(int64_t samples_per_ray) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, samples_per_ray));
}

void check_px(const at::Tensor& px, const char* name) {
  TORCH_CHECK(px.device().is_cpu(), name, " must be a CPU tensor, got ", px.device());
  TORCH_CHECK(px.scalar_type() == at::kFloat || px.scalar_type() == at::kDouble, name,
              " must be float32 or float64, got ", px.scalar_type());
  TORCH_CHECK(px.is_contiguous(), name, " must be contiguous");
}

void check_image(int64_t h, int64_t w) {
  TORCH_CHECK(h >= 2 && w >= 2, "image size must be at least 2x2, got h=", h, ", w=", w);
}

// The depth grid of the reference (depth_grid): torch.linspace in float32, then cast to scalar_t.
// Taken from at::linspace itself rather than re-derived: its rounding depends on the CPU's vector
// width, and float64 samples must carry the float32 grid's exact values, as the original's do.
template <typename scalar_t>
std::vector<scalar_t> depth_grid(int64_t K, double min_depth, double max_depth) {
  const at::Tensor grid = at::linspace(min_depth, max_depth, K, at::TensorOptions().dtype(at::kFloat));
  const float* g = grid.data_ptr<float>();
  return std::vector<scalar_t>(g, g + K);
}

std::tuple<at::Tensor, at::Tensor> stratified_sample_fwd(const at::Tensor& px,
                                                         const std::optional<at::Tensor>& noise,
                                                         int64_t h, int64_t w, int64_t num_samples,
                                                         double min_depth, double max_depth) {
  check_px(px, "px");
  check_image(h, w);
  TORCH_CHECK(px.dim() == 2 && px.size(1) == 2, "px must have shape [R, 2], got ", px.sizes());
  TORCH_CHECK(num_samples >= 1, "num_samples must be >= 1, got ", num_samples);
  const int64_t R = px.size(0), K = num_samples;
  const bool jitter = noise.has_value();
  if (jitter) {
    check_px(*noise, "noise");
    TORCH_CHECK(noise->scalar_type() == px.scalar_type(), "noise dtype ", noise->scalar_type(),
                " differs from px dtype ", px.scalar_type());
    TORCH_CHECK(noise->dim() == 2 && noise->size(0) == R && noise->size(1) == K,
                "noise must have shape [", R, ", ", K, "], got ", noise->sizes());
  }
  at::Tensor points = at::empty({R, K, 3}, px.options());
  at::Tensor depths = at::empty({R, K, 1}, px.options());
  AT_DISPATCH_FLOATING_TYPES(px.scalar_type(), "stratified_sample_fwd", [&] {
    const std::vector<scalar_t> grid = depth_grid<scalar_t>(K, min_depth, max_depth);
    // interval bounds: the midpoints to the neighbours, the grid itself at both ends
    std::vector<scalar_t> lower(grid), width(K, scalar_t(0));
    for (int64_t k = 0; k < K; ++k) {
      const scalar_t lo = k > 0 ? scalar_t(0.5) * (grid[k] + grid[k - 1]) : grid[0];
      const scalar_t hi = k + 1 < K ? scalar_t(0.5) * (grid[k + 1] + grid[k]) : grid[K - 1];
      lower[k] = lo;
      width[k] = hi - lo;
    }
    const scalar_t sx = static_cast<scalar_t>(w - 1), sy = static_cast<scalar_t>(h - 1);
    const scalar_t* p = px.data_ptr<scalar_t>();
    const scalar_t* u = jitter ? noise->data_ptr<scalar_t>() : nullptr;
    scalar_t* out = points.data_ptr<scalar_t>();
    scalar_t* dep = depths.data_ptr<scalar_t>();
    at::parallel_for(0, R, grain_rays(K), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t xn = p[2 * r] / sx * scalar_t(2) - scalar_t(1);
        const scalar_t yn = p[2 * r + 1] / sy * scalar_t(2) - scalar_t(1);
        for (int64_t k = 0; k < K; ++k) {
          const scalar_t d = jitter ? lower[k] + width[k] * u[r * K + k] : grid[k];
          scalar_t* o = out + (r * K + k) * 3;
          o[0] = xn;
          o[1] = yn;
          o[2] = d;
          dep[r * K + k] = d;
        }
      }
    });
  });
  return {points, depths};
}

at::Tensor stratified_sample_bwd(const at::Tensor& grad_points, int64_t h, int64_t w) {
  check_px(grad_points, "grad_points");
  check_image(h, w);
  TORCH_CHECK(grad_points.dim() == 3 && grad_points.size(2) == 3,
              "grad_points must have shape [R, K, 3], got ", grad_points.sizes());
  const int64_t R = grad_points.size(0), K = grad_points.size(1);
  at::Tensor grad_px = at::empty({R, 2}, grad_points.options());
  AT_DISPATCH_FLOATING_TYPES(grad_points.scalar_type(), "stratified_sample_bwd", [&] {
    const scalar_t sx = static_cast<scalar_t>(w - 1), sy = static_cast<scalar_t>(h - 1);
    const scalar_t* g = grad_points.data_ptr<scalar_t>();
    scalar_t* out = grad_px.data_ptr<scalar_t>();
    at::parallel_for(0, R, grain_rays(K), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        scalar_t gx = 0, gy = 0;
        for (int64_t k = 0; k < K; ++k) {
          gx += g[(r * K + k) * 3];
          gy += g[(r * K + k) * 3 + 1];
        }
        out[2 * r] = gx * scalar_t(2) / sx;
        out[2 * r + 1] = gy * scalar_t(2) / sy;
      }
    });
  });
  return grad_px;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastomni_cpu, m) {
  m.def(fastomni::schema::kStratifiedSampleFwd);
  m.def(fastomni::schema::kStratifiedSampleBwd);
}

TORCH_LIBRARY_IMPL(fastomni_cpu, CPU, m) {
  m.impl("stratified_sample_fwd", &stratified_sample_fwd);
  m.impl("stratified_sample_bwd", &stratified_sample_bwd);
}
