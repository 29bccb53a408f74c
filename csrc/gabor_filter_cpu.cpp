// Gabor filters and whole multiplicative filter networks (GaborNet) on the CPU.
// Math: fastomni/reference/gabor_filter.py (the spec).
//
// Filter k on x [N, in] (in is 1 or 3 in OmniMotion, so its two "matmuls" are short dot products):
//   z = x W^T + b,  D = (|x|^2 + |mu|^2) - 2 x mu^T  (the original's float32 evaluation order),
//   g = sin(z) * exp(-0.5 * D * gamma),   h_k = g_k * lin_k,   lin_k = h_{k-1} L_k^T + c_k.
// The hidden linears (the FLOPs) go through ATen GEMMs; everything else about a layer (z, D, sin,
// exp, the products, and in the backward every filter gradient) is one fused pass over the GEMM's
// output while that block of rows is still in cache.
//
// gabor_net processes rows in chunks of up to kChunk, a contiguous run of chunks per thread (see
// Chunking): threads meet once per op, not at every GEMM, which also keeps them busy when the
// cores are shared. Only chunk-sized buffers are allocated, so a 65,536-point batch never
// materialises the reference's dozens of [N, H] temporaries. For training the forward saves
// lin_1..lin_L ([L, N, H]); the backward then needs no GEMM recomputation: h_{k-1} =
// g_{k-1} lin_{k-1} is rebuilt in the fused pass of layer k-1 from x alone. Without saved lins the
// backward recomputes them chunk by chunk (L more GEMMs).
//
// Backward per chunk, top layer down, with gh_k = dLoss/dh_k:
//   gh_L = grad_out W_o;  pass_k: dlin_k = gh_k g_k, dg = gh_k lin_k, filter grads, h_k;
//   dW_o += grad_out^T h_L;  dL_{k+1} += dlin_{k+1}^T h_k;  gh_{k-1} = dlin_k L_k.
// Filter gradients per block of rows accumulate in per-block slots (a fixed number per chunk), then
// into float64 totals per thread, merged in thread order: deterministic for a given thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "gabor_filter_checks.h"
#include "gabor_filter_schema.h"

