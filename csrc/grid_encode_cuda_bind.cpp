// Torch binding of the grid_encode CUDA kernels: checks, level table upload, allocation, stream, launch
// status. Registers the same schemas as the CPU extension under the fastomni_cuda namespace.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "grid_encode_checks.h"
#include "grid_encode_cuda.cuh"
#include "grid_encode_schema.h"

namespace {

void check_launch(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, what, " launch failed: ", cudaGetErrorString(status));
}

at::Tensor upload(const std::vector<int64_t>& info, const at::Tensor& like) {
  return at::tensor(info, at::TensorOptions().dtype(at::kLong)).to(like.device(), /*non_blocking=*/true);
}

at::Tensor grid_encode_fwd(const at::Tensor& x, const at::Tensor& table, c10::IntArrayRef resolutions,
                           c10::IntArrayRef offsets) {
  TORCH_CHECK(x.is_cuda(), "grid_encode: x must be a CUDA tensor, got ", x.device());
  const std::vector<int64_t> info = fastomni::grid_encode::check_args(x, table, resolutions, offsets);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), D = x.size(1), F = table.size(1), L = static_cast<int64_t>(offsets.size()) - 1;
  at::Tensor out = at::empty({N, L * F}, x.options());
  const at::Tensor levels = upload(info, x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "grid_encode_fwd_cuda", [&] {
    check_launch(fastomni::grid_encode_cuda::grid_encode_fwd<scalar_t>(
                     x.data_ptr<scalar_t>(), table.data_ptr<scalar_t>(), levels.data_ptr<int64_t>(),
                     out.data_ptr<scalar_t>(), N, D, L, F, c10::cuda::getCurrentCUDAStream()),
                 "grid_encode_fwd");
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> grid_encode_bwd(const at::Tensor& grad_out, const at::Tensor& x,
                                                   const at::Tensor& table, c10::IntArrayRef resolutions,
                                                   c10::IntArrayRef offsets) {
  TORCH_CHECK(x.is_cuda(), "grid_encode: x must be a CUDA tensor, got ", x.device());
  const std::vector<int64_t> info = fastomni::grid_encode::check_args(x, table, resolutions, offsets, &grad_out);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), D = x.size(1), F = table.size(1), L = static_cast<int64_t>(offsets.size()) - 1;
  at::Tensor grad_x = at::zeros({N, D}, x.options()), grad_table = at::zeros(table.sizes(), table.options());
  const at::Tensor levels = upload(info, x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "grid_encode_bwd_cuda", [&] {
    check_launch(fastomni::grid_encode_cuda::grid_encode_bwd<scalar_t>(
                     grad_out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), table.data_ptr<scalar_t>(),
                     levels.data_ptr<int64_t>(), grad_x.data_ptr<scalar_t>(), grad_table.data_ptr<scalar_t>(), N, D,
                     L, F, c10::cuda::getCurrentCUDAStream()),
                 "grid_encode_bwd");
  });
  return {grad_x, grad_table};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastomni_cuda, m) {
  m.def(fastomni::schema::kGridEncodeFwd);
  m.def(fastomni::schema::kGridEncodeBwd);
}

TORCH_LIBRARY_IMPL(fastomni_cuda, CUDA, m) {
  m.impl("grid_encode_fwd", &grid_encode_fwd);
  m.impl("grid_encode_bwd", &grid_encode_bwd);
}
