// Torch binding of the gabor_filter CUDA kernels: checks, allocation, the cuBLAS GEMMs (through ATen)
// that feed the filter epilogues, stream and launch status. Registers the same schemas as the CPU
// extension under the fastomni_cuda namespace. Unlike the CPU backend, whole [N, H] layers are kept
// (the caching allocator reuses them); the backward follows csrc/gabor_filter_cpu.cpp layer by layer.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "gabor_filter_checks.h"
#include "gabor_filter_cuda.cuh"
#include "gabor_filter_schema.h"

namespace {

using at::Tensor;
namespace gc = fastomni::gabor_cuda;

void check_launch(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, what, " launch failed: ", cudaGetErrorString(status));
}

void check_device(const Tensor& x) {
  TORCH_CHECK(x.is_cuda(), "gabor_filter (cuda): x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.size(1) <= gc::kMaxIn, "gabor_filter (cuda): at most ", gc::kMaxIn, " inputs, got ", x.size(1));
}

Tensor opt(const std::optional<Tensor>& t) { return t.has_value() ? *t : Tensor(); }

// lin = a w^T (+ bias), into `out` when given.
Tensor linear(const Tensor& a, const Tensor& w, const Tensor& bias, Tensor out = Tensor()) {
  if (!out.defined()) out = at::empty({a.size(0), w.size(0)}, a.options());
  if (bias.defined())
    at::addmm_out(out, bias, a, w.t());
  else
    at::mm_out(out, a, w.t());
  return out;
}

Tensor filter_fwd(const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& mu, const Tensor& gamma,
                  const Tensor& lin) {
  const int64_t N = x.size(0), H = w.size(0);
  Tensor out = at::empty({N, H}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gabor_filter_fwd_cuda", [&] {
    check_launch(gc::filter_fwd<scalar_t>(x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(),
                                          mu.data_ptr<scalar_t>(), gamma.data_ptr<scalar_t>(),
                                          lin.defined() ? lin.data_ptr<scalar_t>() : nullptr,
                                          out.data_ptr<scalar_t>(), N, static_cast<int>(H),
                                          static_cast<int>(x.size(1)), c10::cuda::getCurrentCUDAStream()),
                 "gabor_filter_fwd");
  });
  return out;
}

// Backward of one filter: dlin (lin given), h (want_h), dx [N, in] and the parameter gradients.
struct FilterBwd {
  Tensor dlin, h, dx, dw, db, dmu, dgamma, dc;
};

FilterBwd filter_bwd(const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& mu, const Tensor& gamma,
                     const Tensor& gh, const Tensor& lin, bool want_h) {
  const int64_t N = x.size(0), H = w.size(0), in = x.size(1);
  FilterBwd r;
  if (lin.defined()) r.dlin = at::empty({N, H}, x.options());
  if (want_h) r.h = at::empty({N, H}, x.options());
  Tensor pcol = at::zeros({gc::bwd_row_blocks(N), gc::kColSums + 2 * in, H}, x.options());
  Tensor prow = at::zeros({gc::channel_blocks(static_cast<int>(H)), N, in}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gabor_filter_bwd_cuda", [&] {
    auto ptr = [](const Tensor& t) { return t.defined() ? t.data_ptr<scalar_t>() : nullptr; };
    check_launch(gc::filter_bwd<scalar_t>(ptr(x), ptr(w), ptr(b), ptr(mu), ptr(gamma), ptr(gh), ptr(lin),
                                          ptr(r.dlin), ptr(r.h), ptr(pcol), ptr(prow), N, static_cast<int>(H),
                                          static_cast<int>(in), c10::cuda::getCurrentCUDAStream()),
                 "gabor_filter_bwd");
  });
  const Tensor sums = pcol.sum(0);  // [4 + 2 in, H]: db, dgamma, sum dD, sum dlin, dz x_i, dD x_i
  r.dx = prow.sum(0);
  r.dw = sums.narrow(0, gc::kColSums, in).t().contiguous();
  r.dmu = sums.select(0, 2).unsqueeze(1).mul(mu).sub(sums.narrow(0, gc::kColSums + in, in).t()).mul(2);
  r.db = sums.select(0, 0).clone();
  r.dgamma = sums.select(0, 1).clone();
  r.dc = sums.select(0, 3).clone();
  return r;
}