namespace {

using at::Tensor;

constexpr int64_t kChunk = 1024;       // rows per GEMM: big enough for MKL, small enough for L2/L3
constexpr int64_t kMinChunk = 64;      // fewer rows per thread: one chunk, threads inside it
constexpr int64_t kSlotRows = 64;      // rows per block of a fused backward pass
constexpr int64_t kMaxSlots = 16;      // blocks per chunk (fixed: deterministic sums)
constexpr int64_t kTaskElems = 16384;  // least [rows x H] work worth waking another thread for

#define FO_INLINE inline __attribute__((always_inline))
// One clone of each float kernel per x86-64 level, picked at load time (ifunc): the build itself
// stays portable (no -march), yet the sin/exp polynomials vectorize with AVX2+FMA or AVX-512.
#define FO_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))

// float sin and cos of z: Cody-Waite reduction by pi/2 in three parts (exact products for
// |z| < 2^16 * pi/2), Cephes minimax polynomials on [-pi/4, pi/4] (~1 ulp), quadrant by selects.
// Branch-free so loops over channels vectorize; the rounding constant 1.5 * 2^23 rounds to nearest.
// Only for |z| < kFastTrigMax: beyond it the reduction loses accuracy, and the int conversion of a
// huge or NaN quotient is undefined behaviour. Callers check a row first (fast_trig_ok) and take
// std::sin / std::cos for a row that has any other value.
constexpr float kFastTrigMax = 102943.0f;  // just below 2^16 * pi/2 = 102943.7
FO_INLINE void sincos_fast(float z, float& s, float& c) {
  const float k = (z * 0.636619772367581f + 12582912.0f) - 12582912.0f;
  float r = z - k * 1.5703125f;
  r = r - k * 4.837512969970703125e-4f;
  r = r - k * 7.54978995489188216e-8f;
  const int q = static_cast<int>(k);
  const float r2 = r * r;
  const float ps = ((-1.9515295891e-4f * r2 + 8.3321608736e-3f) * r2 - 1.6666654611e-1f) * r2 * r + r;
  const float pc = ((2.443315711809948e-5f * r2 - 1.388731625493765e-3f) * r2 + 4.166664568298827e-2f) * r2 * r2 -
                   0.5f * r2 + 1.0f;
  const float sv = (q & 1) ? pc : ps;
  const float cv = (q & 1) ? ps : pc;
  s = (q & 2) ? -sv : sv;
  c = ((q + 1) & 2) ? -cv : cv;
}

// float exp(a): a = n ln2 + r (two-part ln2), Cephes polynomial for e^r, 2^n from the exponent
// bits. Results below 2^-126 (a < -87.34) flush to 0 (< 1.2e-38 from the exact value); a is
// clamped at 88 above (the envelope's argument is <= 0 up to rounding). NaN gives NaN; it is
// clamped like a low value first, so the int conversion below never sees it.
FO_INLINE float exp_fast(float a) {
  constexpr float kLow = -87.33654475f;  // ln(2^-126): n >= -126 keeps 2^n a normal float
  const float ac = a > kLow ? (a < 88.0f ? a : 88.0f) : kLow;
  const float n = (ac * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = ac - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = ((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r + 4.1665795894e-2f) * r +
             1.6666665459e-1f) * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return a < kLow ? 0.0f : (a == a ? p * scale : a);
}

FO_INLINE void sincos_fast(double z, double& s, double& c) {
  s = std::sin(z);
  c = std::cos(z);
}
FO_INLINE double exp_fast(double a) { return std::exp(a); }

// One filter's parameters laid out for the fused loops: channel h contiguous in every array.
template <typename T>
struct Filter {
  const T* wt;     // [in][H]  W^T
  const T* mut;    // [in][H]  mu^T
  const T* b;      // [H]
  const T* gamma;  // [H]
  const T* mm;     // [H]      |mu_h|^2
};

// z = x_n W^T (+ b later) and dot = x_n mu^T for one row, accumulated over inputs in order.
template <typename T>
FO_INLINE void row_dots(const Filter<T>& f, const T* xn, int64_t in, int64_t H, T* __restrict z,
                        T* __restrict dot) {
  for (int64_t h = 0; h < H; ++h) {
    z[h] = xn[0] * f.wt[h];
    dot[h] = xn[0] * f.mut[h];
  }
  for (int64_t i = 1; i < in; ++i) {
    const T xi = xn[i];
    const T* wi = f.wt + i * H;
    const T* mi = f.mut + i * H;
    for (int64_t h = 0; h < H; ++h) {
      z[h] += xi * wi[h];
      dot[h] += xi * mi[h];
    }
  }
}

template <typename T>
FO_INLINE T row_sqnorm(const T* xn, int64_t in) {
  T xx = 0;
  for (int64_t i = 0; i < in; ++i) xx += xn[i] * xn[i];
  return xx;
}

// sum_h a[h] b[h] (b null: sum_h a[h]) with 16 independent partial sums: vectorizes without
// reassociating one serial chain (no -ffast-math).
template <typename T>
FO_INLINE T dot16(const T* __restrict a, const T* __restrict b, int64_t H) {
  T part[16] = {};
  int64_t h = 0;
  for (; h + 16 <= H; h += 16)
    for (int j = 0; j < 16; ++j) part[j] += b != nullptr ? a[h + j] * b[h + j] : a[h + j];
  T total = 0;
  for (; h < H; ++h) total += b != nullptr ? a[h] * b[h] : a[h];
  for (int j = 0; j < 16; ++j) total += part[j];
  return total;
}

// The channel loop of one row of the filter forward: on = g (or g * ln), from z = x W^T and
// dot = x mu^T.
// The filter's factors at one channel from x W^T + b (zb) and x mu^T (dot): returns the envelope
// e = exp(-0.5 D gamma) and sets D, sin(zb), cos(zb). Exact: std::sin / std::cos (a row with
// arguments outside the fast sin/cos range, or not finite).
template <typename T, bool Exact>
FO_INLINE T filter_at(T xx, T mm, T dot, T gamma, T zb, T& d, T& s, T& c) {
  d = (xx + mm) - T(2) * dot;
  if constexpr (Exact) {
    s = std::sin(zb);
    c = std::cos(zb);
  } else {
    sincos_fast(zb, s, c);
  }
  return exp_fast(T(-0.5) * d * gamma);
}

// Whether sincos_fast is valid for every channel's z + b of a row (false for NaN and inf). One
// vectorized pass over H channels, against the ~40 flops per channel of the fused loops.
template <typename T>
FO_INLINE bool fast_trig_ok(int64_t H, const T* __restrict z, const T* __restrict b) {
  if constexpr (!std::is_same_v<T, float>) {
    return true;  // the double sincos_fast is std::sin / std::cos
  } else {
    int bad = 0;
    for (int64_t h = 0; h < H; ++h) bad |= !(std::fabs(z[h] + b[h]) < kFastTrigMax);
    return bad == 0;
  }
}

template <typename T, bool HasLin, bool Exact = false>
FO_INLINE void channels_fwd(int64_t H, T xx, const T* __restrict mm, const T* __restrict gamma,
                            const T* __restrict b, const T* __restrict z, const T* __restrict dot,
                            const T* __restrict ln, T* __restrict on) {
  for (int64_t h = 0; h < H; ++h) {
    T d, s, c;
    const T e = filter_at<T, Exact>(xx, mm[h], dot[h], gamma[h], z[h] + b[h], d, s, c);
    const T g = s * e;
    on[h] = HasLin ? g * ln[h] : g;
  }
}

// Forward of one filter on rows [r0, r1): out = g (HasLin false) or g * lin (out must not alias
// lin). Scratch: 2H per call.
template <typename T, bool HasLin>
FO_INLINE void filter_fwd_rows(const Filter<T>& f, const T* x, int64_t in, int64_t H, const T* lin, T* out,
                               int64_t r0, int64_t r1, T* scratch) {
  T* z = scratch;
  T* dot = scratch + H;
  for (int64_t n = r0; n < r1; ++n) {
    const T* xn = x + n * in;
    row_dots(f, xn, in, H, z, dot);
    const T xx = row_sqnorm(xn, in);
    const T* ln = HasLin ? lin + n * H : nullptr;
    if (fast_trig_ok(H, z, f.b))
      channels_fwd<T, HasLin>(H, xx, f.mm, f.gamma, f.b, z, dot, ln, out + n * H);
    else
      channels_fwd<T, HasLin, true>(H, xx, f.mm, f.gamma, f.b, z, dot, ln, out + n * H);
  }
}

// Per-block gradient sums of one filter: arrays of H (dw, dm: [in][H], i.e. dz^T x and dD^T x
// transposed so the fused loop writes contiguous channels).
template <typename T>
struct SlotView {
  T *db, *dgamma, *dd, *dc, *dw, *dm;
  SlotView(T* base, int64_t in, int64_t H)
      : db(base), dgamma(base + H), dd(base + 2 * H), dc(base + 3 * H), dw(base + 4 * H), dm(base + (4 + in) * H) {}
  static int64_t size(int64_t in, int64_t H) { return (4 + 2 * in) * H; }
};

// The channel loop of one row of the filter backward (every pointer restrict, so it vectorizes
// without run-time alias checks): on entry dz = x W^T, dd = x mu^T; on exit dz = dLoss/dz and
// dd = dLoss/dD; dln (HasLin) = gh * g, hn (WriteH) = h; the slot sums are updated.
template <typename T, bool HasLin, bool WriteH, bool Exact = false>
FO_INLINE void channels_bwd(int64_t H, T xx, const T* __restrict mm, const T* __restrict gamma,
                            const T* __restrict b, const T* __restrict ghn, const T* __restrict ln,
                            T* __restrict dz, T* __restrict dd, T* __restrict dln, T* __restrict hn,
                            T* __restrict sdb, T* __restrict sdgamma, T* __restrict sdd, T* __restrict sdc) {
  for (int64_t h = 0; h < H; ++h) {
    T d, s, c;
    const T e = filter_at<T, Exact>(xx, mm[h], dd[h], gamma[h], dz[h] + b[h], d, s, c);
    const T g = s * e;
    const T go = ghn[h];
    T dg = go;
    if constexpr (HasLin) {
      const T l = ln[h];
      dg = go * l;
      if constexpr (WriteH) hn[h] = g * l;
      const T gl = go * g;
      dln[h] = gl;
      sdc[h] += gl;
    } else if constexpr (WriteH) {
      hn[h] = g;
    }
    const T t = dg * g;  // dLoss/d(exponent) = dg sin(z) e
    const T dzh = dg * c * e;
    const T ddh = T(-0.5) * gamma[h] * t;
    dz[h] = dzh;
    dd[h] = ddh;
    sdb[h] += dzh;
    sdgamma[h] += T(-0.5) * d * t;
    sdd[h] += ddh;
  }
}

// Backward of one filter (times lin when HasLin) on rows [r0, r1), from gh = dLoss/dh (no output
// may alias an input):
//   dlin (HasLin) = gh * g;  h_out (WriteH) = the forward's h;
//   dx rows += the filter's input gradient;  slot += the parameter-gradient sums:
//   dz = dg cos(z) e, t = dg g, dD = -0.5 gamma t;  db += dz, dgamma += -0.5 D t, dd += dD,
//   dc += dlin, dw += dz x, dm += dD x;  dx += dz W + 2 (sum_h dD) x - 2 dD mu.
// Scratch: 2H per call.
template <typename T, bool HasLin, bool WriteH>
FO_INLINE void filter_bwd_rows(const Filter<T>& f, const T* x, int64_t in, int64_t H, const T* gh, const T* lin,
                               T* dlin, T* h_out, T* dx, int64_t r0, int64_t r1, SlotView<T> slot, T* scratch) {
  T* dz = scratch;
  T* dd = scratch + H;
  for (int64_t n = r0; n < r1; ++n) {
    const T* xn = x + n * in;
    row_dots(f, xn, in, H, dz, dd);
    const T xx = row_sqnorm(xn, in);
    const T* ln = HasLin ? lin + n * H : nullptr;
    T* dln = HasLin ? dlin + n * H : nullptr;
    T* hn = WriteH ? h_out + n * H : nullptr;
    if (fast_trig_ok(H, dz, f.b))
      channels_bwd<T, HasLin, WriteH>(H, xx, f.mm, f.gamma, f.b, gh + n * H, ln, dz, dd, dln, hn, slot.db,
                                      slot.dgamma, slot.dd, slot.dc);
    else
      channels_bwd<T, HasLin, WriteH, true>(H, xx, f.mm, f.gamma, f.b, gh + n * H, ln, dz, dd, dln, hn, slot.db,
                                            slot.dgamma, slot.dd, slot.dc);
    const T sum_dd = dot16<T>(dd, nullptr, H);
    for (int64_t i = 0; i < in; ++i) {
      const T xi = xn[i];
      T* __restrict wi = slot.dw + i * H;
      T* __restrict mi = slot.dm + i * H;
      for (int64_t h = 0; h < H; ++h) {
        wi[h] += dz[h] * xi;
        mi[h] += dd[h] * xi;
      }
      dx[n * in + i] += dot16(dz, f.wt + i * H, H) + T(2) * (sum_dd * xi - dot16(dd, f.mut + i * H, H));
    }
  }
}

// Entry points of the fused passes: float ones cloned per ISA level, float64 ones plain.
#define FO_PASSES(T, ATTR)                                                                                    \
  ATTR void fwd_rows(const Filter<T>& f, const T* x, int64_t in, int64_t H, const T* lin, T* out, int64_t r0,  \
                     int64_t r1, T* scratch) {                                                                 \
    if (lin != nullptr)                                                                                        \
      filter_fwd_rows<T, true>(f, x, in, H, lin, out, r0, r1, scratch);                                        \
    else                                                                                                       \
      filter_fwd_rows<T, false>(f, x, in, H, lin, out, r0, r1, scratch);                                       \
  }                                                                                                            \
  ATTR void bwd_rows(const Filter<T>& f, const T* x, int64_t in, int64_t H, const T* gh, const T* lin, T* dlin, \
                     T* h_out, T* dx, int64_t r0, int64_t r1, SlotView<T> slot, T* scratch) {                  \
    if (lin != nullptr && h_out != nullptr)                                                                    \
      filter_bwd_rows<T, true, true>(f, x, in, H, gh, lin, dlin, h_out, dx, r0, r1, slot, scratch);            \
    else if (lin != nullptr)                                                                                   \
      filter_bwd_rows<T, true, false>(f, x, in, H, gh, lin, dlin, h_out, dx, r0, r1, slot, scratch);           \
    else if (h_out != nullptr)                                                                                 \
      filter_bwd_rows<T, false, true>(f, x, in, H, gh, lin, dlin, h_out, dx, r0, r1, slot, scratch);           \
    else                                                                                                       \
      filter_bwd_rows<T, false, false>(f, x, in, H, gh, lin, dlin, h_out, dx, r0, r1, slot, scratch);          \
  }
FO_PASSES(float, FO_CLONES)
FO_PASSES(double, )
#undef FO_PASSES

// ---------------------------------------------------------------------------------------------
// Parameters, checks, chunked drivers.

struct FilterParams {
  Tensor weight, bias, mu, gamma;  // as given: [H, in], [H], [H, in], [H]
  Tensor wt, mut, mm;              // prepared: W^T, mu^T [in, H], |mu_h|^2 [H]
};

// Lays out a (checked) filter for the fused loops.
FilterParams prepare_filter(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& mu,
                            const Tensor& gamma) {
  const int64_t in = x.size(1), H = weight.size(0);
  FilterParams p{weight.contiguous(), bias.contiguous(), mu.contiguous(), gamma.contiguous(),
                 weight.t().contiguous(), mu.t().contiguous(), at::empty({H}, x.options())};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gabor_mu_norm", [&] {
    const scalar_t* m = p.mu.data_ptr<scalar_t>();
    scalar_t* out = p.mm.data_ptr<scalar_t>();
    for (int64_t h = 0; h < H; ++h) {
      scalar_t acc = 0;
      for (int64_t i = 0; i < in; ++i) acc += m[h * in + i] * m[h * in + i];
      out[h] = acc;
    }
  });
  return p;
}

