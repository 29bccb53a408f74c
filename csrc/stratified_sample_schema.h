// Schemas of the stratified_sample kernels, shared by the CPU extension (namespace fastomni_cpu) and the CUDA
// binding (fastomni_cuda), so the two cannot drift apart (Python side: fastomni/ops/stratified_sample.py).
#pragma once

namespace fastomni::schema {

inline constexpr const char* kStratifiedSampleFwd =
    "stratified_sample_fwd(Tensor px, Tensor? noise, int h, int w, int num_samples, "
    "float min_depth, float max_depth) -> (Tensor, Tensor)";
inline constexpr const char* kStratifiedSampleBwd =
    "stratified_sample_bwd(Tensor grad_points, int h, int w) -> Tensor";

}  // namespace fastomni::schema
