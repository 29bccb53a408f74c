// fastomni::affine_coupling on CPU: one coupling layer of OmniMotion's bijection, fused per block
// of points. Math: fastomni/reference/affine_coupling.py (the spec).
//
// Points y [n, P, 3] are processed as N = n*P rows in blocks of kBlock rows. For each block the
// positional encoding, every LeakyReLU, the per-frame code bias, the clamp and the affine update
// are fused into loops over data that is still in cache; the GEMMs go through ATen (MKL picks the
// CPU's best instructions at run time). Rows are split into one contiguous chunk per thread
// (at::parallel_for); each chunk owns its workspace and, in the backward, its gradient
// accumulators, which are summed in chunk order afterwards (deterministic for a thread count).
//
// kernel_thread_guard_note: the op runs below autograd on the calling thread only; OpenMP worker
// threads start with the default dispatch state, where the ATen calls on weights that require
// grad would go through autograd (and mm_out refuses). Each worker enters the same state.
//
// The backward recomputes the block's activations from y instead of saving them: the op's only
// saved tensor is its input, so the memory of a training step does not grow with the MLP width.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/cos.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/exp.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sin.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "affine_coupling_checks.h"
#include "affine_coupling_schema.h"

namespace {

using at::Tensor;

constexpr int64_t kBlock = 256;  // rows per GEMM (MKL near peak); 128 and 512 measured no faster
constexpr double kSClamp = 8.0;

// The layer's weights, contiguous, and its sizes.
struct Net {
  Tensor proj_w, proj_b, in_w, out_w, out_b, sigma;
  std::vector<Tensor> hid_w, hid_b;
  int64_t n_freq, enc_dim;
  std::vector<int64_t> widths;  // [Pd, H0, H1, .., HL]: columns of p, h_0, .., h_L
};

Net make_net(const Tensor& y, const Tensor& code_bias, const Tensor& proj_w, const Tensor& proj_b,
             const Tensor& in_w, at::TensorList hid_w, at::TensorList hid_b, const Tensor& out_w,
             const Tensor& out_b, const Tensor& sigma, int64_t transformed, double negative_slope) {
  const auto sizes = fastomni::affine_coupling::check_layer(y, code_bias, proj_w, proj_b, in_w, hid_w, hid_b, out_w,
                                                            out_b, sigma, transformed, negative_slope);
  TORCH_CHECK(y.device().is_cpu(), "affine_coupling (cpu): tensors must be on the CPU, got ", y.device());
  Net net;
  net.n_freq = sizes.n_freq;
  net.enc_dim = sizes.enc_dim;
  net.widths = sizes.widths;
  for (size_t l = 0; l < hid_w.size(); ++l) {
    net.hid_w.push_back(hid_w[l].contiguous());
    net.hid_b.push_back(hid_b[l].contiguous());
  }
  net.proj_w = proj_w.contiguous();
  net.proj_b = proj_b.contiguous();
  net.in_w = in_w.contiguous();
  net.out_w = out_w.contiguous();
  net.out_b = out_b.contiguous();
  net.sigma = sigma.contiguous();
  return net;
}

// The LeakyReLU loops must vectorize: the signs of the activations are random, so a branch
// mispredicts half the time (measured: scalar branchy loops cost as much as the GEMMs). GCC only
// turns the compare-and-select into SIMD without trapping math (a compare may raise an FP
// exception), which these loops never rely on.
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
template <typename T>
void bias_leaky_row(T* __restrict x, const T* __restrict bias, int64_t w, T slope) {
  for (int64_t j = 0; j < w; ++j) {
    const T a = x[j] + bias[j];
    x[j] = a > T(0) ? a : a * slope;  // no std::max/min: they would not inline under the pragma
  }
}

template <typename T>
void leaky_backward_row(T* __restrict g, const T* __restrict act, T* __restrict bias_grad, int64_t w, T slope) {
  for (int64_t j = 0; j < w; ++j) {
    const T gj = g[j] * (act[j] > T(0) ? T(1) : slope);
    g[j] = gj;
    bias_grad[j] += gj;
  }
}
#pragma GCC pop_options

// Rows i of x [m, w]: x_i <- leaky(x_i + bias_{frame(i)}), frame(i) = (r0 + i) / n_pts and
// bias_f = bias + f * bias_stride (0 for a bias shared by all frames).
template <typename T>
void bias_leaky(const Tensor& x, const T* bias, int64_t bias_stride, int64_t r0, int64_t n_pts, T slope) {
  T* base = x.data_ptr<T>();
  for (int64_t i = 0; i < x.size(0); ++i) {
    bias_leaky_row(base + i * x.stride(0), bias + ((r0 + i) / n_pts) * bias_stride, x.size(1), slope);
  }
}

// Backward of bias_leaky: g_i <- g_i * leaky'(act_i) (act is the LeakyReLU output, same sign as its
// input for slope >= 0), and g_i added to bias_grad_{frame(i)}.
template <typename T>
void leaky_backward(const Tensor& g, const Tensor& act, T* bias_grad, int64_t bias_stride, int64_t r0,
                    int64_t n_pts, T slope) {
  T* gbase = g.data_ptr<T>();
  const T* abase = act.data_ptr<T>();
  for (int64_t i = 0; i < g.size(0); ++i) {
    leaky_backward_row(gbase + i * g.stride(0), abase + i * act.stride(0),
                       bias_grad + ((r0 + i) / n_pts) * bias_stride, g.size(1), slope);
  }
}

// Per-chunk buffers for blocks of up to `rows` (<= kBlock) rows: a small layer allocates little.
struct Workspace {
  Tensor arg, sin, cos;      // [B, 2F]: v_d sigma_k and its sine and cosine
  Tensor enc;                // [B, 2 + 4F]
  std::vector<Tensor> acts;  // [p, h_0, .., h_L]; forward-only keeps two and alternates
  Tensor st;                 // [B, 2]: (s before the clamp, t)
  Tensor scale;              // [B]: e^{s} (inverse) or e^{-s} (forward), s clamped
  bool keep_all;
  Workspace(const Net& net, int64_t rows, bool keep_all_acts, const at::TensorOptions& opt)
      : keep_all(keep_all_acts) {
    arg = at::empty({rows, 2 * net.n_freq}, opt);
    sin = at::empty_like(arg);
    cos = at::empty_like(arg);
    enc = at::empty({rows, net.enc_dim}, opt);
    int64_t widest = *std::max_element(net.widths.begin(), net.widths.end());
    if (keep_all) {
      for (int64_t w : net.widths) acts.push_back(at::empty({rows, w}, opt));
    } else {
      acts = {at::empty({rows, widest}, opt), at::empty({rows, widest}, opt)};
    }
    st = at::empty({rows, 2}, opt);
    scale = at::empty({rows}, opt);
  }
  // Buffer holding activation `l` (0 = p, 1 = h_0, ...), its first `rows` rows, `width` columns.
  Tensor act(size_t l, int64_t rows, int64_t width) const {
    return (keep_all ? acts[l] : acts[l % 2]).narrow(0, 0, rows).narrow(1, 0, width);
  }
};

// Runs the network on rows [r0, r0 + m): leaves e, the activations, (s_raw, t) and the scale of
// the update in `ws`. sin, cos and exp go through ATen on contiguous buffers so that they round
// exactly as the reference's torch.sin/cos/exp (vectorized SLEEF, not libm): the bijection's
// layers amplify a last-bit difference by orders of magnitude, and a kernel that rounds like the
// reference keeps the golden end-to-end comparison as tight for every backend.
template <typename T>
void block_forward(const Net& net, const T* y, const T* code_bias, int64_t n_pts, int64_t r0, int64_t m,
                   int64_t transformed, bool inverse, T slope, Workspace& ws) {
  const int64_t k0 = transformed == 0 ? 1 : 0, k1 = transformed == 2 ? 1 : 2;
  const int64_t nf = net.n_freq, ed = net.enc_dim;
  const T* sigma = net.sigma.data_ptr<T>();
  T* arg = ws.arg.data_ptr<T>();
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t k = 0; k < nf; ++k) {
      arg[i * 2 * nf + k] = y[(r0 + i) * 3 + k0] * sigma[k];
      arg[i * 2 * nf + nf + k] = y[(r0 + i) * 3 + k1] * sigma[k];
    }
  }
  Tensor sin = ws.sin.narrow(0, 0, m), cos = ws.cos.narrow(0, 0, m);
  at::sin_out(sin, ws.arg.narrow(0, 0, m));
  at::cos_out(cos, ws.arg.narrow(0, 0, m));
  const T* sp = sin.data_ptr<T>();
  const T* cp = cos.data_ptr<T>();
  T* e = ws.enc.data_ptr<T>();
  for (int64_t i = 0; i < m; ++i) {  // [v0, v1, sin(v0 sigma), cos(v0 sigma), sin(v1 sigma), cos(v1 sigma)]
    T* row = e + i * ed;
    row[0] = y[(r0 + i) * 3 + k0];
    row[1] = y[(r0 + i) * 3 + k1];
    for (int64_t d = 0; d < 2; ++d) {
      for (int64_t k = 0; k < nf; ++k) {
        row[2 + d * 2 * nf + k] = sp[i * 2 * nf + d * nf + k];
        row[2 + d * 2 * nf + nf + k] = cp[i * 2 * nf + d * nf + k];
      }
    }
  }
  const Tensor enc = ws.enc.narrow(0, 0, m);
  Tensor p = ws.act(0, m, net.widths[0]);
  at::mm_out(p, enc, net.proj_w.t());
  bias_leaky<T>(p, net.proj_b.data_ptr<T>(), 0, r0, n_pts, slope);
  Tensor h = ws.act(1, m, net.widths[1]);
  at::mm_out(h, p, net.in_w.t());
  bias_leaky<T>(h, code_bias, net.widths[1], r0, n_pts, slope);
  for (size_t l = 0; l < net.hid_w.size(); ++l) {
    Tensor next = ws.act(l + 2, m, net.widths[l + 2]);
    at::mm_out(next, h, net.hid_w[l].t());
    bias_leaky<T>(next, net.hid_b[l].data_ptr<T>(), 0, r0, n_pts, slope);
    h = next;
  }
  Tensor st = ws.st.narrow(0, 0, m);
  at::mm_out(st, h, net.out_w.t());
  T* stp = st.data_ptr<T>();
  const T* ob = net.out_b.data_ptr<T>();
  T* sc = ws.scale.data_ptr<T>();
  for (int64_t i = 0; i < m; ++i) {
    stp[2 * i] += ob[0];
    stp[2 * i + 1] += ob[1];
    const T s = std::clamp(stp[2 * i], T(-kSClamp), T(kSClamp));
    sc[i] = inverse ? s : -s;
  }
  Tensor scale = ws.scale.narrow(0, 0, m);
  at::exp_(scale);
}