template <typename T>
Filter<T> view(const FilterParams& p) {
  return {p.wt.data_ptr<T>(), p.mut.data_ptr<T>(), p.bias.data_ptr<T>(), p.gamma.data_ptr<T>(), p.mm.data_ptr<T>()};
}

// out = in W^T (+ bias), through ATen (MKL).
void linear_out(Tensor& out, const Tensor& in, const Tensor& weight, const Tensor& bias) {
  if (bias.defined())
    at::addmm_out(out, bias, in, weight.t());
  else
    at::mm_out(out, in, weight.t());
}

// Filter forward on `rows` rows of a chunk (pointers at the chunk's first row), all threads.
template <typename T>
void fwd_pass(const FilterParams& p, const T* x, int64_t in, int64_t rows, const T* lin, T* out) {
  const Filter<T> f = view<T>(p);
  const int64_t H = p.weight.size(0);
  at::parallel_for(0, rows, std::max<int64_t>(1, kTaskElems / H), [&](int64_t r0, int64_t r1) {
    std::vector<T> scratch(2 * H);
    fwd_rows(f, x, in, H, lin, out, r0, r1, scratch.data());
  });
}

// Float64 totals of one filter's gradient sums (SlotView layout), over every chunk.
struct Totals {
  std::vector<double> v;
  int64_t in = 0, H = 0;
  Totals(int64_t in_, int64_t H_) : v(SlotView<double>::size(in_, H_), 0.0), in(in_), H(H_) {}
};

