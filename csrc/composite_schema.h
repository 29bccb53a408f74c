// Schemas of the composite kernels, shared by the CPU extension (namespace fastomni_cpu) and the CUDA
// binding (fastomni_cuda), so the two cannot drift apart (Python side: fastomni/ops/composite.py).
#pragma once

namespace fastomni::schema {

inline constexpr const char* kCompositeFwd =
    "composite_fwd(Tensor density, Tensor colors, Tensor points, Tensor? mask, bool select_max) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)";
inline constexpr const char* kCompositeBwd =
    "composite_bwd(Tensor grad_weights, Tensor grad_alphas, Tensor grad_rgb, Tensor grad_point, "
    "Tensor grad_opacity, Tensor density, Tensor colors, Tensor points, Tensor? mask, "
    "bool select_max) -> (Tensor, Tensor, Tensor)";

}  // namespace fastomni::schema
