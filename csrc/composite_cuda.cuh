// Alpha compositing along rays, CUDA device code (spec: fastomni/reference/composite.py). Torch-free:
// raw pointers, cuda_runtime.h only. The launchers (composite_cuda.cu) are declared at the end, outside
// the __CUDACC__ block, so the host-compiled binding can include this header.
//
// One warp per ray; the ray's samples go through the warp 32 at a time (lane = sample), so loads of
// density, weights and alphas are coalesced and every scan and sum is a register shuffle:
//   forward:  T = carry * exclusive product scan of q = (1 - alpha) + 1e-10; w = alpha T; warp sums for
//             rgb, point, opacity (and a warp argmax for the max-weight sample).
//   backward: pass 1 (samples in order) writes T_k into grad_density as per-lane scratch (the same lane
//             reads it back, so no synchronisation) and the value gradients; pass 2 (chunks in reverse)
//             scans the affine maps X_k = u_k + q_k X_{k+1}, u_k = g_k alpha_k, from the last lane down
//             (composition by shuffles), so R_k = X_{k+1} needs no division:
//             dL/dsigma_k = (T_k (g_k - R_k) + galpha_k) exp(-sigma_k).
// Bytes per ray (s = element size, K samples, C colors, D point channels): forward reads K (1 + C + D) s
// (+ K mask bytes) and writes (2K + C + D + 1) s; backward reads K (3 + C + D) s + (C + D + 1) s, writes
// K (1 + C + D) s and round-trips K s of scratch.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fastomni::composite_cuda {

#ifdef __CUDACC__

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kRaysPerBlock = 8;  // 8 warps: 256 threads

__device__ inline float neg_exp(float s) { return expf(-s); }
__device__ inline double neg_exp(double s) { return exp(-s); }

template <typename T>
__device__ T warp_sum(T v) {
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// Inclusive product scan over the lanes (lane 0 first).
template <typename T>
__device__ T warp_scan_mul(T v, int lane) {
  for (int o = 1; o < kWarp; o <<= 1) {
    const T n = __shfl_up_sync(kFullMask, v, o);
    if (lane >= o) v *= n;
  }
  return v;
}

// torch.argmax's order: larger wins, NaN wins over numbers, the earlier sample wins ties.
template <typename T>
__device__ bool beats(T v, int64_t k, T best, int64_t best_k) {
  if (isnan(best)) return isnan(v) && k < best_k;
  return isnan(v) || v > best || (v == best && k < best_k);
}

// Warp-wide argmax of (v, k); every lane returns the winner.
template <typename T>
__device__ void warp_argmax(T& v, int64_t& k) {
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    const T ov = __shfl_xor_sync(kFullMask, v, o);
    const int64_t ok = __shfl_xor_sync(kFullMask, k, o);
    if (beats(ov, ok, v, k)) {
      v = ov;
      k = ok;
    }
  }
}

// Folds the warp's candidates (v, k) of chunk k0 into the ray's running argmax (best, best_k); an earlier
// chunk wins ties, as its samples come first.
template <typename T>
__device__ void update_argmax(T v, int64_t k, int64_t k0, T& best, int64_t& best_k) {
  warp_argmax(v, k);
  if (k0 == 0 || beats(v, k, best, best_k)) {
    best = v;
    best_k = k;
  }
}

// Per-chunk state of one lane: its sample's exp(-sigma), alpha, q and the exclusive transmittance.
template <typename T>
struct Sample {
  bool in;
  T e, a, q, t;
};

// Loads chunk k0 of ray r and advances the ray's transmittance carry past it.
template <typename T>
__device__ Sample<T> load_chunk(const T* density, int64_t r, int64_t K, int64_t k0, int lane, T& carry) {
  Sample<T> s;
  const int64_t k = k0 + lane;
  s.in = k < K;
  s.e = neg_exp(s.in ? density[r * K + k] : T(0));
  s.a = T(1) - s.e;
  s.q = s.in ? (T(1) - s.a) + T(1e-10) : T(1);  // same operation order as the reference
  const T incl = warp_scan_mul(s.q, lane);
  const T excl = __shfl_up_sync(kFullMask, incl, 1);
  s.t = carry * (lane == 0 ? T(1) : excl);
  carry *= __shfl_sync(kFullMask, incl, kWarp - 1);
  return s;
}

template <typename T>
__global__ void composite_fwd_kernel(const T* __restrict__ density, const T* __restrict__ colors,
                                     const T* __restrict__ points, const bool* __restrict__ mask,
                                     T* __restrict__ weights, T* __restrict__ alphas, T* __restrict__ rgb,
                                     T* __restrict__ point, T* __restrict__ opacity, int64_t R, int64_t K,
                                     int C, int D, bool select_max) {
  const int lane = threadIdx.x % kWarp;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRaysPerBlock + threadIdx.x / kWarp;
  if (r >= R) return;  // the whole warp: r is uniform across it
  T carry = 1, opa = 0, best = 0;
  int64_t best_k = 0;
  for (int64_t k0 = 0; k0 < K; k0 += kWarp) {
    const Sample<T> s = load_chunk(density, r, K, k0, lane, carry);
    const int64_t i = r * K + k0 + lane;
    const T w = s.a * s.t;  // 0 on lanes past K (alpha 0)
    if (s.in) {
      weights[i] = w;
      alphas[i] = s.a;
    }
    const T wm = mask != nullptr ? w * T(s.in && mask[i]) : w;
    opa += warp_sum(wm);
    for (int c = 0; c < C; ++c) {
      const T sum = warp_sum(s.in ? w * colors[i * C + c] : T(0));
      if (lane == 0) rgb[r * C + c] = (k0 == 0 ? T(0) : rgb[r * C + c]) + sum;
    }
    if (select_max) {
      update_argmax(s.in ? wm : T(-INFINITY), s.in ? k0 + lane : K, k0, best, best_k);
    } else {
      for (int c = 0; c < D; ++c) {
        const T sum = warp_sum(s.in ? wm * points[i * D + c] : T(0));
        if (lane == 0) point[r * D + c] = (k0 == 0 ? T(0) : point[r * D + c]) + sum;
      }
    }
  }
  if (select_max) {
    for (int c = lane; c < D; c += kWarp) point[r * D + c] = points[(r * K + best_k) * D + c];
  }
  if (lane == 0) opacity[r] = opa;
}

