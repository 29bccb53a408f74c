// Schemas of the gabor_filter kernels, shared by the CPU extension (namespace fastomni_cpu) and the
// CUDA binding (fastomni_cuda), so the two cannot drift apart (Python side: fastomni/ops/gabor_filter.py).
#pragma once

namespace fastomni::schema {

inline constexpr const char* kGaborStepFwd =
    "gabor_step_fwd(Tensor x, Tensor weight, Tensor bias, Tensor mu, Tensor gamma, Tensor? prev, "
    "Tensor? lin_weight, Tensor? lin_bias) -> Tensor";
inline constexpr const char* kGaborStepBwd =
    "gabor_step_bwd(Tensor grad_out, Tensor x, Tensor weight, Tensor bias, Tensor mu, Tensor gamma, "
    "Tensor? prev, Tensor? lin_weight, Tensor? lin_bias) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)";
inline constexpr const char* kGaborNetFwd =
    "gabor_net_fwd(Tensor x, Tensor[] filter_weight, Tensor[] filter_bias, Tensor[] mu, Tensor[] gamma, "
    "Tensor[] lin_weight, Tensor[] lin_bias, Tensor out_weight, Tensor out_bias, bool save_lin) "
    "-> (Tensor, Tensor)";
inline constexpr const char* kGaborNetBwd =
    "gabor_net_bwd(Tensor grad_out, Tensor x, Tensor[] filter_weight, Tensor[] filter_bias, Tensor[] mu, "
    "Tensor[] gamma, Tensor[] lin_weight, Tensor[] lin_bias, Tensor out_weight, Tensor out_bias, Tensor lins) "
    "-> (Tensor, Tensor[], Tensor[], Tensor[], Tensor[], Tensor[], Tensor[], Tensor, Tensor)";

}  // namespace fastomni::schema