// Filter backward on `rows` rows of a chunk (pointers at the chunk's first row): row blocks in
// parallel, each into its own slot; the slots are then added to `tot` in block order.
template <typename T>
void bwd_pass(const FilterParams& p, const T* x, int64_t in, int64_t rows, const T* gh, const T* lin, T* dlin,
              T* h_out, T* dx, Totals& tot) {
  if (rows == 0) return;
  const Filter<T> f = view<T>(p);
  const int64_t H = p.weight.size(0), width = SlotView<T>::size(in, H);
  const int64_t n_slots = std::min(kMaxSlots, (rows + kSlotRows - 1) / kSlotRows);
  std::vector<T> slots(n_slots * width, T(0));
  at::parallel_for(0, n_slots, 1, [&](int64_t s0, int64_t s1) {
    std::vector<T> scratch(2 * H);
    for (int64_t s = s0; s < s1; ++s) {
      bwd_rows(f, x, in, H, gh, lin, dlin, h_out, dx, rows * s / n_slots, rows * (s + 1) / n_slots,
               SlotView<T>(slots.data() + s * width, in, H), scratch.data());
    }
  });
  for (int64_t s = 0; s < n_slots; ++s) {
    const T* sl = slots.data() + s * width;
    for (int64_t j = 0; j < width; ++j) tot.v[j] += static_cast<double>(sl[j]);
  }
}

