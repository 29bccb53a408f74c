// Alpha compositing along rays on the CPU (spec: fastomni/reference/composite.py).
//
// Per ray of K samples (density s_k, colors c_k [C], points p_k [D], optional bool mask m_k):
//   alpha_k = 1 - exp(-s_k),  T_k = prod_{l<k} (1 - alpha_l + 1e-10),  w_k = alpha_k T_k
//   rgb = sum_k w_k c_k,  point = sum_k w_k m_k p_k (or p at argmax_k w_k m_k),  opacity = sum_k w_k m_k
// One ray per loop iteration (rays split across threads by at::parallel_for); the transmittance is
// a running product in a register. The backward is a reverse scan carrying
//   R_k = sum_{j>k} g_j alpha_j prod_{k<l<j} q_l,   q_l = 1 - alpha_l + 1e-10,
// (R_{k-1} = g_k alpha_k + q_k R_k), so dL/dalpha_k = T_k (g_k - R_k) + galpha_k needs no division;
// it keeps T_k of one ray (K scalars per thread) from a forward pass. exp(-s) of the whole batch
// comes from ATen's vectorized exp first.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/exp.h>
#include <ATen/ops/neg.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "composite_schema.h"

namespace {

constexpr double kTransmittanceEps = 1e-10;

// Rays per parallel chunk: enough samples per chunk to amortize the thread hand-off.
int64_t grain_rays(int64_t samples_per_ray) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, samples_per_ray));
}

// The argmax rule of torch.argmax: first maximum, NaN counts as the largest value.
template <typename scalar_t>
bool beats(scalar_t v, scalar_t best) {
  return v > best || (std::isnan(v) && !std::isnan(best));
}

struct Dims {
  int64_t R, K, C, D;
};

// Validates the forward inputs (shared by the backward) and returns their sizes.
Dims check_inputs(const at::Tensor& density, const at::Tensor& colors, const at::Tensor& points,
                  const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(density.scalar_type() == at::kFloat || density.scalar_type() == at::kDouble,
              "density must be float32 or float64, got ", density.scalar_type());
  TORCH_CHECK(density.dim() == 2, "density must have shape [R, K], got ", density.sizes());
  const int64_t R = density.size(0), K = density.size(1);
  TORCH_CHECK(K >= 1, "rays need at least one sample, got density ", density.sizes());
  TORCH_CHECK(colors.dim() == 3 && colors.size(0) == R && colors.size(1) == K,
              "colors must have shape [", R, ", ", K, ", C], got ", colors.sizes());
  TORCH_CHECK(points.dim() == 3 && points.size(0) == R && points.size(1) == K,
              "points must have shape [", R, ", ", K, ", D], got ", points.sizes());
  for (const at::Tensor* t : {&density, &colors, &points}) {
    TORCH_CHECK(t->device().is_cpu(), "composite takes CPU tensors, got one on ", t->device());
    TORCH_CHECK(t->scalar_type() == density.scalar_type(), "composite inputs must share a dtype, got ",
                t->scalar_type(), " and ", density.scalar_type());
    TORCH_CHECK(t->is_contiguous(), "composite inputs must be contiguous");
  }
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool, "mask must be bool, got ", mask->scalar_type());
    TORCH_CHECK(mask->device().is_cpu(), "mask must be a CPU tensor, got ", mask->device());
    TORCH_CHECK(mask->sizes() == density.sizes(), "mask must have shape ", density.sizes(), ", got ",
                mask->sizes());
    TORCH_CHECK(mask->is_contiguous(), "mask must be contiguous");
  }
  return {R, K, colors.size(2), points.size(2)};
}

void check_grad(const at::Tensor& grad, const at::Tensor& like, at::IntArrayRef shape, const char* name) {
  TORCH_CHECK(grad.sizes() == shape, name, " must have shape ", shape, ", got ", grad.sizes());
  TORCH_CHECK(grad.device().is_cpu() && grad.scalar_type() == like.scalar_type() && grad.is_contiguous(),
              name, " must be a contiguous CPU tensor of dtype ", like.scalar_type());
}

// Per-ray accumulators: a fixed array (kept in registers) when the channel count N is known at
// compile time, a heap buffer otherwise (N = -1).
template <typename scalar_t, int N>
struct Lanes {
  explicit Lanes(int64_t) {}
  scalar_t* data() { return v; }
  scalar_t v[N > 0 ? N : 1];
};

template <typename scalar_t>
struct Lanes<scalar_t, -1> {
  explicit Lanes(int64_t n) : v(n) {}
  scalar_t* data() { return v.data(); }
  std::vector<scalar_t> v;
};

