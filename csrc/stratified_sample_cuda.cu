// Launchers of the stratified_sample CUDA kernels (stratified_sample_cuda.cuh). Torch-free; the binding
// (stratified_sample_cuda_bind.cpp) checks the tensors and the returned status.
#include "stratified_sample_cuda.cuh"

namespace fastomni::stratified_sample_cuda {

namespace {

unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

}  // namespace

template <typename T>
cudaError_t stratified_sample_fwd(const T* px, const T* noise, T* points, T* depths, int64_t R, int64_t K, int64_t h,
                                  int64_t w, double min_depth, double max_depth, cudaStream_t stream) {
  if (R * K == 0) return cudaSuccess;
  stratified_fwd_kernel<T><<<blocks_for(R * K), kThreads, 0, stream>>>(
      px, noise, points, depths, R, K, static_cast<T>(w - 1), static_cast<T>(h - 1), static_cast<float>(min_depth),
      static_cast<float>(max_depth));
  return cudaGetLastError();
}

template <typename T>
cudaError_t stratified_sample_bwd(const T* grad_points, T* grad_px, int64_t R, int64_t K, int64_t h, int64_t w,
                                  cudaStream_t stream) {
  if (R == 0) return cudaSuccess;
  stratified_bwd_kernel<T><<<blocks_for(R * kWarp), kThreads, 0, stream>>>(
      grad_points, grad_px, R, K, static_cast<T>(w - 1), static_cast<T>(h - 1));
  return cudaGetLastError();
}

#define FASTOMNI_INSTANTIATE(T)                                                                              \
  template cudaError_t stratified_sample_fwd<T>(const T*, const T*, T*, T*, int64_t, int64_t, int64_t, int64_t, \
                                                double, double, cudaStream_t);                               \
  template cudaError_t stratified_sample_bwd<T>(const T*, T*, int64_t, int64_t, int64_t, int64_t, cudaStream_t);
FASTOMNI_INSTANTIATE(float)
FASTOMNI_INSTANTIATE(double)
#undef FASTOMNI_INSTANTIATE

}  // namespace fastomni::stratified_sample_cuda