// Gradients of a filter's parameters from its totals: (d weight, d bias, d mu, d gamma) and the
// column sum of dlin (the bias gradient of the linear feeding it).
struct FilterGrads {
  Tensor weight, bias, mu, gamma, lin_bias;
};

template <typename T>
FilterGrads filter_grads(const FilterParams& p, const Totals& tot) {
  const int64_t in = tot.in, H = tot.H;
  const SlotView<const double> t(tot.v.data(), in, H);
  FilterGrads g{at::empty_like(p.weight), at::empty_like(p.bias), at::empty_like(p.mu), at::empty_like(p.gamma),
                at::empty_like(p.bias)};
  const T* mu = p.mu.data_ptr<T>();
  T *dw = g.weight.data_ptr<T>(), *db = g.bias.data_ptr<T>(), *dmu = g.mu.data_ptr<T>();
  T *dgamma = g.gamma.data_ptr<T>(), *dc = g.lin_bias.data_ptr<T>();
  for (int64_t h = 0; h < H; ++h) {
    db[h] = static_cast<T>(t.db[h]);
    dgamma[h] = static_cast<T>(t.dgamma[h]);
    dc[h] = static_cast<T>(t.dc[h]);
    for (int64_t i = 0; i < in; ++i) {
      dw[h * in + i] = static_cast<T>(t.dw[i * H + h]);
      dmu[h * in + i] = static_cast<T>(2.0 * (t.dd[h] * static_cast<double>(mu[h * in + i]) - t.dm[i * H + h]));
    }
  }
  return g;
}

// A whole GaborNet's parameters, checked; lin_b entries are undefined for bias-free linears.
struct Net {
  std::vector<FilterParams> filters;
  std::vector<Tensor> lin_w, lin_b;
  Tensor out_w, out_b;
  int64_t in = 0, H = 0, O = 0, L = 0;
};

Net make_net(const Tensor& x, at::TensorList fw, at::TensorList fb, at::TensorList mu, at::TensorList gamma,
             at::TensorList lw, at::TensorList lb, const Tensor& ow, const Tensor& ob) {
  const fastomni::gabor::NetSizes sizes = fastomni::gabor::check_net(x, fw, fb, mu, gamma, lw, lb, ow, ob);
  Net net;
  net.in = sizes.in;
  net.H = sizes.H;
  net.O = sizes.O;
  net.L = sizes.L;
  for (size_t k = 0; k < fw.size(); ++k) net.filters.push_back(prepare_filter(x, fw[k], fb[k], mu[k], gamma[k]));
  for (size_t k = 0; k < lw.size(); ++k) {
    net.lin_w.push_back(lw[k].contiguous());
    net.lin_b.push_back(lb.empty() ? Tensor() : lb[k].contiguous());
  }
  net.out_w = ow.contiguous();
  net.out_b = ob.contiguous();
  return net;
}

