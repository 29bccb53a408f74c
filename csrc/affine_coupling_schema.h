// Schemas of the affine_coupling kernels, shared by the CPU extension (namespace fastomni_cpu) and the
// CUDA binding (fastomni_cuda), so the two cannot drift apart (Python side: fastomni/ops/affine_coupling.py).
#pragma once

namespace fastomni::schema {

inline constexpr const char* kAffineCouplingFwd =
    "affine_coupling_fwd(Tensor y, Tensor code_bias, Tensor proj_weight, Tensor proj_bias, Tensor in_weight, "
    "Tensor[] hidden_weights, Tensor[] hidden_biases, Tensor out_weight, Tensor out_bias, Tensor sigma, "
    "int transformed, bool inverse, float negative_slope) -> Tensor";
inline constexpr const char* kAffineCouplingBwd =
    "affine_coupling_bwd(Tensor grad_out, Tensor y, Tensor code_bias, Tensor proj_weight, Tensor proj_bias, "
    "Tensor in_weight, Tensor[] hidden_weights, Tensor[] hidden_biases, Tensor out_weight, Tensor out_bias, "
    "Tensor sigma, int transformed, bool inverse, float negative_slope) -> Tensor[]";

}  // namespace fastomni::schema
