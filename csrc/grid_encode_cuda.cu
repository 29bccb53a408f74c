// Launchers of the grid_encode CUDA kernels (grid_encode_cuda.cuh). Torch-free; the binding
// (grid_encode_cuda_bind.cpp) checks the tensors, builds the level table and checks the returned status.
#include "grid_encode_cuda.cuh"

namespace fastomni::grid_encode_cuda {

using fastomni::grid_encode::dispatch_shape;

namespace {

dim3 grid_for(int64_t N, int64_t L) {
  return dim3(static_cast<unsigned>((N + kThreads - 1) / kThreads), static_cast<unsigned>(L));
}

}  // namespace

template <typename T>
cudaError_t grid_encode_fwd(const T* x, const T* table, const int64_t* levels, T* out, int64_t N, int64_t D,
                            int64_t L, int64_t F, cudaStream_t stream) {
  if (N == 0 || L == 0 || F == 0) return cudaSuccess;
  if (L > 65535) return cudaErrorInvalidConfiguration;  // gridDim.y
  dispatch_shape(D, F, [&](auto dc, auto fc) {
    grid_fwd_kernel<T, decltype(dc)::value, decltype(fc)::value>
        <<<grid_for(N, L), kThreads, 0, stream>>>(x, table, levels, out, N, L, F);
  });
  return cudaGetLastError();
}

template <typename T>
cudaError_t grid_encode_bwd(const T* grad_out, const T* x, const T* table, const int64_t* levels, T* grad_x,
                            T* grad_table, int64_t N, int64_t D, int64_t L, int64_t F, cudaStream_t stream) {
  if (N == 0 || L == 0 || F == 0) return cudaSuccess;
  if (L > 65535) return cudaErrorInvalidConfiguration;
  dispatch_shape(D, F, [&](auto dc, auto fc) {
    grid_bwd_kernel<T, decltype(dc)::value, decltype(fc)::value>
        <<<grid_for(N, L), kThreads, 0, stream>>>(grad_out, x, table, levels, grad_x, grad_table, N, L, F);
  });
  return cudaGetLastError();
}

#define FASTOMNI_INSTANTIATE(T)                                                                          \
  template cudaError_t grid_encode_fwd<T>(const T*, const T*, const int64_t*, T*, int64_t, int64_t, int64_t, \
                                          int64_t, cudaStream_t);                                        \
  template cudaError_t grid_encode_bwd<T>(const T*, const T*, const T*, const int64_t*, T*, T*, int64_t, \
                                          int64_t, int64_t, int64_t, cudaStream_t);
FASTOMNI_INSTANTIATE(float)
FASTOMNI_INSTANTIATE(double)
#undef FASTOMNI_INSTANTIATE

}  // namespace fastomni::grid_encode_cuda
