// The affine_coupling CUDA kernels (csrc/affine_coupling_cuda.cuh) compiled as plain C++ and run on the
// CPU with one thread per block, for tests/test_affine_coupling.py on machines without a GPU. Every
// kernel loop strides by blockDim.x and every phase ends at a barrier, so one thread per block computes
// what a full block computes; this checks the kernels' indexing and math, not their synchronisation.
// Built by the test with the host compiler and the CUDA headers; called through ctypes.
#include <cuda_runtime.h>

#include <algorithm>
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

// W [rows, cols] row-major -> W^T
template <typename T>
std::vector<T> transpose(const T* w, int64_t rows, int64_t cols) {
  std::vector<T> t(rows * cols);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) t[c * rows + r] = w[r * cols + c];
  return t;
}

// The weights as the binding passes them: the inputs and the transposes of proj_w, in_w, w1, w2
// (kept alive in `transposes`).
template <typename T>
Weights<T> weights(const void* const* p, const Sizes& s, std::vector<std::vector<T>>& transposes) {
  const T* const* w = reinterpret_cast<const T* const*>(p);
  transposes = {transpose(w[0], s.PD, 2 + 4 * s.F), transpose(w[2], s.H0, s.PD), transpose(w[3], s.H1, s.H0),
                transpose(w[5], s.H2, s.H1)};
  return {w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7], w[8], w[9],
          transposes[0].data(), transposes[1].data(), transposes[2].data(), transposes[3].data()};
}

Sizes sizes(const int64_t* s, double slope) {
  return {s[0], s[1], static_cast<int>(s[2]), static_cast<int>(s[3]), static_cast<int>(s[4]),
          static_cast<int>(s[5]), static_cast<int>(s[6]), static_cast<int>(s[7]), s[8] != 0, slope};
}

constexpr unsigned char kCanary = 0xA5;

// Runs `kernel` once per block of the launchers' grid, one thread each. The shared memory past the
// `bytes` a launch asks for (shared_bytes) is filled with a canary; returns how many blocks changed it,
// i.e. used more shared memory than the launch would get on a GPU.
template <typename T, typename Kernel>
int run_grid(const Sizes& s, size_t bytes, Kernel kernel) {
  constexpr int bm = kPointsPerBlock<T>;
  blockDim = {1, 1, 1};
  threadIdx = {0, 0, 0};
  int overruns = 0;
  for (int64_t frame = 0; frame < s.n; ++frame) {
    for (int64_t b = 0; b < (s.P + bm - 1) / bm; ++b) {
      blockIdx = {static_cast<unsigned>(b), static_cast<unsigned>(frame), 0};
      std::fill(smem_raw + bytes, smem_raw + sizeof(smem_raw), kCanary);
      kernel();
      overruns += std::any_of(smem_raw + bytes, smem_raw + sizeof(smem_raw), [](unsigned char c) { return c != kCanary; });
    }
  }
  return overruns;
}

template <typename T>
int fwd(const void* y, const void* code_bias, const void* const* w, const int64_t* s, double slope, void* out) {
  const Sizes sz = sizes(s, slope);
  std::vector<std::vector<T>> transposes;
  const Weights<T> wts = weights<T>(w, sz, transposes);
  return run_grid<T>(sz, shared_bytes<T>(sz, false), [&] {
    coupling_fwd_kernel<T>(static_cast<const T*>(y), static_cast<const T*>(code_bias), wts, sz,
                           static_cast<T*>(out));
  });
}

template <typename T>
int bwd(const void* grad_out, const void* y, const void* code_bias, const void* const* w, const int64_t* s,
        double slope, void* const* g) {
  const Sizes sz = sizes(s, slope);
  T* const* gp = reinterpret_cast<T* const*>(g);
  const Grads<T> grads{gp[0], gp[1], gp[2], gp[3], gp[4], gp[5], gp[6], gp[7], gp[8], gp[9], gp[10]};
  std::vector<std::vector<T>> transposes;
  const Weights<T> wts = weights<T>(w, sz, transposes);
  return run_grid<T>(sz, shared_bytes<T>(sz, true), [&] {
    coupling_bwd_kernel<T>(static_cast<const T*>(grad_out), static_cast<const T*>(y),
                           static_cast<const T*>(code_bias), wts, sz, grads);
  });
}

}  // namespace
}  // namespace fastomni::affine_coupling_cuda

// sizes: n, P, F, PD, H0, H1, H2, transformed, inverse; w: proj_w, proj_b, in_w, w1, b1, w2, b2, out_w,
// out_b, sigma; g: y, code_bias, proj_w, proj_b, in_w, w1, b1, w2, b2, out_w, out_b (zeroed but y).
// emulate_fwd / emulate_bwd return the number of blocks that overran their shared memory (0 expected).
extern "C" int emulate_fwd(int is_double, const void* y, const void* code_bias, const void* const* w,
                           const int64_t* s, double slope, void* out) {
  namespace k = fastomni::affine_coupling_cuda;
  return is_double ? k::fwd<double>(y, code_bias, w, s, slope, out) : k::fwd<float>(y, code_bias, w, s, slope, out);
}

extern "C" int emulate_bwd(int is_double, const void* grad_out, const void* y, const void* code_bias,
                           const void* const* w, const int64_t* s, double slope, void* const* g) {
  namespace k = fastomni::affine_coupling_cuda;
  return is_double ? k::bwd<double>(grad_out, y, code_bias, w, s, slope, g)
            : k::bwd<float>(grad_out, y, code_bias, w, s, slope, g);
}

// shared_bytes of the forward (backward = 0) or backward kernel; s as above (n and P unused).
extern "C" int64_t emulate_shared_bytes(int is_double, const int64_t* s, int backward) {
  namespace k = fastomni::affine_coupling_cuda;
  const k::Sizes sz = k::sizes(s, 0.01);
  return static_cast<int64_t>(is_double ? k::shared_bytes<double>(sz, backward != 0)
                                        : k::shared_bytes<float>(sz, backward != 0));
}