// Contiguous row ranges, one per chunk; at most one chunk per thread and per block.
struct Chunks {
  int64_t count, rows;
  explicit Chunks(int64_t n_rows) : rows(n_rows) {
    count = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (n_rows + kBlock - 1) / kBlock));
  }
  int64_t begin(int64_t c) const { return rows * c / count; }
  int64_t block_rows() const { return std::min(kBlock, (rows + count - 1) / count); }

  // body(c0, c1) for chunks [c0, c1), one chunk per thread. A single chunk runs on the calling
  // thread: an OpenMP region for it would cost more than a small layer (the idle threads spin).
  template <typename F>
  void run(const F& body) const {
    if (count == 1) {
      body(0, 1);
      return;
    }
    at::parallel_for(0, count, 1, [&](int64_t c0, int64_t c1) {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;  // see kernel_thread_guard_note
      body(c0, c1);
    });
  }
};

Tensor affine_coupling_fwd(const Tensor& y_in, const Tensor& code_bias_in, const Tensor& proj_weight,
                           const Tensor& proj_bias, const Tensor& in_weight, at::TensorList hidden_weights,
                           at::TensorList hidden_biases, const Tensor& out_weight, const Tensor& out_bias,
                           const Tensor& sigma, int64_t transformed, bool inverse, double negative_slope) {
  const Net net = make_net(y_in, code_bias_in, proj_weight, proj_bias, in_weight, hidden_weights, hidden_biases,
                           out_weight, out_bias, sigma, transformed, negative_slope);
  const Tensor y = y_in.contiguous(), code_bias = code_bias_in.contiguous();
  Tensor out = at::empty_like(y);
  const int64_t n_pts = y.size(1), rows = y.size(0) * n_pts;
  if (rows == 0) return out;
  const Chunks chunks(rows);
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "affine_coupling_fwd", [&] {
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* cb = code_bias.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    chunks.run([&](int64_t c0, int64_t c1) {
      Workspace ws(net, chunks.block_rows(), /*keep_all=*/false, y.options());
      for (int64_t c = c0; c < c1; ++c) {
        for (int64_t r0 = chunks.begin(c); r0 < chunks.begin(c + 1); r0 += kBlock) {
          const int64_t m = std::min(kBlock, chunks.begin(c + 1) - r0);
          block_forward<scalar_t>(net, yp, cb, n_pts, r0, m, transformed, inverse, scalar_t(negative_slope), ws);
          const scalar_t* st = ws.st.data_ptr<scalar_t>();
          const scalar_t* sc = ws.scale.data_ptr<scalar_t>();
          for (int64_t i = 0; i < m; ++i) {
            const scalar_t* yi = yp + (r0 + i) * 3;
            scalar_t* oi = op + (r0 + i) * 3;
            const scalar_t t = st[2 * i + 1];
            oi[0] = yi[0];
            oi[1] = yi[1];
            oi[2] = yi[2];
            oi[transformed] = inverse ? yi[transformed] * sc[i] + t : (yi[transformed] - t) * sc[i];
          }
        }
      }
    });
  });
  return out;
}