// Calls f(integral_constant<NC>, integral_constant<ND>) with the channel counts of OmniMotion's
// calls (rgb 3 / none, points 3 / none) fixed at compile time, so the inner loops unroll; any
// other count runs the generic instantiation (-1).
template <typename F>
void with_channels(int64_t C, int64_t D, F&& f) {
  using three = std::integral_constant<int, 3>;
  using none = std::integral_constant<int, 0>;
  using any = std::integral_constant<int, -1>;
  if (C == 3 && D == 3) return f(three{}, three{});
  if (C == 0 && D == 3) return f(none{}, three{});
  if (C == 3 && D == 0) return f(three{}, none{});
  if (C == 0 && D == 0) return f(none{}, none{});
  f(any{}, any{});
}

// exp(-density) by ATen's vectorized exp (picked for the CPU at run time): the same values the
// reference computes, and most of the per-sample cost of a scalar loop.
at::Tensor neg_exp(const at::Tensor& density) { return at::exp(at::neg(density)); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> composite_fwd(
    const at::Tensor& density, const at::Tensor& colors, const at::Tensor& points,
    const std::optional<at::Tensor>& mask, bool select_max) {
  const Dims dims = check_inputs(density, colors, points, mask);
  // plain copies: lambdas cannot capture structured bindings before C++20
  const int64_t R = dims.R, K = dims.K, C_rt = dims.C, D_rt = dims.D;
  const auto opts = density.options();
  at::Tensor weights = at::empty({R, K}, opts), alphas = at::empty({R, K}, opts);
  at::Tensor rgb = at::empty({R, C_rt}, opts), point = at::empty({R, D_rt}, opts);
  at::Tensor opacity = at::empty({R, 1}, opts);
  const at::Tensor expo = neg_exp(density);
  const bool* mk = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(density.scalar_type(), "composite_fwd", [&] {
    with_channels(C_rt, D_rt, [&](auto nc, auto nd) {
      constexpr int NC = decltype(nc)::value, ND = decltype(nd)::value;
      const int64_t C = NC >= 0 ? NC : C_rt, D = ND >= 0 ? ND : D_rt;
      const scalar_t eps = static_cast<scalar_t>(kTransmittanceEps);
      const scalar_t* e = expo.data_ptr<scalar_t>();
      const scalar_t* col = colors.data_ptr<scalar_t>();
      const scalar_t* pts = points.data_ptr<scalar_t>();
      scalar_t *w_out = weights.data_ptr<scalar_t>(), *a_out = alphas.data_ptr<scalar_t>();
      scalar_t *rgb_out = rgb.data_ptr<scalar_t>(), *pt_out = point.data_ptr<scalar_t>();
      scalar_t* opa_out = opacity.data_ptr<scalar_t>();
      at::parallel_for(0, R, grain_rays(K), [&](int64_t begin, int64_t end) {
        Lanes<scalar_t, NC> rgb_lanes(C);
        Lanes<scalar_t, ND> pt_lanes(D);
        scalar_t *acc_rgb = rgb_lanes.data(), *acc_pt = pt_lanes.data();
        for (int64_t r = begin; r < end; ++r) {
          std::fill(acc_rgb, acc_rgb + C, scalar_t(0));
          std::fill(acc_pt, acc_pt + D, scalar_t(0));
          scalar_t trans = 1, opa = 0, best = 0;
          int64_t best_k = 0;
          for (int64_t k = 0; k < K; ++k) {
            const int64_t i = r * K + k;
            // same operation order as the reference, so float32 results agree to a few ulps
            const scalar_t a = scalar_t(1) - e[i];
            const scalar_t wk = a * trans;
            w_out[i] = wk;
            a_out[i] = a;
            for (int64_t c = 0; c < C; ++c) acc_rgb[c] += wk * col[i * C + c];
            const scalar_t wm = mk ? wk * static_cast<scalar_t>(mk[i]) : wk;
            opa += wm;
            if (select_max) {
              if (k == 0 || beats(wm, best)) {
                best = wm;
                best_k = k;
              }
            } else {
              for (int64_t c = 0; c < D; ++c) acc_pt[c] += wm * pts[i * D + c];
            }
            trans *= (scalar_t(1) - a) + eps;
          }
          if (select_max) std::copy(pts + (r * K + best_k) * D, pts + (r * K + best_k + 1) * D, acc_pt);
          std::copy(acc_rgb, acc_rgb + C, rgb_out + r * C);
          std::copy(acc_pt, acc_pt + D, pt_out + r * D);
          opa_out[r] = opa;
        }
      });
    });
  });
  return {weights, alphas, rgb, point, opacity};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> composite_bwd(
    const at::Tensor& grad_weights, const at::Tensor& grad_alphas, const at::Tensor& grad_rgb,
    const at::Tensor& grad_point, const at::Tensor& grad_opacity, const at::Tensor& density,
    const at::Tensor& colors, const at::Tensor& points, const std::optional<at::Tensor>& mask,
    bool select_max) {
  const Dims dims = check_inputs(density, colors, points, mask);
  const int64_t R = dims.R, K = dims.K, C_rt = dims.C, D_rt = dims.D;
  check_grad(grad_weights, density, {R, K}, "grad_weights");
  check_grad(grad_alphas, density, {R, K}, "grad_alphas");
  check_grad(grad_rgb, density, {R, C_rt}, "grad_rgb");
  check_grad(grad_point, density, {R, D_rt}, "grad_point");
  check_grad(grad_opacity, density, {R, 1}, "grad_opacity");
  at::Tensor grad_density = at::empty({R, K}, density.options());
  at::Tensor grad_colors = at::empty({R, K, C_rt}, density.options());
  at::Tensor grad_points = at::empty({R, K, D_rt}, density.options());
  const at::Tensor expo = neg_exp(density);
  const bool* mk = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(density.scalar_type(), "composite_bwd", [&] {
    with_channels(C_rt, D_rt, [&](auto nc, auto nd) {
      constexpr int NC = decltype(nc)::value, ND = decltype(nd)::value;
      const int64_t C = NC >= 0 ? NC : C_rt, D = ND >= 0 ? ND : D_rt;
      const scalar_t eps = static_cast<scalar_t>(kTransmittanceEps);
      const scalar_t* e = expo.data_ptr<scalar_t>();
      const scalar_t* col = colors.data_ptr<scalar_t>();
      const scalar_t* pts = points.data_ptr<scalar_t>();
      const scalar_t *gw = grad_weights.data_ptr<scalar_t>(), *ga = grad_alphas.data_ptr<scalar_t>();
      const scalar_t *grgb = grad_rgb.data_ptr<scalar_t>(), *gpt = grad_point.data_ptr<scalar_t>();
      const scalar_t* gopa = grad_opacity.data_ptr<scalar_t>();
      scalar_t* gs = grad_density.data_ptr<scalar_t>();
      scalar_t *gcol = grad_colors.data_ptr<scalar_t>(), *gpts = grad_points.data_ptr<scalar_t>();
      at::parallel_for(0, R, grain_rays(K), [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> trans(K);  // T_k of one ray, reused for every ray of the chunk
        Lanes<scalar_t, NC> grgb_lanes(C);
        Lanes<scalar_t, ND> gpt_lanes(D);
        scalar_t *grgb_r = grgb_lanes.data(), *gpt_r = gpt_lanes.data();
        for (int64_t r = begin; r < end; ++r) {
          std::copy(grgb + r * C, grgb + (r + 1) * C, grgb_r);
          std::copy(gpt + r * D, gpt + (r + 1) * D, gpt_r);
          // forward pass: T_k, the value gradients (w_k is at hand; stored in address order) and
          // (argmax mode) the selected sample
          scalar_t t = 1, best = 0;
          int64_t best_k = 0;
          for (int64_t k = 0; k < K; ++k) {
            const int64_t i = r * K + k;
            const scalar_t a = scalar_t(1) - e[i];
            const scalar_t wk = a * t;
            trans[k] = t;
            for (int64_t c = 0; c < C; ++c) gcol[i * C + c] = wk * grgb_r[c];
            const scalar_t wm = mk ? wk * static_cast<scalar_t>(mk[i]) : wk;
            if (select_max) {
              if (k == 0 || beats(wm, best)) {
                best = wm;
                best_k = k;
              }
              for (int64_t c = 0; c < D; ++c) gpts[i * D + c] = scalar_t(0);
            } else {
              for (int64_t c = 0; c < D; ++c) gpts[i * D + c] = wm * gpt_r[c];
            }
            t *= (scalar_t(1) - a) + eps;
          }
          if (select_max) std::copy(gpt_r, gpt_r + D, gpts + (r * K + best_k) * D);
          // reverse pass: carry R_k (see the file comment)
          scalar_t carry = 0;
          for (int64_t k = K - 1; k >= 0; --k) {
            const int64_t i = r * K + k;
            const scalar_t a = scalar_t(1) - e[i];
            const scalar_t q = (scalar_t(1) - a) + eps;
            const scalar_t keep = mk ? static_cast<scalar_t>(mk[i]) : scalar_t(1);
            scalar_t g = gw[i] + keep * gopa[r];
            for (int64_t c = 0; c < C; ++c) g += grgb_r[c] * col[i * C + c];
            if (!select_max) {
              scalar_t gp = 0;
              for (int64_t c = 0; c < D; ++c) gp += gpt_r[c] * pts[i * D + c];
              g += keep * gp;
            }
            gs[i] = (trans[k] * (g - carry) + ga[i]) * e[i];
            carry = g * a + q * carry;
          }
        }
      });
    });
  });
  return {grad_density, grad_colors, grad_points};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastomni_cpu, m) {
  m.def(fastomni::schema::kCompositeFwd);
  m.def(fastomni::schema::kCompositeBwd);
}

TORCH_LIBRARY_IMPL(fastomni_cpu, CPU, m) {
  m.impl("composite_fwd", &composite_fwd);
  m.impl("composite_bwd", &composite_bwd);
}