// Forward of every filter and hidden linear on one chunk: lins[k-1] receives lin_k ([rows, H]
// views), h receives h_L.
template <typename T>
void forward_chunk(const Net& net, const T* xc, int64_t rows, std::vector<Tensor>& lins, Tensor& h) {
  fwd_pass<T>(net.filters[0], xc, net.in, rows, nullptr, h.data_ptr<T>());
  for (int64_t k = 1; k <= net.L; ++k) {
    Tensor& lin = lins[k - 1];
    linear_out(lin, h, net.lin_w[k - 1], net.lin_b[k - 1]);
    fwd_pass<T>(net.filters[k], xc, net.in, rows, lin.data_ptr<T>(), h.data_ptr<T>());
  }
}

// Views of lin_1..lin_L for rows [r0, r0 + rows): into the saved [L, N, H] tensor, or into the
// chunk buffer [L, C, H] (or one shared [C, H] buffer when only the forward needs them).
std::vector<Tensor> lin_views(const Tensor& store, int64_t L, int64_t r0, int64_t rows, bool saved) {
  std::vector<Tensor> views;
  for (int64_t k = 0; k < L; ++k) {
    const Tensor layer = store.dim() == 3 ? store.select(0, k) : store;
    views.push_back(layer.narrow(0, saved ? r0 : 0, rows));
  }
  return views;
}

// Rows split into chunks of C; at::parallel_for hands each thread a contiguous run of chunks, so a
// chunk's GEMMs and fused passes run on one thread (nested parallel_for and MKL calls run serially
// inside a parallel region) and threads meet once per op rather than at every GEMM. A single chunk
// runs outside any parallel region: then the GEMMs and passes use every thread.
struct Chunking {
  int64_t N, C, count;
  explicit Chunking(int64_t n_rows) : N(n_rows) {
    const int64_t per_thread = (n_rows + at::get_num_threads() - 1) / at::get_num_threads();
    C = std::max<int64_t>(1, std::min(kChunk, std::max(kMinChunk, per_thread)));
    count = (n_rows + C - 1) / C;
  }
  int64_t rows(int64_t c) const { return std::min(C, N - c * C); }
};

std::tuple<Tensor, Tensor> gabor_net_fwd(const Tensor& x_in, at::TensorList fw, at::TensorList fb,
                                         at::TensorList mu, at::TensorList gamma, at::TensorList lw,
                                         at::TensorList lb, const Tensor& ow, const Tensor& ob, bool save_lin) {
  const Net net = make_net(x_in, fw, fb, mu, gamma, lw, lb, ow, ob);
  const Tensor x = x_in.contiguous();
  const int64_t N = x.size(0);
  Tensor out = at::empty({N, net.O}, x.options());
  Tensor lins = at::empty({save_lin ? net.L : 0, N, net.H}, x.options());
  if (N == 0) return {out, lins};
  const Chunking ch(N);
  const at::ThreadLocalState tls;  // the caller's dispatch state (autograd off) for worker threads
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gabor_net_fwd", [&] {
    at::parallel_for(0, ch.count, 1, [&](int64_t c0, int64_t c1) {
      const at::ThreadLocalStateGuard guard(tls);
      Tensor hbuf = at::empty({ch.C, net.H}, x.options());
      const Tensor store = save_lin ? lins : at::empty({ch.C, net.H}, x.options());
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t r0 = c * ch.C, rows = ch.rows(c);
        std::vector<Tensor> lv = lin_views(store, net.L, r0, rows, save_lin);
        Tensor h = hbuf.narrow(0, 0, rows);
        forward_chunk<scalar_t>(net, x.data_ptr<scalar_t>() + r0 * net.in, rows, lv, h);
        Tensor out_rows = out.narrow(0, r0, rows);
        linear_out(out_rows, h, net.out_w, net.out_b);
      }
    });
  });
  return {out, lins};
}

using NetGrads = std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>,
                            std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>, Tensor, Tensor>;

// Parameter-gradient sums of one thread's chunks (merged in thread order: deterministic for a
// given thread count).
struct TaskGrads {
  std::vector<Totals> tot;  // per filter
  std::vector<Tensor> dlw;  // per hidden linear
  Tensor dow;
};

