// Multiresolution grid encoding on the CPU (spec: fastomni/reference/grid_encode.py).
//
// Forward: points x [N, D] (D = 1..4, clamped to [0, 1]) and a feature table [S, F] split into L levels
// (rows offsets[l] : offsets[l+1]; dense index for coarse levels, the uint32 xor-prime hash mod the
// level's rows for fine ones) -> out [N, L F], the D-linear interpolation of the 2^D cell corners per level.
// Points are split across threads by at::parallel_for; inside a thread, blocks of kBlock points are swept
// level by level, so one level's rows (up to a few MB when hashed) stay hot in cache for the whole block.
//
// Backward: grad_out [N, L F] -> (grad_x [N, D], grad_table [S, F]), with
//   grad_table[row_l(c + b)] += w_b g_l   and   grad_x_d += sum_l sum_b <g_l, table_row> R_{l,d} dw_b/df_d,
// grad_x_d = 0 where x_d was clamped. The table-gradient scatter uses neither atomics nor sorting nor
// per-thread copies of the table: every level owns disjoint rows, so the backward is parallel over levels
// and each level's scatter is a plain sequential loop over the points, owned by one thread. Why:
//   - atomics on the CPU (a CAS loop for floats) cost several times a plain add, and make the float
//     sum order, hence the result, depend on thread timing;
//   - per-thread private tables cost T copies of a 1-4 M-float table to zero and reduce per call
//     (memory traffic comparable to the scatter itself at N ~ 10^5) and T times the memory;
//   - sorting the N L 2^D (row, value) pairs costs more than the scatter it orders.
// Levels are dealt round-robin to min(L, threads) work items (coarse dense levels are cheap, fine hashed
// ones cache-miss, so contiguous ranges would unbalance the threads); each item sums its levels' grad_x
// contributions into its own [N, D] buffer, and the buffers are added in item order. grad_table is
// therefore bit-identical for any thread count and grad_x deterministic for a given one. The cost:
// at most L threads busy (L = 8-16 in practice, more than this project's 2-core machine has).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "grid_encode_checks.h"
#include "grid_encode_schema.h"

