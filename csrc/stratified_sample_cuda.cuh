// Ray sampling of OmniMotion's orthographic camera, CUDA device code (spec:
// fastomni/reference/stratified_sample.py). Torch-free: raw pointers, cuda_runtime.h only. The launchers
// (stratified_sample_cuda.cu) are declared at the end, outside the __CUDACC__ block, for the binding.
//
// Forward: one thread per (ray, sample), consecutive threads on consecutive samples of a ray, so the
// points [R, K, 3] and depths [R, K, 1] stores are coalesced; the depth of sample k is recomputed per
// thread (linspace in float32 as torch computes it on the GPU, cast to T, then the interval bounds: the
// reference's depth_grid), cheaper than reading a table.
// Backward: one warp per ray sums its K gradients (x and y): grad_px = sum_k grad_points[k, :2] * 2 /
// (w-1, h-1). Bytes per ray (s = element size): forward reads 2 s (+ K s of noise), writes 4 K s;
// backward reads 3 K s, writes 2 s.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fastomni::stratified_sample_cuda {

#ifdef __CUDACC__

constexpr int kThreads = 256;

// linspace(start, end, K)[k] as torch's CUDA kernel computes it, in float32 whatever T (the original's
// grid is a float32 linspace, cast when it meets float64 pixels): from the start for the first half,
// from the end for the second, so both ends are exact.
template <typename T>
__device__ T grid_at(float start, float end, int64_t K, int64_t k) {
  if (K == 1) return static_cast<T>(start);
  const float step = (end - start) / static_cast<float>(K - 1);
  return static_cast<T>(k < K / 2 ? start + step * static_cast<float>(k) : end - step * static_cast<float>(K - k - 1));
}

template <typename T>
__global__ void stratified_fwd_kernel(const T* __restrict__ px, const T* __restrict__ noise, T* __restrict__ points,
                                      T* __restrict__ depths, int64_t R, int64_t K, T sx, T sy, float start, float end) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= R * K) return;
  const int64_t r = idx / K, k = idx % K;
  T d = grid_at<T>(start, end, K, k);
  if (noise != nullptr) {
    const T lo = k > 0 ? T(0.5) * (d + grid_at<T>(start, end, K, k - 1)) : d;
    const T hi = k + 1 < K ? T(0.5) * (grid_at<T>(start, end, K, k + 1) + d) : d;
    d = lo + (hi - lo) * noise[idx];
  }
  points[idx * 3] = px[2 * r] / sx * T(2) - T(1);
  points[idx * 3 + 1] = px[2 * r + 1] / sy * T(2) - T(1);
  points[idx * 3 + 2] = d;
  depths[idx] = d;
}

constexpr int kWarp = 32;

// One warp per ray: lane l sums samples l, l + 32, ..., so a warp's loads cover consecutive samples
// (coalesced; one thread per ray would read 3K elements apart), then a fixed shuffle tree adds the
// lanes (the same order every run: deterministic).
template <typename T>
__global__ void stratified_bwd_kernel(const T* __restrict__ grad_points, T* __restrict__ grad_px, int64_t R,
                                      int64_t K, T sx, T sy) {
  const int64_t r = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = static_cast<int>(threadIdx.x % kWarp);
  if (r >= R) return;  // r is the same for a whole warp: whole warps leave
  T gx = 0, gy = 0;
  for (int64_t k = lane; k < K; k += kWarp) {
    gx += grad_points[(r * K + k) * 3];
    gy += grad_points[(r * K + k) * 3 + 1];
  }
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    gx += __shfl_down_sync(0xffffffffu, gx, offset);
    gy += __shfl_down_sync(0xffffffffu, gy, offset);
  }
  if (lane == 0) {
    grad_px[2 * r] = gx * T(2) / sx;
    grad_px[2 * r + 1] = gy * T(2) / sy;
  }
}

#endif  // __CUDACC__

// Launchers (stratified_sample_cuda.cu): contiguous device arrays, noise may be null (deterministic);
// return the launch status.
template <typename T>
cudaError_t stratified_sample_fwd(const T* px, const T* noise, T* points, T* depths, int64_t R, int64_t K, int64_t h,
                                  int64_t w, double min_depth, double max_depth, cudaStream_t stream);

template <typename T>
cudaError_t stratified_sample_bwd(const T* grad_points, T* grad_px, int64_t R, int64_t K, int64_t h, int64_t w,
                                  cudaStream_t stream);

}  // namespace fastomni::stratified_sample_cuda