// Gradient accumulators of one chunk, in the order the op returns them (after grad_y).
struct Grads {
  std::vector<Tensor> g;  // code_bias, proj_w, proj_b, in_w, hid_w..., hid_b..., out_w, out_b
  Grads(const Net& net, int64_t n_frames, const at::TensorOptions& opt) {
    g.push_back(at::zeros({n_frames, net.in_w.size(0)}, opt));
    for (const Tensor* t : {&net.proj_w, &net.proj_b, &net.in_w}) g.push_back(at::zeros(t->sizes(), opt));
    for (const Tensor& t : net.hid_w) g.push_back(at::zeros(t.sizes(), opt));
    for (const Tensor& t : net.hid_b) g.push_back(at::zeros(t.sizes(), opt));
    g.push_back(at::zeros(net.out_w.sizes(), opt));
    g.push_back(at::zeros(net.out_b.sizes(), opt));
  }
  Tensor& code_bias() { return g[0]; }
  Tensor& proj_w() { return g[1]; }
  Tensor& proj_b() { return g[2]; }
  Tensor& in_w() { return g[3]; }
  Tensor& hid_w(size_t l) { return g[4 + l]; }
  Tensor& hid_b(size_t l, size_t n_hidden) { return g[4 + n_hidden + l]; }
  Tensor& out_w() { return g[g.size() - 2]; }
  Tensor& out_b() { return g[g.size() - 1]; }
};

