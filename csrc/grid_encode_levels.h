// Level table of the grid_encode kernels (spec: fastomni/reference/grid_encode.py), torch-free so the CPU
// kernels, the CUDA device code (grid_encode_cuda.cuh) and the host checks share one layout and one hash.
//
// Each level is kLevelInfo int64 values: row offset, row count, dense flag, the D resolutions R_d and, for
// dense levels, the row strides of the vertex index (1, V_0, V_0 V_1, ..., V_d = R_d + 1). The dense test
// prod_d V_d <= size is evaluated with early exit, so resolutions whose vertex count overflows int64 are
// simply hashed (the reference decides the same way with Python's unbounded ints).
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

namespace fastomni::grid_encode {

inline constexpr int kMaxDim = 4;
inline constexpr int kLevelInfo = 12;
enum LevelSlot : int { kOffset = 0, kSize = 1, kDense = 2, kRes = 4, kStride = 8 };

// Instant-NGP's primes; the hash is xor_d (v_d * PRIMES[d] mod 2^32), then mod the level's rows.
inline constexpr uint32_t kPrimes[kMaxDim] = {1u, 2654435761u, 805459861u, 3674653429u};

// Fill `info` ([L * kLevelInfo]) from resolutions [L * D] (level-major) and offsets [L + 1] for a table of
// `rows` rows; returns an empty string, or what is wrong with the arguments.
inline std::string build_levels(const std::vector<int64_t>& resolutions, const std::vector<int64_t>& offsets,
                                int64_t dim, int64_t rows, std::vector<int64_t>& info) {
  if (dim < 1 || dim > kMaxDim) return "x must be [N, D] with D in 1..4, got D = " + std::to_string(dim);
  const int64_t L = static_cast<int64_t>(offsets.size()) - 1;
  if (L < 0 || offsets[0] != 0 || offsets[L] != rows) {
    return "offsets must run from 0 to the table's " + std::to_string(rows) + " rows, got " +
           std::to_string(offsets.size()) + " offsets";
  }
  if (static_cast<int64_t>(resolutions.size()) != L * dim) {
    return "resolutions must hold L * D = " + std::to_string(L) + " * " + std::to_string(dim) + " values, got " +
           std::to_string(resolutions.size());
  }
  info.assign(static_cast<size_t>(L * kLevelInfo), 0);
  for (int64_t l = 0; l < L; ++l) {
    int64_t* lv = info.data() + l * kLevelInfo;
    const int64_t size = offsets[l + 1] - offsets[l];
    if (size < 1) return "offsets must be strictly increasing, level " + std::to_string(l) + " has " +
                         std::to_string(size) + " rows";
    lv[kOffset] = offsets[l];
    lv[kSize] = size;
    int64_t stride = 1;
    bool dense = true;
    for (int64_t d = 0; d < dim; ++d) {
      const int64_t r = resolutions[l * dim + d];
      if (r < 1) return "resolutions must be >= 1, level " + std::to_string(l) + " has " + std::to_string(r);
      lv[kRes + d] = r;
      lv[kStride + d] = stride;
      if (dense && stride > size / (r + 1)) dense = false;  // stride * (r + 1) > size, without overflow
      if (dense) stride *= r + 1;
    }
    lv[kDense] = dense ? 1 : 0;
    if (!dense) {
      for (int64_t d = 0; d < dim; ++d) lv[kStride + d] = 0;
    }
  }
  return {};
}

// Calls fn(integral_constant<int, D>, integral_constant<int, FC>) for the runtime D (1..4) and F: FC = F for
// F in {1, 2, 4} (a compile-time feature loop), else FC = 0 (F read at run time). Host code.
template <typename Fn>
void dispatch_shape(int64_t D, int64_t F, Fn&& fn) {
  auto by_f = [&](auto dim) {
    switch (F) {
      case 1: fn(dim, std::integral_constant<int, 1>{}); break;
      case 2: fn(dim, std::integral_constant<int, 2>{}); break;
      case 4: fn(dim, std::integral_constant<int, 4>{}); break;
      default: fn(dim, std::integral_constant<int, 0>{}); break;
    }
  };
  switch (D) {
    case 1: by_f(std::integral_constant<int, 1>{}); break;
    case 2: by_f(std::integral_constant<int, 2>{}); break;
    case 3: by_f(std::integral_constant<int, 3>{}); break;
    default: by_f(std::integral_constant<int, 4>{}); break;
  }
}

}  // namespace fastomni::grid_encode
