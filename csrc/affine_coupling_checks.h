// Argument checks of the affine_coupling kernels, shared by the CPU extension and the CUDA binding: a
// direct call of torch.ops.fastomni_{cpu,cuda}.affine_coupling_* with wrong shapes fails here, naming
// the sizes, instead of reading out of bounds. Schemas: affine_coupling_schema.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <vector>

namespace fastomni::affine_coupling {

struct LayerSizes {
  int64_t n, P, n_freq, enc_dim;
  std::vector<int64_t> widths;  // [Pd, H0, H1, .., HL]: columns of p, h_0, .., h_L
};

// One coupling layer: y [n, P, 3], code_bias [n, H0], proj_w [Pd, 2 + 4F], in_w [H0, Pd], hidden
// linears [H_{l+1}, H_l], out_w [2, H_L], biases [out], sigma [F]; one dtype and device throughout.
inline LayerSizes check_layer(const at::Tensor& y, const at::Tensor& code_bias, const at::Tensor& proj_w,
                              const at::Tensor& proj_b, const at::Tensor& in_w, at::TensorList hid_w,
                              at::TensorList hid_b, const at::Tensor& out_w, const at::Tensor& out_b,
                              const at::Tensor& sigma, int64_t transformed, double negative_slope) {
  TORCH_CHECK(y.dim() == 3 && y.size(2) == 3, "affine_coupling: y must be [n, P, 3], got ", y.sizes());
  TORCH_CHECK(transformed >= 0 && transformed < 3, "affine_coupling: transformed must be 0, 1 or 2, got ",
              transformed);
  TORCH_CHECK(negative_slope >= 0, "affine_coupling: negative_slope must be >= 0 (the backward reads the "
              "LeakyReLU derivative from its output), got ", negative_slope);
  TORCH_CHECK(sigma.dim() == 1, "affine_coupling: sigma must be [F], got ", sigma.sizes());
  TORCH_CHECK(hid_w.size() == hid_b.size(), "affine_coupling: ", hid_w.size(), " hidden weights but ",
              hid_b.size(), " hidden biases");
  LayerSizes s{y.size(0), y.size(1), sigma.size(0), 2 + 4 * sigma.size(0), {}};
  auto check_linear = [&](const at::Tensor& w, const at::Tensor* b, int64_t in, const char* name) {
    TORCH_CHECK(w.dim() == 2 && w.size(1) == in, "affine_coupling: ", name, " weight must be [out, ", in,
                "], got ", w.sizes());
    TORCH_CHECK(b == nullptr || (b->dim() == 1 && b->size(0) == w.size(0)), "affine_coupling: ", name,
                " bias must be [", w.size(0), "], got ", b->sizes());
  };
  check_linear(proj_w, &proj_b, s.enc_dim, "projection");
  check_linear(in_w, nullptr, proj_w.size(0), "input");
  TORCH_CHECK(code_bias.dim() == 2 && code_bias.size(0) == s.n && code_bias.size(1) == in_w.size(0),
              "affine_coupling: code_bias must be [n=", s.n, ", H0=", in_w.size(0), "], got ", code_bias.sizes());
  s.widths = {proj_w.size(0), in_w.size(0)};
  for (size_t l = 0; l < hid_w.size(); ++l) {
    check_linear(hid_w[l], &hid_b[l], s.widths.back(), "hidden");
    s.widths.push_back(hid_w[l].size(0));
  }
  check_linear(out_w, &out_b, s.widths.back(), "output");
  TORCH_CHECK(out_w.size(0) == 2, "affine_coupling: the output layer must give (s, t), got ", out_w.size(0),
              " outputs");
  std::vector<at::Tensor> all = {code_bias, proj_w, proj_b, in_w, out_w, out_b, sigma};
  all.insert(all.end(), hid_w.begin(), hid_w.end());
  all.insert(all.end(), hid_b.begin(), hid_b.end());
  for (const at::Tensor& t : all) {
    TORCH_CHECK(t.scalar_type() == y.scalar_type(), "affine_coupling: all tensors must have y's dtype ",
                y.scalar_type(), ", got ", t.scalar_type());
    TORCH_CHECK(t.device() == y.device(), "affine_coupling: all tensors must be on y's device ", y.device(),
                ", got ", t.device());
  }
  return s;
}

inline void check_grad_out(const at::Tensor& grad_out, const at::Tensor& y) {
  TORCH_CHECK(grad_out.sizes() == y.sizes() && grad_out.scalar_type() == y.scalar_type() &&
                  grad_out.device() == y.device(),
              "affine_coupling_bwd: grad_out must match y ", y.sizes(), " ", y.scalar_type(), " ", y.device(),
              ", got ", grad_out.sizes(), " ", grad_out.scalar_type(), " ", grad_out.device());
}

}  // namespace fastomni::affine_coupling
