// Argument checks of the gabor_filter kernels, shared by the CPU extension and the CUDA binding: a
// direct call of torch.ops.fastomni_{cpu,cuda}.gabor_* with wrong shapes fails here, naming the sizes,
// instead of reading out of bounds. Schemas: gabor_filter_schema.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

namespace fastomni::gabor {

inline void check_same(const at::Tensor& t, const at::Tensor& x, const char* what) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "gabor_filter: ", what, " has dtype ", t.scalar_type(),
              " but x has ", x.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "gabor_filter: ", what, " is on ", t.device(), " but x is on ", x.device());
}

// Filter k on x [N, in]: weight, mu [H, in], bias, gamma [H]. Returns H.
inline int64_t check_filter(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                            const at::Tensor& mu, const at::Tensor& gamma, size_t k) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) >= 1, "gabor_filter: x must be [N, in >= 1], got ", x.sizes());
  const int64_t in = x.size(1);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == in && weight.size(0) >= 1, "gabor_filter: filter ", k,
              " weight must be [H, in=", in, "], got ", weight.sizes());
  const int64_t H = weight.size(0);
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == H, "gabor_filter: filter ", k, " bias must be [", H, "], got ",
              bias.sizes());
  TORCH_CHECK(mu.sizes() == weight.sizes(), "gabor_filter: filter ", k, " mu must be [", H, ", ", in, "], got ",
              mu.sizes());
  TORCH_CHECK(gamma.dim() == 1 && gamma.size(0) == H, "gabor_filter: filter ", k, " gamma must be [", H,
              "], got ", gamma.sizes());
  for (const at::Tensor* t : {&weight, &bias, &mu, &gamma}) check_same(*t, x, "a filter parameter");
  return H;
}

struct NetSizes {
  int64_t N, in, H, O, L;
};

// A whole GaborNet: L + 1 filters, L hidden linears [H, H] (biases: none or L of [H]), out [O, H], [O].
inline NetSizes check_net(const at::Tensor& x, at::TensorList fw, at::TensorList fb, at::TensorList mu,
                          at::TensorList gamma, at::TensorList lw, at::TensorList lb, const at::Tensor& ow,
                          const at::Tensor& ob) {
  TORCH_CHECK(!fw.empty() && fb.size() == fw.size() && mu.size() == fw.size() && gamma.size() == fw.size(),
              "gabor_net: need L + 1 >= 1 filters with one weight, bias, mu and gamma each, got ", fw.size(), ", ",
              fb.size(), ", ", mu.size(), ", ", gamma.size());
  NetSizes s{x.size(0), x.size(1), check_filter(x, fw[0], fb[0], mu[0], gamma[0], 0), 0,
             static_cast<int64_t>(fw.size()) - 1};
  for (size_t k = 1; k < fw.size(); ++k) {
    TORCH_CHECK(check_filter(x, fw[k], fb[k], mu[k], gamma[k], k) == s.H, "gabor_net: every filter must have H=",
                s.H, " channels, filter ", k, " has ", fw[k].size(0));
  }
  TORCH_CHECK(static_cast<int64_t>(lw.size()) == s.L, "gabor_net: ", fw.size(), " filters need ", s.L,
              " hidden linears, got ", lw.size());
  TORCH_CHECK(lb.empty() || lb.size() == lw.size(), "gabor_net: lin_bias must be empty or have ", lw.size(),
              " entries, got ", lb.size());
  for (size_t k = 0; k < lw.size(); ++k) {
    TORCH_CHECK(lw[k].dim() == 2 && lw[k].size(0) == s.H && lw[k].size(1) == s.H, "gabor_net: lin_weight ", k,
                " must be [", s.H, ", ", s.H, "], got ", lw[k].sizes());
    check_same(lw[k], x, "a lin_weight");
    if (!lb.empty()) {
      TORCH_CHECK(lb[k].dim() == 1 && lb[k].size(0) == s.H, "gabor_net: lin_bias ", k, " must be [", s.H,
                  "], got ", lb[k].sizes());
      check_same(lb[k], x, "a lin_bias");
    }
  }
  TORCH_CHECK(ow.dim() == 2 && ow.size(1) == s.H, "gabor_net: out_weight must be [O, ", s.H, "], got ",
              ow.sizes());
  s.O = ow.size(0);
  TORCH_CHECK(ob.dim() == 1 && ob.size(0) == s.O, "gabor_net: out_bias must be [", s.O, "], got ", ob.sizes());
  check_same(ow, x, "out_weight");
  check_same(ob, x, "out_bias");
  return s;
}

// grad_out [N, O] and the saved lins: [L, N, H], or empty to recompute them. Returns whether saved.
inline bool check_net_grad(const NetSizes& s, const at::Tensor& x, const at::Tensor& grad_out,
                           const at::Tensor& lins) {
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == s.N && grad_out.size(1) == s.O,
              "gabor_net_bwd: grad_out must be [", s.N, ", ", s.O, "], got ", grad_out.sizes());
  check_same(grad_out, x, "grad_out");
  TORCH_CHECK(lins.numel() == 0 || lins.sizes() == at::IntArrayRef({s.L, s.N, s.H}),
              "gabor_net_bwd: lins must be [", s.L, ", ", s.N, ", ", s.H, "] or empty (recompute), got ",
              lins.sizes());
  if (lins.numel() > 0) check_same(lins, x, "lins");
  return lins.numel() > 0 || s.L == 0;
}

// One MFN step: prev [N, H_prev] and lin_weight [H, H_prev] both given or both absent; lin_bias [H]
// only with them. Returns whether prev is given.
inline bool check_step(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                       const at::Tensor& mu, const at::Tensor& gamma, const std::optional<at::Tensor>& prev,
                       const std::optional<at::Tensor>& lin_weight, const std::optional<at::Tensor>& lin_bias) {
  const int64_t H = check_filter(x, weight, bias, mu, gamma, 0);
  const bool has_prev = prev.has_value() && prev->defined();
  const bool has_lw = lin_weight.has_value() && lin_weight->defined();
  const bool has_lb = lin_bias.has_value() && lin_bias->defined();
  TORCH_CHECK(has_prev == has_lw, "gabor_step: prev and lin_weight must be given together");
  TORCH_CHECK(has_prev || !has_lb, "gabor_step: lin_bias needs prev and lin_weight");
  if (has_prev) {
    TORCH_CHECK(prev->dim() == 2 && prev->size(0) == x.size(0), "gabor_step: prev must be [N=", x.size(0),
                ", H_prev], got ", prev->sizes());
    TORCH_CHECK(lin_weight->dim() == 2 && lin_weight->size(0) == H && lin_weight->size(1) == prev->size(1),
                "gabor_step: lin_weight must be [", H, ", ", prev->size(1), "], got ", lin_weight->sizes());
    check_same(*prev, x, "prev");
    check_same(*lin_weight, x, "lin_weight");
    if (has_lb) {
      TORCH_CHECK(lin_bias->dim() == 1 && lin_bias->size(0) == H, "gabor_step: lin_bias must be [", H, "], got ",
                  lin_bias->sizes());
      check_same(*lin_bias, x, "lin_bias");
    }
  }
  return has_prev;
}

inline void check_step_grad(const at::Tensor& x, const at::Tensor& grad_out, int64_t H) {
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == x.size(0) && grad_out.size(1) == H,
              "gabor_step_bwd: grad_out must be [", x.size(0), ", ", H, "], got ", grad_out.sizes());
  check_same(grad_out, x, "grad_out");
}

}  // namespace fastomni::gabor