Tensor gabor_step_fwd(const Tensor& x_in, const Tensor& weight, const Tensor& bias, const Tensor& mu,
                      const Tensor& gamma, const std::optional<Tensor>& prev, const std::optional<Tensor>& lin_weight,
                      const std::optional<Tensor>& lin_bias) {
  const bool has_prev = fastomni::gabor::check_step(x_in, weight, bias, mu, gamma, prev, lin_weight, lin_bias);
  check_device(x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor lin = has_prev ? linear(prev->contiguous(), lin_weight->contiguous(), opt(lin_bias)) : Tensor();
  return filter_fwd(x_in.contiguous(), weight.contiguous(), bias.contiguous(), mu.contiguous(), gamma.contiguous(),
                    lin);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gabor_step_bwd(
    const Tensor& grad_out, const Tensor& x_in, const Tensor& weight, const Tensor& bias, const Tensor& mu,
    const Tensor& gamma, const std::optional<Tensor>& prev, const std::optional<Tensor>& lin_weight,
    const std::optional<Tensor>& lin_bias) {
  const bool has_prev = fastomni::gabor::check_step(x_in, weight, bias, mu, gamma, prev, lin_weight, lin_bias);
  fastomni::gabor::check_step_grad(x_in, grad_out, weight.size(0));
  check_device(x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = x_in.contiguous(), mu_c = mu.contiguous();
  Tensor p, lw, lin;
  if (has_prev) {  // lin recomputed (one GEMM) rather than saved by the forward
    p = prev->contiguous();
    lw = lin_weight->contiguous();
    lin = linear(p, lw, opt(lin_bias));
  }
  const FilterBwd r = filter_bwd(x, weight.contiguous(), bias.contiguous(), mu_c, gamma.contiguous(),
                                 grad_out.contiguous(), lin, false);
  auto none = [&] { return at::empty({0}, x.options()); };  // distinct: outputs may not alias
  if (!has_prev) return {r.dx, r.dw, r.db, r.dmu, r.dgamma, none(), none(), none()};
  const bool has_lb = lin_bias.has_value() && lin_bias->defined();
  return {r.dx, r.dw, r.db, r.dmu, r.dgamma, at::mm(r.dlin, lw), at::mm(r.dlin.t(), p), has_lb ? r.dc : none()};
}

std::vector<Tensor> contiguous(at::TensorList ts) {
  std::vector<Tensor> out;
  for (const Tensor& t : ts) out.push_back(t.contiguous());
  return out;
}

// h_L of the net from x; lins [L, N, H] receives every lin_k when defined.
Tensor forward_layers(const Tensor& x, const std::vector<Tensor>& fw, const std::vector<Tensor>& fb,
                      const std::vector<Tensor>& mu, const std::vector<Tensor>& gamma, const std::vector<Tensor>& lw,
                      const std::vector<Tensor>& lb, const Tensor& lins) {
  Tensor h = filter_fwd(x, fw[0], fb[0], mu[0], gamma[0], Tensor());
  for (size_t k = 1; k < fw.size(); ++k) {
    const Tensor lin = linear(h, lw[k - 1], lb.empty() ? Tensor() : lb[k - 1],
                              lins.defined() ? lins.select(0, static_cast<int64_t>(k) - 1) : Tensor());
    h = filter_fwd(x, fw[k], fb[k], mu[k], gamma[k], lin);
  }
  return h;
}

std::tuple<Tensor, Tensor> gabor_net_fwd(const Tensor& x_in, at::TensorList fw, at::TensorList fb,
                                         at::TensorList mu, at::TensorList gamma, at::TensorList lw,
                                         at::TensorList lb, const Tensor& ow, const Tensor& ob, bool save_lin) {
  const fastomni::gabor::NetSizes s = fastomni::gabor::check_net(x_in, fw, fb, mu, gamma, lw, lb, ow, ob);
  check_device(x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  Tensor lins = at::empty({save_lin ? s.L : 0, s.N, s.H}, x_in.options());
  const Tensor h = forward_layers(x_in.contiguous(), contiguous(fw), contiguous(fb), contiguous(mu),
                                  contiguous(gamma), contiguous(lw), contiguous(lb), save_lin ? lins : Tensor());
  return {linear(h, ow.contiguous(), ob.contiguous()), lins};
}

using NetGrads = std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>,
                            std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>, Tensor, Tensor>;

NetGrads gabor_net_bwd(const Tensor& grad_out_in, const Tensor& x_in, at::TensorList fw_in, at::TensorList fb_in,
                       at::TensorList mu_in, at::TensorList gamma_in, at::TensorList lw_in, at::TensorList lb_in,
                       const Tensor& ow, const Tensor& ob, const Tensor& lins_in) {
  const fastomni::gabor::NetSizes s =
      fastomni::gabor::check_net(x_in, fw_in, fb_in, mu_in, gamma_in, lw_in, lb_in, ow, ob);
  const bool saved = fastomni::gabor::check_net_grad(s, x_in, grad_out_in, lins_in);
  check_device(x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = x_in.contiguous(), grad_out = grad_out_in.contiguous();
  const std::vector<Tensor> fw = contiguous(fw_in), fb = contiguous(fb_in), mu = contiguous(mu_in),
                            gamma = contiguous(gamma_in), lw = contiguous(lw_in), lb = contiguous(lb_in);
  Tensor lins = lins_in.contiguous();
  if (!saved) {
    lins = at::empty({s.L, s.N, s.H}, x.options());
    forward_layers(x, fw, fb, mu, gamma, lw, lb, lins);
  }
  Tensor dx = at::zeros_like(x), dow;
  std::vector<Tensor> dfw(s.L + 1), dfb(s.L + 1), dmu(s.L + 1), dgamma(s.L + 1), dlw(s.L), dlb;
  std::vector<Tensor> dc(s.L + 1);
  Tensor upper;  // dlin_{k+1}
  Tensor gh = at::mm(grad_out, ow.contiguous());
  for (int64_t k = s.L; k >= 0; --k) {
    const FilterBwd r = filter_bwd(x, fw[k], fb[k], mu[k], gamma[k], gh, k > 0 ? lins.select(0, k - 1) : Tensor(),
                                   true);
    dx.add_(r.dx);
    dfw[k] = r.dw;
    dfb[k] = r.db;
    dmu[k] = r.dmu;
    dgamma[k] = r.dgamma;
    dc[k] = r.dc;
    if (k == s.L)
      dow = at::mm(grad_out.t(), r.h);
    else
      dlw[k] = at::mm(upper.t(), r.h);
    if (k > 0) {
      gh = at::mm(r.dlin, lw[k - 1]);
      upper = r.dlin;
    }
  }
  if (!lb.empty())
    for (int64_t k = 1; k <= s.L; ++k) dlb.push_back(dc[k]);
  return {dx, dfw, dfb, dmu, dgamma, dlw, dlb, dow, grad_out.sum(0)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastomni_cuda, m) {
  m.def(fastomni::schema::kGaborStepFwd);
  m.def(fastomni::schema::kGaborStepBwd);
  m.def(fastomni::schema::kGaborNetFwd);
  m.def(fastomni::schema::kGaborNetBwd);
}

TORCH_LIBRARY_IMPL(fastomni_cuda, CUDA, m) {
  m.impl("gabor_step_fwd", &gabor_step_fwd);
  m.impl("gabor_step_bwd", &gabor_step_bwd);
  m.impl("gabor_net_fwd", &gabor_net_fwd);
  m.impl("gabor_net_bwd", &gabor_net_bwd);
}
