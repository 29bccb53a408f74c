// Launchers of the Gabor filter CUDA kernels (gabor_filter_cuda.cuh). Torch-free; every launch returns
// its status, which the binding (gabor_filter_cuda_bind.cpp) checks.
#include "gabor_filter_cuda.cuh"

namespace fastomni::gabor_cuda {

namespace {

dim3 block() { return dim3(kWarp, kWarps); }

}  // namespace

template <typename T>
cudaError_t filter_fwd(const T* x, const T* weight, const T* bias, const T* mu, const T* gamma, const T* lin,
                       T* out, int64_t N, int H, int in, cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  if (in < 1 || in > kMaxIn) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(fwd_row_blocks(N)), static_cast<unsigned>(channel_blocks(H)));
  if (lin != nullptr)
    gabor_fwd_kernel<T, true><<<grid, block(), 0, stream>>>(x, weight, bias, mu, gamma, lin, out, N, H, in);
  else
    gabor_fwd_kernel<T, false><<<grid, block(), 0, stream>>>(x, weight, bias, mu, gamma, lin, out, N, H, in);
  return cudaGetLastError();
}

template <typename T>
cudaError_t filter_bwd(const T* x, const T* weight, const T* bias, const T* mu, const T* gamma, const T* gh,
                       const T* lin, T* dlin, T* h_out, T* pcol, T* prow, int64_t N, int H, int in,
                       cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  if (in < 1 || in > kMaxIn) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(bwd_row_blocks(N)), static_cast<unsigned>(channel_blocks(H)));
#define FASTOMNI_LAUNCH(HAS_LIN, WRITE_H)                                                                     \
  gabor_bwd_kernel<T, HAS_LIN, WRITE_H><<<grid, block(), 0, stream>>>(x, weight, bias, mu, gamma, gh, lin, dlin, \
                                                                      h_out, pcol, prow, N, H, in)
  if (lin != nullptr && h_out != nullptr)
    FASTOMNI_LAUNCH(true, true);
  else if (lin != nullptr)
    FASTOMNI_LAUNCH(true, false);
  else if (h_out != nullptr)
    FASTOMNI_LAUNCH(false, true);
  else
    FASTOMNI_LAUNCH(false, false);
#undef FASTOMNI_LAUNCH
  return cudaGetLastError();
}

#define FASTOMNI_INSTANTIATE(T)                                                                               \
  template cudaError_t filter_fwd<T>(const T*, const T*, const T*, const T*, const T*, const T*, T*, int64_t, int, \
                                     int, cudaStream_t);                                                      \
  template cudaError_t filter_bwd<T>(const T*, const T*, const T*, const T*, const T*, const T*, const T*, T*, T*, \
                                     T*, T*, int64_t, int, int, cudaStream_t);
FASTOMNI_INSTANTIATE(float)
FASTOMNI_INSTANTIATE(double)
#undef FASTOMNI_INSTANTIATE

}  // namespace fastomni::gabor_cuda
