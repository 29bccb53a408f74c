// Launchers of the affine_coupling CUDA kernels (affine_coupling_cuda.cuh). Torch-free; the binding
// (affine_coupling_cuda_bind.cpp) checks the tensors, zeroes the gradient outputs and checks the status.
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

// Dynamic shared memory above 48 KB must be allowed per kernel before the launch.
template <typename Kernel>
cudaError_t launch_config(Kernel kernel, size_t bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

}  // namespace

template <typename T>
size_t shared_bytes(const Sizes& s, bool backward) {
  const Layout L(s);
  const size_t bm = kPointsPerBlock<T>;
  // forward: e, two activation buffers, st; backward: e, p, h0, h1, h2, two gradients, st, gyc
  const size_t elems = backward ? bm * L.enc + 6 * bm * L.ld + 3 * bm : bm * L.enc + 2 * bm * L.ld + 2 * bm;
  return elems * sizeof(T);
}

template <typename T>
cudaError_t affine_coupling_fwd(const T* y, const T* code_bias, const Weights<T>& w, const Sizes& s, T* out,
                                cudaStream_t stream) {
  if (!sizes_ok(s)) return cudaErrorInvalidValue;
  if (s.n * s.P == 0) return cudaSuccess;
  const size_t bytes = shared_bytes<T>(s, false);
  if (cudaError_t err = launch_config(coupling_fwd_kernel<T>, bytes); err != cudaSuccess) return err;
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
  if (cudaError_t err = launch_config(coupling_bwd_kernel<T>, bytes); err != cudaSuccess) return err;
  constexpr int bm = kPointsPerBlock<T>;
  const dim3 grid(static_cast<unsigned>((s.P + bm - 1) / bm), static_cast<unsigned>(s.n));
  coupling_bwd_kernel<T><<<grid, kThreads, bytes, stream>>>(grad_out, y, code_bias, w, s, g);
  return cudaGetLastError();
}

#define FASTOMNI_INSTANTIATE(T)                                                                                  \
  template size_t shared_bytes<T>(const Sizes&, bool);                                                          \
  template cudaError_t affine_coupling_fwd<T>(const T*, const T*, const Weights<T>&, const Sizes&, T*, cudaStream_t); \
  template cudaError_t affine_coupling_bwd<T>(const T*, const T*, const T*, const Weights<T>&, const Sizes&,      \
                                              const Grads<T>&, cudaStream_t);
FASTOMNI_INSTANTIATE(float)
FASTOMNI_INSTANTIATE(double)
#undef FASTOMNI_INSTANTIATE

}  // namespace fastomni::affine_coupling_cuda