NetGrads gabor_net_bwd(const Tensor& grad_out_in, const Tensor& x_in, at::TensorList fw, at::TensorList fb,
                       at::TensorList mu, at::TensorList gamma, at::TensorList lw, at::TensorList lb,
                       const Tensor& ow, const Tensor& ob, const Tensor& lins_in) {
  const Net net = make_net(x_in, fw, fb, mu, gamma, lw, lb, ow, ob);
  const Tensor x = x_in.contiguous(), grad_out = grad_out_in.contiguous(), lins = lins_in.contiguous();
  const int64_t N = x.size(0), H = net.H, L = net.L;
  const bool saved = fastomni::gabor::check_net_grad({N, net.in, H, net.O, L}, x, grad_out, lins);

  Tensor dx = at::zeros_like(x);
  std::vector<TaskGrads> tasks(at::get_num_threads());
  const Chunking ch(N);
  const at::ThreadLocalState tls;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gabor_net_bwd", [&] {
    using T = scalar_t;
    at::parallel_for(0, ch.count, 1, [&](int64_t c0, int64_t c1) {
      const at::ThreadLocalStateGuard guard(tls);
      TaskGrads& acc = tasks[at::get_thread_num()];
      if (!acc.dow.defined()) {
        acc.tot.assign(L + 1, Totals(net.in, H));
        for (int64_t k = 0; k < L; ++k) acc.dlw.push_back(at::zeros_like(net.lin_w[k]));
        acc.dow = at::zeros_like(net.out_w);
      }
      // gh: dLoss/dh_k; upper: dlin_{k+1}; dlin: dlin_k (three rotating buffers)
      Tensor abuf = at::empty({ch.C, H}, x.options()), bbuf = at::empty({ch.C, H}, x.options());
      Tensor dbuf = at::empty({ch.C, H}, x.options()), hbuf = at::empty({ch.C, H}, x.options());
      const Tensor store = saved ? lins : at::empty({L, ch.C, H}, x.options());
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t r0 = c * ch.C, rows = ch.rows(c);
        const T* xc = x.data_ptr<T>() + r0 * net.in;
        T* dxc = dx.data_ptr<T>() + r0 * net.in;
        std::vector<Tensor> lv = lin_views(store, L, r0, rows, saved);
        Tensor gh = abuf.narrow(0, 0, rows), upper = bbuf.narrow(0, 0, rows), dlin = dbuf.narrow(0, 0, rows);
        Tensor h = hbuf.narrow(0, 0, rows);
        if (!saved) forward_chunk<T>(net, xc, rows, lv, h);
        const Tensor go = grad_out.narrow(0, r0, rows);
        at::mm_out(gh, go, net.out_w);
        for (int64_t k = L; k >= 0; --k) {
          const T* lin = k > 0 ? lv[k - 1].data_ptr<T>() : nullptr;
          bwd_pass<T>(net.filters[k], xc, net.in, rows, gh.data_ptr<T>(), lin,
                      k > 0 ? dlin.data_ptr<T>() : nullptr, h.data_ptr<T>(), dxc, acc.tot[k]);
          if (k == L)
            acc.dow.addmm_(go.t(), h);
          else
            acc.dlw[k].addmm_(upper.t(), h);
          if (k > 0) {
            at::mm_out(upper, dlin, net.lin_w[k - 1]);  // dLoss/dh_{k-1}
            std::swap(gh, upper);                      // gh <- dLoss/dh_{k-1}, upper <- free
            std::swap(upper, dlin);                    // upper <- dlin_k, dlin <- free
          }
        }
      }
    });
  });
  // merge the threads' sums in thread order
  Tensor dow = at::zeros_like(net.out_w);
  std::vector<Tensor> dlw;
  for (int64_t k = 0; k < L; ++k) dlw.push_back(at::zeros_like(net.lin_w[k]));
  std::vector<Totals> tot(L + 1, Totals(net.in, H));
  for (const TaskGrads& acc : tasks) {
    if (!acc.dow.defined()) continue;  // a thread that got no chunk
    dow.add_(acc.dow);
    for (int64_t k = 0; k < L; ++k) dlw[k].add_(acc.dlw[k]);
    for (int64_t k = 0; k <= L; ++k)
      for (size_t j = 0; j < tot[k].v.size(); ++j) tot[k].v[j] += acc.tot[k].v[j];
  }
  Tensor dob = at::empty_like(net.out_b);
  std::vector<Tensor> dfw, dfb, dmu, dgamma, dlb;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gabor_net_grads", [&] {
    std::vector<double> colsum(net.O, 0.0);
    const scalar_t* g = grad_out.data_ptr<scalar_t>();
    for (int64_t n = 0; n < N; ++n)
      for (int64_t o = 0; o < net.O; ++o) colsum[o] += static_cast<double>(g[n * net.O + o]);
    for (int64_t o = 0; o < net.O; ++o) dob.data_ptr<scalar_t>()[o] = static_cast<scalar_t>(colsum[o]);
    for (int64_t k = 0; k <= L; ++k) {
      const FilterGrads fg = filter_grads<scalar_t>(net.filters[k], tot[k]);
      dfw.push_back(fg.weight);
      dfb.push_back(fg.bias);
      dmu.push_back(fg.mu);
      dgamma.push_back(fg.gamma);
      if (k > 0 && net.lin_b[k - 1].defined()) dlb.push_back(fg.lin_bias);
    }
  });
  return {dx, dfw, dfb, dmu, dgamma, dlw, dlb, dow, dob};
}

// One MFN step (module docstring); prev, lin_weight both given or both absent.
struct Step {
  FilterParams p;
  Tensor prev, lin_w, lin_b;  // undefined when absent
};

