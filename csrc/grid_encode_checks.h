// Argument checks of the grid_encode kernels, shared by the CPU extension and the CUDA binding: a direct
// call of torch.ops.fastomni_{cpu,cuda}.grid_encode_* with wrong shapes fails here, naming the sizes,
// instead of reading out of bounds. Schemas: grid_encode_schema.h; level table: grid_encode_levels.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <vector>

#include "grid_encode_levels.h"

namespace fastomni::grid_encode {

// x [N, D], table [S, F] (and grad_out [N, L F] when given): one floating dtype and device, contiguous.
// Returns the level table (grid_encode_levels.h).
inline std::vector<int64_t> check_args(const at::Tensor& x, const at::Tensor& table, c10::IntArrayRef resolutions,
                                       c10::IntArrayRef offsets, const at::Tensor* grad_out = nullptr) {
  TORCH_CHECK(x.dim() == 2, "grid_encode: x must be [N, D], got ", x.sizes());
  TORCH_CHECK(table.dim() == 2, "grid_encode: table must be [S, F], got ", table.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "grid_encode: x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(table.scalar_type() == x.scalar_type(), "grid_encode: table dtype ", table.scalar_type(),
              " differs from x dtype ", x.scalar_type());
  TORCH_CHECK(table.device() == x.device(), "grid_encode: table is on ", table.device(), ", x on ", x.device());
  TORCH_CHECK(x.is_contiguous() && table.is_contiguous(), "grid_encode: x and table must be contiguous");
  std::vector<int64_t> info;
  const std::string why = build_levels(resolutions.vec(), offsets.vec(), x.size(1), table.size(0), info);
  TORCH_CHECK(why.empty(), "grid_encode: ", why);
  if (grad_out != nullptr) {
    const int64_t L = static_cast<int64_t>(offsets.size()) - 1;
    TORCH_CHECK(grad_out->dim() == 2 && grad_out->size(0) == x.size(0) && grad_out->size(1) == L * table.size(1),
                "grid_encode: grad_out must be [", x.size(0), ", ", L * table.size(1), "], got ", grad_out->sizes());
    TORCH_CHECK(grad_out->scalar_type() == x.scalar_type() && grad_out->device() == x.device(),
                "grid_encode: grad_out must match x's dtype and device");
    TORCH_CHECK(grad_out->is_contiguous(), "grid_encode: grad_out must be contiguous");
  }
  return info;
}

}  // namespace fastomni::grid_encode
