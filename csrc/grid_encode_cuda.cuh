// Multiresolution grid encoding, CUDA device code (spec: fastomni/reference/grid_encode.py). Torch-free:
// raw pointers, cuda_runtime.h only. The launchers (grid_encode_cuda.cu) are declared at the end, outside
// the __CUDACC__ block, so the host-compiled binding can include this header. The level table (row
// offset, rows, dense flag, resolutions, dense strides per level) and the hash primes come from
// grid_encode_levels.h, shared with the CPU kernels.
//
// One thread per (point, level), level = blockIdx.y, consecutive threads on consecutive points: the
// level's table slice is shared by the block, and the [N, L F] output stores of a warp are F-element
// runs at a stride of L F. The D (1..4) and F (1, 2, 4, else a runtime loop) are template parameters.
//
// Backward: the table gradient is scattered with atomicAdd (Instant-NGP does the same): hashed rows
// collide rarely, and a sort of the N L 2^D (row, value) pairs would cost more than the scatter. The
// coordinate gradient of a point sums over levels, i.e. over threads, so it is atomicAdd-ed too (D adds
// per thread into a zeroed [N, D]). Float sum order, hence the last bits, is not deterministic.
// Bytes per (point, level), s = element size: forward reads D s + 2^D F s (gathered), writes F s;
// backward reads (D + F) s + 2^D F s and adds 2^D F s + D s atomically.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "grid_encode_levels.h"

namespace fastomni::grid_encode_cuda {

#ifdef __CUDACC__

using fastomni::grid_encode::kLevelInfo;

constexpr int kThreads = 128;

__device__ __constant__ const uint32_t kPrimesDev[4] = {1u, 2654435761u, 805459861u, 3674653429u};

// Cell, fraction and scale of one point at one level, with the reference's operations in its dtype.
template <typename T, int D>
__device__ inline void locate(const T* xp, const int64_t* lv, int64_t* cell, T* frac, T* r) {
#pragma unroll
  for (int d = 0; d < D; ++d) {
    r[d] = static_cast<T>(lv[grid_encode::kRes + d]);
    T xc = xp[d];
    xc = xc < T(0) ? T(0) : (xc > T(1) ? T(1) : xc);
    const T p = xc * r[d];
    const T c = fmin(floor(p), r[d] - T(1));
    frac[d] = p - c;
    cell[d] = static_cast<int64_t>(c);
  }
}

template <int D>
__device__ inline int64_t corner_row(const int64_t* cell, const int64_t* lv, int b) {
  if (lv[grid_encode::kDense]) {
    int64_t o = lv[grid_encode::kOffset];
#pragma unroll
    for (int d = 0; d < D; ++d) o += (cell[d] + ((b >> d) & 1)) * lv[grid_encode::kStride + d];
    return o;
  }
  uint32_t h = 0;
#pragma unroll
  for (int d = 0; d < D; ++d) h ^= static_cast<uint32_t>(cell[d] + ((b >> d) & 1)) * kPrimesDev[d];
  const uint64_t size = static_cast<uint64_t>(lv[grid_encode::kSize]);  // a 32-bit modulo when it fits
  return lv[grid_encode::kOffset] +
         static_cast<int64_t>(size <= 0xFFFFFFFFull ? h % static_cast<uint32_t>(size) : h % size);
}

template <typename T, int D>
__device__ inline T corner_weight(const T* frac, int b, int skip) {
  T w = T(1);
#pragma unroll
  for (int d = 0; d < D; ++d) {
    if (d != skip) w *= ((b >> d) & 1) ? frac[d] : T(1) - frac[d];
  }
  return w;
}

template <typename T, int D, int FC>
__global__ void grid_fwd_kernel(const T* __restrict__ x, const T* __restrict__ table,
                                const int64_t* __restrict__ levels, T* __restrict__ out, int64_t N, int64_t L,
                                int64_t Frt) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t l = blockIdx.y;
  if (n >= N) return;
  const int64_t F = FC > 0 ? FC : Frt;
  const int64_t* lv = levels + l * kLevelInfo;
  int64_t cell[D];
  T frac[D], r[D];
  locate<T, D>(x + n * D, lv, cell, frac, r);
  T* o = out + n * L * F + l * F;
  if constexpr (FC > 0) {
    T acc[FC];
#pragma unroll
    for (int f = 0; f < FC; ++f) acc[f] = T(0);
#pragma unroll
    for (int b = 0; b < (1 << D); ++b) {
      const T w = corner_weight<T, D>(frac, b, -1);
      const T* row = table + corner_row<D>(cell, lv, b) * FC;
#pragma unroll
      for (int f = 0; f < FC; ++f) acc[f] += w * row[f];
    }
#pragma unroll
    for (int f = 0; f < FC; ++f) o[f] = acc[f];
  } else {
    for (int64_t f = 0; f < F; ++f) o[f] = T(0);
    for (int b = 0; b < (1 << D); ++b) {
      const T w = corner_weight<T, D>(frac, b, -1);
      const T* row = table + corner_row<D>(cell, lv, b) * F;
      for (int64_t f = 0; f < F; ++f) o[f] += w * row[f];
    }
  }
}

template <typename T, int D, int FC>
__global__ void grid_bwd_kernel(const T* __restrict__ grad_out, const T* __restrict__ x, const T* __restrict__ table,
                                const int64_t* __restrict__ levels, T* __restrict__ grad_x, T* __restrict__ grad_table,
                                int64_t N, int64_t L, int64_t Frt) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t l = blockIdx.y;
  if (n >= N) return;
  const int64_t F = FC > 0 ? FC : Frt;
  const int64_t* lv = levels + l * kLevelInfo;
  int64_t cell[D];
  T frac[D], r[D];
  const T* xp = x + n * D;
  locate<T, D>(xp, lv, cell, frac, r);
  const T* g = grad_out + n * L * F + l * F;
  T gx[D];
#pragma unroll
  for (int d = 0; d < D; ++d) gx[d] = T(0);
#pragma unroll
  for (int b = 0; b < (1 << D); ++b) {
    const T w = corner_weight<T, D>(frac, b, -1);
    const int64_t row = corner_row<D>(cell, lv, b) * F;
    T dot = T(0);
    for (int64_t f = 0; f < F; ++f) {
      dot += table[row + f] * g[f];
      atomicAdd(grad_table + row + f, w * g[f]);
    }
#pragma unroll
    for (int d = 0; d < D; ++d) {
      const T t = dot * corner_weight<T, D>(frac, b, d);
      gx[d] += ((b >> d) & 1) ? t : -t;
    }
  }
#pragma unroll
  for (int d = 0; d < D; ++d) {
    if (xp[d] >= T(0) && xp[d] <= T(1)) atomicAdd(grad_x + n * D + d, gx[d] * r[d]);
  }
}

#endif  // __CUDACC__

// Launchers (grid_encode_cuda.cu): contiguous device arrays; levels is the [L * kLevelInfo] level table
// (grid_encode_levels.h) on the device; grad_x and grad_table must be zeroed by the caller. Return the
// launch status.
template <typename T>
cudaError_t grid_encode_fwd(const T* x, const T* table, const int64_t* levels, T* out, int64_t N, int64_t D,
                            int64_t L, int64_t F, cudaStream_t stream);

template <typename T>
cudaError_t grid_encode_bwd(const T* grad_out, const T* x, const T* table, const int64_t* levels, T* grad_x,
                            T* grad_table, int64_t N, int64_t D, int64_t L, int64_t F, cudaStream_t stream);

}  // namespace fastomni::grid_encode_cuda
