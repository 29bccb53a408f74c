// Launchers of the composite CUDA kernels (composite_cuda.cuh): one warp per ray, 8 rays per block.
// Torch-free; the binding (composite_cuda_bind.cpp) checks the tensors and the returned status.
#include "composite_cuda.cuh"

namespace fastomni::composite_cuda {

namespace {

unsigned blocks_for(int64_t R) { return static_cast<unsigned>((R + kRaysPerBlock - 1) / kRaysPerBlock); }

}  // namespace

template <typename T>
cudaError_t composite_fwd(const T* density, const T* colors, const T* points, const bool* mask, T* weights,
                          T* alphas, T* rgb, T* point, T* opacity, int64_t R, int64_t K, int C, int D,
                          bool select_max, cudaStream_t stream) {
  if (R == 0) return cudaSuccess;
  composite_fwd_kernel<T><<<blocks_for(R), kRaysPerBlock * kWarp, 0, stream>>>(
      density, colors, points, mask, weights, alphas, rgb, point, opacity, R, K, C, D, select_max);
  return cudaGetLastError();
}

template <typename T>
cudaError_t composite_bwd(const T* grad_weights, const T* grad_alphas, const T* grad_rgb, const T* grad_point,
                          const T* grad_opacity, const T* density, const T* colors, const T* points,
                          const bool* mask, T* grad_density, T* grad_colors, T* grad_points, int64_t R, int64_t K,
                          int C, int D, bool select_max, cudaStream_t stream) {
  if (R == 0) return cudaSuccess;
  composite_bwd_kernel<T><<<blocks_for(R), kRaysPerBlock * kWarp, 0, stream>>>(
      grad_weights, grad_alphas, grad_rgb, grad_point, grad_opacity, density, colors, points, mask, grad_density,
      grad_colors, grad_points, R, K, C, D, select_max);
  return cudaGetLastError();
}

#define FASTOMNI_INSTANTIATE(T)                                                                              \
  template cudaError_t composite_fwd<T>(const T*, const T*, const T*, const bool*, T*, T*, T*, T*, T*, int64_t, \
                                        int64_t, int, int, bool, cudaStream_t);                              \
  template cudaError_t composite_bwd<T>(const T*, const T*, const T*, const T*, const T*, const T*, const T*,   \
                                        const T*, const bool*, T*, T*, T*, int64_t, int64_t, int, int, bool,  \
                                        cudaStream_t);
FASTOMNI_INSTANTIATE(float)
FASTOMNI_INSTANTIATE(double)
#undef FASTOMNI_INSTANTIATE

}  // namespace fastomni::composite_cuda