std::vector<Tensor> affine_coupling_bwd(const Tensor& grad_out_in, const Tensor& y_in, const Tensor& code_bias_in,
                                        const Tensor& proj_weight, const Tensor& proj_bias, const Tensor& in_weight,
                                        at::TensorList hidden_weights, at::TensorList hidden_biases,
                                        const Tensor& out_weight, const Tensor& out_bias, const Tensor& sigma,
                                        int64_t transformed, bool inverse, double negative_slope) {
  const Net net = make_net(y_in, code_bias_in, proj_weight, proj_bias, in_weight, hidden_weights, hidden_biases,
                           out_weight, out_bias, sigma, transformed, negative_slope);
  fastomni::affine_coupling::check_grad_out(grad_out_in, y_in);
  const Tensor y = y_in.contiguous(), code_bias = code_bias_in.contiguous(), grad_out = grad_out_in.contiguous();
  const int64_t n_frames = y.size(0), n_pts = y.size(1), rows = n_frames * n_pts;
  const size_t n_hidden = net.hid_w.size();
  Tensor grad_y = at::empty_like(y);
  const Chunks chunks(rows);
  std::vector<Grads> partial;
  for (int64_t c = 0; c < chunks.count; ++c) partial.emplace_back(net, n_frames, y.options());
  if (rows > 0) {
    AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "affine_coupling_bwd", [&] {
      using T = scalar_t;
      const T slope = T(negative_slope);
      const T* yp = y.data_ptr<T>();
      const T* go = grad_out.data_ptr<T>();
      const T* sigma_p = net.sigma.data_ptr<T>();
      T* gy = grad_y.data_ptr<T>();
      const int64_t k0 = transformed == 0 ? 1 : 0, k1 = transformed == 2 ? 1 : 2;
      const int64_t nf = net.n_freq, widest = *std::max_element(net.widths.begin(), net.widths.end());
      chunks.run([&](int64_t c0, int64_t c1) {
        const int64_t b = chunks.block_rows();
        Workspace ws(net, b, /*keep_all=*/true, y.options());
        Tensor gbuf[2] = {at::empty({b, widest}, y.options()), at::empty({b, widest}, y.options())};
        Tensor g_st_buf = at::empty({b, 2}, y.options());
        Tensor g_enc_buf = at::empty({b, net.enc_dim}, y.options());
        for (int64_t c = c0; c < c1; ++c) {
          Grads& acc = partial[c];
          for (int64_t r0 = chunks.begin(c); r0 < chunks.begin(c + 1); r0 += kBlock) {
            const int64_t m = std::min(kBlock, chunks.begin(c + 1) - r0);
            block_forward<T>(net, yp, code_bias.data_ptr<T>(), n_pts, r0, m, transformed, inverse, slope, ws);
            // affine update: grad of y's transformed coordinate and of (s, t)
            const T* st = ws.st.data_ptr<T>();
            const T* sc = ws.scale.data_ptr<T>();
            Tensor g_st = g_st_buf.narrow(0, 0, m);
            T* gst = g_st.data_ptr<T>();
            T* gob = acc.out_b().data_ptr<T>();
            for (int64_t i = 0; i < m; ++i) {
              const int64_t r = r0 + i;
              const T s_raw = st[2 * i], t = st[2 * i + 1], scale = sc[i];
              const T g = go[r * 3 + transformed], yc = yp[r * 3 + transformed];
              T g_s = inverse ? g * yc * scale : -g * (yc - t) * scale;
              const T g_t = inverse ? g : -g * scale;
              if (!(s_raw >= T(-kSClamp) && s_raw <= T(kSClamp))) g_s = T(0);  // as torch.clamp's grad
              gst[2 * i] = g_s;
              gst[2 * i + 1] = g_t;
              gob[0] += g_s;
              gob[1] += g_t;
              for (int64_t d = 0; d < 3; ++d) gy[r * 3 + d] = go[r * 3 + d];
              gy[r * 3 + transformed] = g * scale;
            }
            // back through the MLP; gh holds the gradient of the current activation
            const size_t top = n_hidden + 1;
            acc.out_w().addmm_(g_st.t(), ws.act(top, m, net.widths[top]));
            Tensor gh = gbuf[0].narrow(0, 0, m).narrow(1, 0, net.widths[top]);
            at::mm_out(gh, g_st, net.out_w);
            int cur = 0;
            for (size_t l = n_hidden; l-- > 0;) {
              leaky_backward<T>(gh, ws.act(l + 2, m, net.widths[l + 2]), acc.hid_b(l, n_hidden).data_ptr<T>(), 0, r0,
                                n_pts, slope);
              acc.hid_w(l).addmm_(gh.t(), ws.act(l + 1, m, net.widths[l + 1]));
              Tensor next = gbuf[1 - cur].narrow(0, 0, m).narrow(1, 0, net.widths[l + 1]);
              at::mm_out(next, gh, net.hid_w[l]);
              gh = next;
              cur = 1 - cur;
            }
            leaky_backward<T>(gh, ws.act(1, m, net.widths[1]), acc.code_bias().data_ptr<T>(), net.widths[1], r0,
                              n_pts, slope);
            const Tensor p = ws.act(0, m, net.widths[0]);
            acc.in_w().addmm_(gh.t(), p);
            Tensor gp = gbuf[1 - cur].narrow(0, 0, m).narrow(1, 0, net.widths[0]);
            at::mm_out(gp, gh, net.in_w);
            leaky_backward<T>(gp, p, acc.proj_b().data_ptr<T>(), 0, r0, n_pts, slope);
            const Tensor enc = ws.enc.narrow(0, 0, m);
            acc.proj_w().addmm_(gp.t(), enc);
            Tensor g_enc = g_enc_buf.narrow(0, 0, m);
            at::mm_out(g_enc, gp, net.proj_w);
            // encoding -> kept coordinates
            const T* ge = g_enc.data_ptr<T>();
            const T* e = ws.enc.data_ptr<T>();
            for (int64_t i = 0; i < m; ++i) {
              const T* gr = ge + i * net.enc_dim;
              const T* er = e + i * net.enc_dim;
              const int64_t r = r0 + i;
              for (int d = 0; d < 2; ++d) {
                T acc_v = gr[d];
                const int64_t base = 2 + d * 2 * nf;
                for (int64_t k = 0; k < nf; ++k) {
                  // d sin(v s)/dv = s cos(v s), d cos(v s)/dv = -s sin(v s); e holds sin and cos
                  acc_v += sigma_p[k] * (er[base + nf + k] * gr[base + k] - er[base + k] * gr[base + nf + k]);
                }
                gy[r * 3 + (d == 0 ? k0 : k1)] += acc_v;
              }
            }
          }
        }
      });
    });
  }
  std::vector<Tensor> result = {grad_y};
  for (size_t i = 0; i < partial[0].g.size(); ++i) {
    Tensor total = partial[0].g[i];
    for (size_t c = 1; c < partial.size(); ++c) total.add_(partial[c].g[i]);
    result.push_back(total);
  }
  return result;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastomni_cpu, m) {
  m.def(fastomni::schema::kAffineCouplingFwd);
  m.def(fastomni::schema::kAffineCouplingBwd);
}

TORCH_LIBRARY_IMPL(fastomni_cpu, CPU, m) {
  m.impl("affine_coupling_fwd", &affine_coupling_fwd);
  m.impl("affine_coupling_bwd", &affine_coupling_bwd);
}