namespace {

using namespace fastomni::grid_encode;

constexpr int64_t kBlock = 256;  // points per level sweep in the forward

// Cell and fraction of one point at one level, exactly as the reference computes them (same operations
// in the same dtype), so the chosen cell (and a dense/hashed row) is identical.
template <typename T, int D>
inline void locate(const T* xp, const T* r, int64_t* cell, T* frac) {
  for (int d = 0; d < D; ++d) {
    T xc = xp[d];
    xc = xc < T(0) ? T(0) : (xc > T(1) ? T(1) : xc);
    const T p = xc * r[d];
    const T c = std::min(std::floor(p), r[d] - T(1));
    frac[d] = p - c;
    cell[d] = static_cast<int64_t>(c);
  }
}

// Rows (absolute, in the whole table) of the 2^D corners of `cell` at level `lv`.
template <int D, bool DENSE>
inline void corner_rows(const int64_t* cell, const int64_t* lv, int64_t* rows) {
  constexpr int C = 1 << D;
  if constexpr (DENSE) {
    int64_t base = lv[kOffset];
    for (int d = 0; d < D; ++d) base += cell[d] * lv[kStride + d];
    for (int b = 0; b < C; ++b) {
      int64_t o = base;
      for (int d = 0; d < D; ++d) o += ((b >> d) & 1) ? lv[kStride + d] : 0;
      rows[b] = o;
    }
  } else {
    uint32_t h0[D], h1[D];
    for (int d = 0; d < D; ++d) {
      h0[d] = static_cast<uint32_t>(cell[d]) * kPrimes[d];
      h1[d] = static_cast<uint32_t>(cell[d] + 1) * kPrimes[d];
    }
    const uint64_t size = static_cast<uint64_t>(lv[kSize]);
    const bool pow2 = (size & (size - 1)) == 0;  // the usual 2^T rows: a mask instead of a division
    for (int b = 0; b < C; ++b) {
      uint32_t h = 0;
      for (int d = 0; d < D; ++d) h ^= ((b >> d) & 1) ? h1[d] : h0[d];
      rows[b] = lv[kOffset] + static_cast<int64_t>(pow2 ? (h & (size - 1)) : (h % size));
    }
  }
}

template <typename T, int D>
inline void corner_weights(const T* frac, T* w) {
  for (int b = 0; b < (1 << D); ++b) {
    T wb = T(1);
    for (int d = 0; d < D; ++d) wb *= ((b >> d) & 1) ? frac[d] : T(1) - frac[d];
    w[b] = wb;
  }
}

template <typename T>
inline void level_scale(const int64_t* lv, int D, T* r) {
  for (int d = 0; d < D; ++d) r[d] = static_cast<T>(lv[kRes + d]);
}

// Rows and weights of the 2^D corners of a run of at most kRun points (rows [kRun][C], w [kRun][C], frac
// [kRun][D]), with a prefetch of every corner row: the second pass over the run then finds the hashed
// rows (random over a level's few MB, which exceed L2) in cache instead of waiting on one miss at a time.
constexpr int64_t kRun = 32;

template <typename T, int D, bool DENSE>
inline void prepare_run(const T* x, const T* r, const int64_t* lv, int64_t n0, int64_t m, int64_t F, const T* table,
                        T* grad_table, int64_t (*rows)[1 << D], T (*w)[1 << D], T (*frac)[D]) {
  constexpr int C = 1 << D;
  for (int64_t i = 0; i < m; ++i) {
    int64_t cell[D];
    locate<T, D>(x + (n0 + i) * D, r, cell, frac[i]);
    corner_rows<D, DENSE>(cell, lv, rows[i]);
    corner_weights<T, D>(frac[i], w[i]);
    if constexpr (!DENSE) {
      for (int b = 0; b < C; ++b) {
        __builtin_prefetch(table + rows[i][b] * F, 0, 3);
        if (grad_table != nullptr) __builtin_prefetch(grad_table + rows[i][b] * F, 1, 3);
      }
    }
  }
}

// One level of the forward for points [begin, end). FC > 0: F known at compile time (accumulated in
// registers); FC == 0: F = Frt.
template <typename T, int D, int FC, bool DENSE>
void fwd_level(const T* x, const T* table, T* out, const int64_t* lv, int64_t l, int64_t L, int64_t Frt,
               int64_t begin, int64_t end) {
  constexpr int C = 1 << D;
  const int64_t F = FC > 0 ? FC : Frt;
  T r[D];
  level_scale<T>(lv, D, r);
  int64_t rows[kRun][C];
  T w[kRun][C], frac[kRun][D];
  for (int64_t n0 = begin; n0 < end; n0 += kRun) {
    const int64_t m = std::min(kRun, end - n0);
    prepare_run<T, D, DENSE>(x, r, lv, n0, m, F, table, nullptr, rows, w, frac);
    for (int64_t i = 0; i < m; ++i) {
      T* o = out + (n0 + i) * L * F + l * F;
      if constexpr (FC > 0) {
        T acc[FC] = {};
        for (int b = 0; b < C; ++b) {
          const T* row = table + rows[i][b] * FC;
          for (int f = 0; f < FC; ++f) acc[f] += w[i][b] * row[f];
        }
        for (int f = 0; f < FC; ++f) o[f] = acc[f];
      } else {
        for (int64_t f = 0; f < F; ++f) o[f] = T(0);
        for (int b = 0; b < C; ++b) {
          const T* row = table + rows[i][b] * F;
          for (int64_t f = 0; f < F; ++f) o[f] += w[i][b] * row[f];
        }
      }
    }
  }
}

// One level of the backward over all N points: scatter into grad_table (this level's rows belong to the
// calling work item alone) and add R_{l,d} * dfeat/df_d . g into gx [N, D] (the work item's buffer).
template <typename T, int D, int FC, bool DENSE>
void bwd_level(const T* grad_out, const T* x, const T* table, T* grad_table, T* gx, const int64_t* lv, int64_t l,
               int64_t L, int64_t Frt, int64_t N) {
  constexpr int C = 1 << D;
  const int64_t F = FC > 0 ? FC : Frt;
  T r[D];
  level_scale<T>(lv, D, r);
  int64_t rows[kRun][C];
  T w[kRun][C], frac[kRun][D];
  for (int64_t n0 = 0; n0 < N; n0 += kRun) {
    const int64_t m = std::min(kRun, N - n0);
    prepare_run<T, D, DENSE>(x, r, lv, n0, m, F, table, grad_table, rows, w, frac);
    for (int64_t i = 0; i < m; ++i) {
      const int64_t n = n0 + i;
      const T* g = grad_out + n * L * F + l * F;
      T dot[C];
      for (int b = 0; b < C; ++b) {
        const T* row = table + rows[i][b] * F;
        T* grow = grad_table + rows[i][b] * F;
        T s = T(0);
        for (int64_t f = 0; f < F; ++f) {
          s += row[f] * g[f];
          grow[f] += w[i][b] * g[f];
        }
        dot[b] = s;
      }
      // dw_b/df_d = (+1 if b_d else -1) prod_{e != d} (f_e if b_e else 1 - f_e)
      const T* fr = frac[i];
      for (int d = 0; d < D; ++d) {
        T acc = T(0);
        for (int b = 0; b < C; ++b) {
          T others = T(1);
          for (int e = 0; e < D; ++e) {
            if (e != d) others *= ((b >> e) & 1) ? fr[e] : T(1) - fr[e];
          }
          acc += ((b >> d) & 1) ? dot[b] * others : -(dot[b] * others);
        }
        gx[n * D + d] += acc * r[d];
      }
    }
  }
}

at::Tensor grid_encode_fwd(const at::Tensor& x, const at::Tensor& table, c10::IntArrayRef resolutions,
                           c10::IntArrayRef offsets) {
  TORCH_CHECK(x.device().is_cpu(), "grid_encode: x must be a CPU tensor, got ", x.device());
  const std::vector<int64_t> info = check_args(x, table, resolutions, offsets);
  const int64_t N = x.size(0), D = x.size(1), F = table.size(1), L = static_cast<int64_t>(offsets.size()) - 1;
  at::Tensor out = at::empty({N, L * F}, x.options());
  if (N == 0 || L * F == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "grid_encode_fwd", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* tp = table.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    dispatch_shape(D, F, [&](auto dc, auto fc) {
      constexpr int Dc = decltype(dc)::value, FC = decltype(fc)::value;
      at::parallel_for(0, N, kBlock, [&](int64_t begin, int64_t end) {
        for (int64_t b0 = begin; b0 < end; b0 += kBlock) {
          const int64_t b1 = std::min(end, b0 + kBlock);
          for (int64_t l = 0; l < L; ++l) {
            const int64_t* lv = info.data() + l * kLevelInfo;
            if (lv[kDense]) {
              fwd_level<scalar_t, Dc, FC, true>(xp, tp, op, lv, l, L, F, b0, b1);
            } else {
              fwd_level<scalar_t, Dc, FC, false>(xp, tp, op, lv, l, L, F, b0, b1);
            }
          }
        }
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> grid_encode_bwd(const at::Tensor& grad_out, const at::Tensor& x,
                                                   const at::Tensor& table, c10::IntArrayRef resolutions,
                                                   c10::IntArrayRef offsets) {
  TORCH_CHECK(x.device().is_cpu(), "grid_encode: x must be a CPU tensor, got ", x.device());
  const std::vector<int64_t> info = check_args(x, table, resolutions, offsets, &grad_out);
  const int64_t N = x.size(0), D = x.size(1), F = table.size(1), L = static_cast<int64_t>(offsets.size()) - 1;
  // zeroed level by level below, by the thread that scatters into the level (spreads the 4-50 MB memset
  // over the threads and touches each slice just before its scatter)
  at::Tensor grad_table = N == 0 || L * F == 0 ? at::zeros(table.sizes(), table.options())
                                               : at::empty(table.sizes(), table.options());
  at::Tensor grad_x = at::zeros({N, D}, x.options());
  if (N == 0 || L * F == 0) return {grad_x, grad_table};
  // work item k takes levels k, k + K, k + 2K, ... (round-robin: see the top of the file)
  const int64_t K = std::max<int64_t>(1, std::min<int64_t>(L, at::get_num_threads()));
  // item 0 accumulates into grad_x itself, items 1..K-1 into scratch, added in item order below
  at::Tensor scratch = at::zeros({K - 1, N, D}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "grid_encode_bwd", [&] {
    const scalar_t* gp = grad_out.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* tp = table.data_ptr<scalar_t>();
    scalar_t* gtp = grad_table.data_ptr<scalar_t>();
    scalar_t* gxp = grad_x.data_ptr<scalar_t>();
    scalar_t* sp = scratch.data_ptr<scalar_t>();
    dispatch_shape(D, F, [&](auto dc, auto fc) {
      constexpr int Dc = decltype(dc)::value, FC = decltype(fc)::value;
      at::parallel_for(0, K, 1, [&](int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k) {
          scalar_t* gx = k == 0 ? gxp : sp + (k - 1) * N * D;
          for (int64_t l = k; l < L; l += K) {
            const int64_t* lv = info.data() + l * kLevelInfo;
            std::fill_n(gtp + lv[kOffset] * F, lv[kSize] * F, scalar_t(0));
            if (lv[kDense]) {
              bwd_level<scalar_t, Dc, FC, true>(gp, xp, tp, gtp, gx, lv, l, L, F, N);
            } else {
              bwd_level<scalar_t, Dc, FC, false>(gp, xp, tp, gtp, gx, lv, l, L, F, N);
            }
          }
        }
      });
    });
    // sum the items in a fixed order, and zero the coordinates that were clamped
    at::parallel_for(0, N, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin * D; i < end * D; ++i) {
        scalar_t s = gxp[i];
        for (int64_t k = 1; k < K; ++k) s += sp[(k - 1) * N * D + i];
        gxp[i] = (xp[i] >= scalar_t(0) && xp[i] <= scalar_t(1)) ? s : scalar_t(0);
      }
    });
  });
  return {grad_x, grad_table};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastomni_cpu, m) {
  m.def(fastomni::schema::kGridEncodeFwd);
  m.def(fastomni::schema::kGridEncodeBwd);
}

TORCH_LIBRARY_IMPL(fastomni_cpu, CPU, m) {
  m.impl("grid_encode_fwd", &grid_encode_fwd);
  m.impl("grid_encode_bwd", &grid_encode_bwd);
}
