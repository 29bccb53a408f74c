// The affine_coupling CUDA kernels (csrc/affine_coupling_cuda.cuh) compiled as plain C++ and run on the
// CPU with one thread per block, for tests/test_affine_coupling.py on machines without a GPU. Every
// kernel loop strides by blockDim.x and every phase ends at a barrier, so one thread per block computes
// what a full block computes; this checks the kernels' indexing and math, not their synchronisation.
// Built by the test with the host compiler and the CUDA headers; called through ctypes.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <vector>

struct EmulatedIndex {
  unsigned x = 0, y = 0, z = 0;
};
inline EmulatedIndex threadIdx, blockIdx, blockDim;
inline void __syncthreads() {}
inline float atomicAdd(float* p, float v) {
  const float old = *p;
  *p += v;
  return old;
}
inline double atomicAdd(double* p, double v) {
  const double old = *p;
  *p += v;
  return old;
}
#define __launch_bounds__(...)
#define FASTOMNI_CUDA_EMULATE
#include "affine_coupling_cuda.cuh"

namespace fastomni::affine_coupling_cuda {

alignas(16) unsigned char smem_raw[1 << 20];  // the kernels' `extern __shared__` buffer

namespace {

template <typename T>
Weights<T> weights(const void* const* p) {
  const T* const* w = reinterpret_cast<const T* const*>(p);
  return {w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7], w[8], w[9]};
}

Sizes sizes(const int64_t* s, double slope) {
  return {s[0], s[1], static_cast<int>(s[2]), static_cast<int>(s[3]), static_cast<int>(s[4]),
          static_cast<int>(s[5]), static_cast<int>(s[6]), static_cast<int>(s[7]), s[8] != 0, slope};
}

// Runs `kernel` once per block of the launchers' grid, one thread each.
template <typename T, typename Kernel>
void run_grid(const Sizes& s, Kernel kernel) {
  constexpr int bm = kPointsPerBlock<T>;
  blockDim = {1, 1, 1};
  threadIdx = {0, 0, 0};
  for (int64_t frame = 0; frame < s.n; ++frame) {
    for (int64_t b = 0; b < (s.P + bm - 1) / bm; ++b) {
      blockIdx = {static_cast<unsigned>(b), static_cast<unsigned>(frame), 0};
      kernel();
    }
  }
}

template <typename T>
void fwd(const void* y, const void* code_bias, const void* const* w, const int64_t* s, double slope, void* out) {
  const Sizes sz = sizes(s, slope);
  run_grid<T>(sz, [&] {
    coupling_fwd_kernel<T>(static_cast<const T*>(y), static_cast<const T*>(code_bias), weights<T>(w), sz,
                           static_cast<T*>(out));
  });
}

template <typename T>
void bwd(const void* grad_out, const void* y, const void* code_bias, const void* const* w, const int64_t* s,
         double slope, void* const* g) {
  const Sizes sz = sizes(s, slope);
  T* const* gp = reinterpret_cast<T* const*>(g);
  const Grads<T> grads{gp[0], gp[1], gp[2], gp[3], gp[4], gp[5], gp[6], gp[7], gp[8], gp[9], gp[10]};
  run_grid<T>(sz, [&] {
    coupling_bwd_kernel<T>(static_cast<const T*>(grad_out), static_cast<const T*>(y),
                           static_cast<const T*>(code_bias), weights<T>(w), sz, grads);
  });
}

}  // namespace
}  // namespace fastomni::affine_coupling_cuda

// sizes: n, P, F, PD, H0, H1, H2, transformed, inverse; w: proj_w, proj_b, in_w, w1, b1, w2, b2, out_w,
// out_b, sigma; g: y, code_bias, proj_w, proj_b, in_w, w1, b1, w2, b2, out_w, out_b (zeroed but y).
extern "C" void emulate_fwd(int is_double, const void* y, const void* code_bias, const void* const* w,
                            const int64_t* s, double slope, void* out) {
  namespace k = fastomni::affine_coupling_cuda;
  is_double ? k::fwd<double>(y, code_bias, w, s, slope, out) : k::fwd<float>(y, code_bias, w, s, slope, out);
}

extern "C" void emulate_bwd(int is_double, const void* grad_out, const void* y, const void* code_bias,
                            const void* const* w, const int64_t* s, double slope, void* const* g) {
  namespace k = fastomni::affine_coupling_cuda;
  is_double ? k::bwd<double>(grad_out, y, code_bias, w, s, slope, g)
            : k::bwd<float>(grad_out, y, code_bias, w, s, slope, g);
}
