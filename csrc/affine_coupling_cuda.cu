// Launchers of the affine_coupling CUDA kernels (affine_coupling_cuda.cuh). Torch-free; the binding
// (affine_coupling_cuda_bind.cpp) checks the tensors, zeroes the gradient outputs and checks the status.
#include <atomic>
#include <mutex>

#include "affine_coupling_cuda.cuh"

namespace fastomni::affine_coupling_cuda {

namespace {

bool sizes_ok(const Sizes& s) {
  const int widths[] = {s.PD, s.H0, s.H1, s.H2};
  for (int w : widths) {
    if (w < 1 || w > kMaxWidth) return false;
  }
  const int64_t bm = 16;  // the smallest kPointsPerBlock
  return s.F >= 0 && s.transformed >= 0 && s.transformed < 3 && s.n <= 65535 && (s.P + bm - 1) / bm <= INT32_MAX;
}

// Dynamic shared memory above 48 KB must be allowed per kernel and device before the launch. The
// attribute is a driver call: made once per (kernel, device), again only when a launch needs more
// than was allowed so far (the allowance only grows, under a lock, so no thread lowers it).
constexpr int kMaxDevices = 64;

template <auto kernel>
cudaError_t allow_shared(size_t bytes) {
  static std::atomic<size_t> allowed[kMaxDevices] = {};
  static std::mutex raising;
  int device = 0;
  if (cudaError_t err = cudaGetDevice(&device); err != cudaSuccess) return err;
  if (device < 0 || device >= kMaxDevices) {
    return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  }
  if (bytes <= 48 * 1024 || bytes <= allowed[device].load(std::memory_order_acquire)) return cudaSuccess;
  const std::lock_guard<std::mutex> lock(raising);
  if (bytes <= allowed[device].load(std::memory_order_relaxed)) return cudaSuccess;
  const cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (err == cudaSuccess) allowed[device].store(bytes, std::memory_order_release);
  return err;
}

}  // namespace

template <typename T>
cudaError_t affine_coupling_fwd(const T* y, const T* code_bias, const Weights<T>& w, const Sizes& s, T* out,
                                cudaStream_t stream) {
  if (!sizes_ok(s)) return cudaErrorInvalidValue;
  if (s.n * s.P == 0) return cudaSuccess;
  const size_t bytes = shared_bytes<T>(s, false);
  if (cudaError_t err = allow_shared<coupling_fwd_kernel<T>>(bytes); err != cudaSuccess) return err;
  constexpr int bm = kPointsPerBlock<T>;
  const dim3 grid(static_cast<unsigned>((s.P + bm - 1) / bm), static_cast<unsigned>(s.n));
  coupling_fwd_kernel<T><<<grid, kThreads, bytes, stream>>>(y, code_bias, w, s, out);
  return cudaGetLastError();
}

template <typename T>
cudaError_t affine_coupling_bwd(const T* grad_out, const T* y, const T* code_bias, const Weights<T>& w,
                                const Sizes& s, const Grads<T>& g, cudaStream_t stream) {
  if (!sizes_ok(s)) return cudaErrorInvalidValue;
  if (s.n * s.P == 0) return cudaSuccess;
  const size_t bytes = shared_bytes<T>(s, true);
  if (cudaError_t err = allow_shared<coupling_bwd_kernel<T>>(bytes); err != cudaSuccess) return err;
  constexpr int bm = kPointsPerBlock<T>;
  const dim3 grid(static_cast<unsigned>((s.P + bm - 1) / bm), static_cast<unsigned>(s.n));
  coupling_bwd_kernel<T><<<grid, kThreads, bytes, stream>>>(grad_out, y, code_bias, w, s, g);
  return cudaGetLastError();
}

#define FASTOMNI_INSTANTIATE(T)                                                                                  \
  template cudaError_t affine_coupling_fwd<T>(const T*, const T*, const Weights<T>&, const Sizes&, T*, cudaStream_t); \
  template cudaError_t affine_coupling_bwd<T>(const T*, const T*, const T*, const Weights<T>&, const Sizes&,      \
                                              const Grads<T>&, cudaStream_t);
FASTOMNI_INSTANTIATE(float)
FASTOMNI_INSTANTIATE(double)
#undef FASTOMNI_INSTANTIATE

}  // namespace fastomni::affine_coupling_cuda
