// Schemas of the grid_encode kernels, shared by the CPU extension (namespace fastomni_cpu) and the CUDA
// binding (fastomni_cuda), so the two cannot drift apart (Python side: fastomni/ops/grid_encode.py).
// resolutions: the [L][D] level resolutions flattened level-major (L * D ints); offsets: L + 1 row offsets.
#pragma once

namespace fastomni::schema {

inline constexpr const char* kGridEncodeFwd =
    "grid_encode_fwd(Tensor x, Tensor table, int[] resolutions, int[] offsets) -> Tensor";
inline constexpr const char* kGridEncodeBwd =
    "grid_encode_bwd(Tensor grad_out, Tensor x, Tensor table, int[] resolutions, int[] offsets) "
    "-> (Tensor, Tensor)";

}  // namespace fastomni::schema