Step make_step(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& mu, const Tensor& gamma,
               const std::optional<Tensor>& prev, const std::optional<Tensor>& lin_weight,
               const std::optional<Tensor>& lin_bias) {
  const bool has_prev = fastomni::gabor::check_step(x, weight, bias, mu, gamma, prev, lin_weight, lin_bias);
  Step s{prepare_filter(x, weight, bias, mu, gamma), {}, {}, {}};
  if (has_prev) {
    s.prev = prev->contiguous();
    s.lin_w = lin_weight->contiguous();
    if (lin_bias.has_value() && lin_bias->defined()) s.lin_b = lin_bias->contiguous();
  }
  return s;
}

Tensor gabor_step_fwd(const Tensor& x_in, const Tensor& weight, const Tensor& bias, const Tensor& mu,
                      const Tensor& gamma, const std::optional<Tensor>& prev, const std::optional<Tensor>& lin_weight,
                      const std::optional<Tensor>& lin_bias) {
  const Step s = make_step(x_in, weight, bias, mu, gamma, prev, lin_weight, lin_bias);
  const Tensor x = x_in.contiguous();
  const int64_t N = x.size(0), H = weight.size(0);
  Tensor out = at::empty({N, H}, x.options());
  if (N == 0) return out;
  Tensor lin;
  if (s.prev.defined()) {
    lin = at::empty({N, H}, x.options());
    linear_out(lin, s.prev, s.lin_w, s.lin_b);
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gabor_step_fwd", [&] {
    fwd_pass<scalar_t>(s.p, x.data_ptr<scalar_t>(), x.size(1), N, lin.defined() ? lin.data_ptr<scalar_t>() : nullptr,
                       out.data_ptr<scalar_t>());
  });
  return out;
}

// Gradients (x, weight, bias, mu, gamma, prev, lin_weight, lin_bias); absent inputs get [0] tensors.
// lin = prev lin_weight^T + lin_bias is recomputed (one GEMM) rather than saved by the forward.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gabor_step_bwd(
    const Tensor& grad_out_in, const Tensor& x_in, const Tensor& weight, const Tensor& bias, const Tensor& mu,
    const Tensor& gamma, const std::optional<Tensor>& prev, const std::optional<Tensor>& lin_weight,
    const std::optional<Tensor>& lin_bias) {
  const Step s = make_step(x_in, weight, bias, mu, gamma, prev, lin_weight, lin_bias);
  const Tensor x = x_in.contiguous(), grad_out = grad_out_in.contiguous();
  const int64_t N = x.size(0), in = x.size(1), H = weight.size(0);
  fastomni::gabor::check_step_grad(x, grad_out, H);
  const bool has_prev = s.prev.defined();
  Tensor lin, dlin;
  if (has_prev) {
    lin = at::empty({N, H}, x.options());
    linear_out(lin, s.prev, s.lin_w, s.lin_b);
    dlin = at::empty({N, H}, x.options());
  }
  Tensor dx = at::zeros_like(x);
  Totals tot(in, H);
  FilterGrads g;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gabor_step_bwd", [&] {
    using T = scalar_t;
    for (int64_t r0 = 0; r0 < N; r0 += kChunk) {
      const int64_t rows = std::min(kChunk, N - r0);
      bwd_pass<T>(s.p, x.data_ptr<T>() + r0 * in, in, rows, grad_out.data_ptr<T>() + r0 * H,
                  has_prev ? lin.data_ptr<T>() + r0 * H : nullptr, has_prev ? dlin.data_ptr<T>() + r0 * H : nullptr,
                  nullptr, dx.data_ptr<T>() + r0 * in, tot);
    }
    g = filter_grads<T>(s.p, tot);
  });
  auto none = [&] { return at::empty({0}, x.options()); };  // distinct tensors: outputs may not alias
  if (!has_prev) return {dx, g.weight, g.bias, g.mu, g.gamma, none(), none(), none()};
  return {dx,
          g.weight,
          g.bias,
          g.mu,
          g.gamma,
          at::mm(dlin, s.lin_w),
          at::mm(dlin.t(), s.prev),
          s.lin_b.defined() ? g.lin_bias : none()};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastomni_cpu, m) {
  m.def(fastomni::schema::kGaborStepFwd);
  m.def(fastomni::schema::kGaborStepBwd);
  m.def(fastomni::schema::kGaborNetFwd);
  m.def(fastomni::schema::kGaborNetBwd);
}

TORCH_LIBRARY_IMPL(fastomni_cpu, CPU, m) {
  m.impl("gabor_step_fwd", &gabor_step_fwd);
  m.impl("gabor_step_bwd", &gabor_step_bwd);
  m.impl("gabor_net_fwd", &gabor_net_fwd);
  m.impl("gabor_net_bwd", &gabor_net_bwd);
}