template <typename T>
__global__ void composite_bwd_kernel(const T* __restrict__ grad_weights, const T* __restrict__ grad_alphas,
                                     const T* __restrict__ grad_rgb, const T* __restrict__ grad_point,
                                     const T* __restrict__ grad_opacity, const T* __restrict__ density,
                                     const T* __restrict__ colors, const T* __restrict__ points,
                                     const bool* __restrict__ mask, T* __restrict__ grad_density,
                                     T* __restrict__ grad_colors, T* __restrict__ grad_points, int64_t R,
                                     int64_t K, int C, int D, bool select_max) {
  const int lane = threadIdx.x % kWarp;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRaysPerBlock + threadIdx.x / kWarp;
  if (r >= R) return;
  // pass 1: T_k into the scratch, value gradients, the argmax
  T carry = 1, best = 0;
  int64_t best_k = 0;
  for (int64_t k0 = 0; k0 < K; k0 += kWarp) {
    const Sample<T> s = load_chunk(density, r, K, k0, lane, carry);
    const int64_t i = r * K + k0 + lane;
    const T w = s.a * s.t;
    const T wm = mask != nullptr ? w * T(s.in && mask[i]) : w;
    if (s.in) {
      grad_density[i] = s.t;
      for (int c = 0; c < C; ++c) grad_colors[i * C + c] = w * grad_rgb[r * C + c];
      for (int c = 0; c < D; ++c) grad_points[i * D + c] = select_max ? T(0) : wm * grad_point[r * D + c];
    }
    if (select_max) update_argmax(s.in ? wm : T(-INFINITY), s.in ? k0 + lane : K, k0, best, best_k);
  }
  if (select_max) {
    for (int c = lane; c < D; c += kWarp) grad_points[(r * K + best_k) * D + c] = grad_point[r * D + c];
  }
  // pass 2: chunks in reverse; x_next = X of the first sample after the chunk (0 past the ray)
  T x_next = 0;
  const int64_t last = ((K - 1) / kWarp) * kWarp;
  for (int64_t k0 = last; k0 >= 0; k0 -= kWarp) {
    const int64_t k = k0 + lane;
    const int64_t i = r * K + k;
    const bool in = k < K;
    T g = 0, e = 1, a = 0, q = 1, t = 0, ga = 0;
    if (in) {
      e = neg_exp(density[i]);
      a = T(1) - e;
      q = (T(1) - a) + T(1e-10);
      t = grad_density[i];
      ga = grad_alphas[i];
      const T keep = mask != nullptr ? T(mask[i]) : T(1);
      g = grad_weights[i] + keep * grad_opacity[r];
      for (int c = 0; c < C; ++c) g += grad_rgb[r * C + c] * colors[i * C + c];
      if (!select_max) {
        T gp = 0;
        for (int c = 0; c < D; ++c) gp += grad_point[r * D + c] * points[i * D + c];
        g += keep * gp;
      }
    }
    // suffix composition of x -> u + q x over lanes k..31 (lanes past K are the identity)
    T A = q, B = g * a;
    for (int o = 1; o < kWarp; o <<= 1) {
      const T An = __shfl_down_sync(kFullMask, A, o);
      const T Bn = __shfl_down_sync(kFullMask, B, o);
      if (lane + o < kWarp) {
        B += A * Bn;
        A *= An;
      }
    }
    const T X = B + A * x_next;
    const T X_after = __shfl_down_sync(kFullMask, X, 1);
    const T R_k = lane == kWarp - 1 ? x_next : X_after;
    if (in) grad_density[i] = (t * (g - R_k) + ga) * e;
    x_next = __shfl_sync(kFullMask, X, 0);
  }
}

#endif  // __CUDACC__

// Launchers (composite_cuda.cu): contiguous device arrays, mask may be null; return the launch status.
template <typename T>
cudaError_t composite_fwd(const T* density, const T* colors, const T* points, const bool* mask, T* weights,
                          T* alphas, T* rgb, T* point, T* opacity, int64_t R, int64_t K, int C, int D,
                          bool select_max, cudaStream_t stream);

template <typename T>
cudaError_t composite_bwd(const T* grad_weights, const T* grad_alphas, const T* grad_rgb, const T* grad_point,
                          const T* grad_opacity, const T* density, const T* colors, const T* points,
                          const bool* mask, T* grad_density, T* grad_colors, T* grad_points, int64_t R, int64_t K,
                          int C, int D, bool select_max, cudaStream_t stream);

}  // namespace fastomni::composite_cuda
