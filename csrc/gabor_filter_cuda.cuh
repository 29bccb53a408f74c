// Gabor filter epilogues on the GPU, device code (spec: fastomni/reference/gabor_filter.py).
// Torch-free: raw pointers, cuda_runtime.h only. The launchers (gabor_filter_cuda.cu) are declared at
// the end, outside the __CUDACC__ block, so the host-compiled binding can include this header. The
// GEMMs that feed the filters (lin = h L^T + c, gh = dlin L) are cuBLAS calls made by the binding.
//
// Filter on x [N, IN] (IN <= kMaxIn; 1 or 3 in OmniMotion), channel h of H:
//   z = x W_h + b_h,  D = (|x|^2 + |mu_h|^2) - 2 x mu_h,  e = exp(-0.5 D gamma_h),  g = sin(z) e.
// Tiling: a block is 8 warps; blockIdx.y picks 32 consecutive channels (lane = channel, so every
// [N, H] load and store of a warp is one coalesced 128-byte line in float32), blockIdx.x a tile of
// rows, each warp taking every 8th row of it. A thread keeps its channel's W_h, mu_h, b_h, gamma_h,
// |mu_h|^2 in registers; x_n is the same address across the warp (one broadcast load).
//   forward (kFwdRows rows a block): out = g (* lin).
//   backward (kBwdRows rows a block): dlin = gh g, h = g lin, dg = gh lin, dz = dg cos(z) e,
//     t = dg g, dD = -0.5 gamma t. Column sums over the block's rows (db, dgamma, dD, dlin, dz x_i,
//     dD x_i) accumulate in registers, then across the 8 warps through shared memory, into
//     pcol [row blocks, 4 + 2 IN, H]; row sums over the warp's 32 channels (dz W_i, dD mu_i, dD) are
//     warp shuffles, giving dx partials prow [channel blocks, N, IN]. The binding sums the partials.
// Bytes per point and layer (s = element size): forward reads lin (H s) and writes out (H s);
// backward reads gh and lin and writes dlin and h (4 H s) plus IN * 4 s per 32 channels of prow.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fastomni::gabor_cuda {

constexpr int kMaxIn = 4;       // widest input supported (the kernels keep IN values per point)
constexpr int kWarp = 32;       // channels per block
constexpr int kWarps = 8;       // warps per block
constexpr int kFwdRows = 64;    // rows per forward block
constexpr int kBwdRows = 128;   // rows per backward block: pcol has N / 128 rows of partials
constexpr int kColSums = 4;     // db, dgamma, sum dD, sum dlin; then IN x dz x_i, IN x dD x_i

#ifdef __CUDACC__

constexpr unsigned kFullMask = 0xffffffffu;

__device__ inline void sin_cos(float z, float* s, float* c) { sincosf(z, s, c); }  // full range, ~1 ulp
__device__ inline void sin_cos(double z, double* s, double* c) { sincos(z, s, c); }
__device__ inline float exp_(float a) { return expf(a); }
__device__ inline double exp_(double a) { return exp(a); }

template <typename T>
__device__ T warp_sum(T v) {
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// One channel's filter parameters, in registers (zeros for a channel past H).
template <typename T>
struct Channel {
  T w[kMaxIn], mu[kMaxIn], b, gamma, mm;

  __device__ Channel(const T* weight, const T* bias, const T* mu_, const T* gamma_, int h, int H, int in) {
    const bool ok = h < H;
    mm = T(0);
    for (int i = 0; i < kMaxIn; ++i) {
      w[i] = ok && i < in ? weight[static_cast<int64_t>(h) * in + i] : T(0);
      mu[i] = ok && i < in ? mu_[static_cast<int64_t>(h) * in + i] : T(0);
      mm += mu[i] * mu[i];
    }
    b = ok ? bias[h] : T(0);
    gamma = ok ? gamma_[h] : T(0);
  }

  // z and D for the point xn (xx = |xn|^2), accumulated over inputs in order.
  __device__ void eval(const T* xn, T xx, int in, T* z, T* d) const {
    T zz = T(0), dot = T(0);
    for (int i = 0; i < kMaxIn; ++i) {
      if (i < in) {
        zz += xn[i] * w[i];
        dot += xn[i] * mu[i];
      }
    }
    *z = zz + b;
    *d = (xx + mm) - T(2) * dot;
  }
};

template <typename T>
__device__ T load_point(const T* x, int64_t n, int in, T* xn) {
  T xx = T(0);
  for (int i = 0; i < kMaxIn; ++i) {
    xn[i] = i < in ? x[n * in + i] : T(0);
    xx += xn[i] * xn[i];
  }
  return xx;
}

template <typename T, bool HasLin>
__global__ void __launch_bounds__(kWarp* kWarps)
    gabor_fwd_kernel(const T* __restrict__ x, const T* __restrict__ weight, const T* __restrict__ bias,
                     const T* __restrict__ mu, const T* __restrict__ gamma, const T* __restrict__ lin,
                     T* __restrict__ out, int64_t N, int H, int in) {
  const int h = blockIdx.y * kWarp + threadIdx.x;
  const Channel<T> ch(weight, bias, mu, gamma, h, H, in);
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kFwdRows;
  for (int64_t n = r0 + threadIdx.y; n < N && n < r0 + kFwdRows; n += kWarps) {
    T xn[kMaxIn];
    const T xx = load_point(x, n, in, xn);
    if (h >= H) continue;
    T z, d, s, c;
    ch.eval(xn, xx, in, &z, &d);
    sin_cos(z, &s, &c);
    const T g = s * exp_(T(-0.5) * d * ch.gamma);
    const int64_t at = n * H + h;
    out[at] = HasLin ? g * lin[at] : g;
  }
}

template <typename T, bool HasLin, bool WriteH>
__global__ void __launch_bounds__(kWarp* kWarps)
    gabor_bwd_kernel(const T* __restrict__ x, const T* __restrict__ weight, const T* __restrict__ bias,
                     const T* __restrict__ mu, const T* __restrict__ gamma, const T* __restrict__ gh,
                     const T* __restrict__ lin, T* __restrict__ dlin, T* __restrict__ h_out, T* __restrict__ pcol,
                     T* __restrict__ prow, int64_t N, int H, int in) {
  constexpr int kSums = kColSums + 2 * kMaxIn;
  __shared__ T shared[kWarps][kSums][kWarp];
  const int lane = threadIdx.x, warp = threadIdx.y;
  const int h = blockIdx.y * kWarp + lane;
  const bool active = h < H;
  const Channel<T> ch(weight, bias, mu, gamma, h, H, in);
  T sums[kSums];
  for (int j = 0; j < kSums; ++j) sums[j] = T(0);
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kBwdRows;
  for (int64_t n = r0 + warp; n < N && n < r0 + kBwdRows; n += kWarps) {  // uniform across the warp
    T xn[kMaxIn];
    const T xx = load_point(x, n, in, xn);
    const int64_t at = n * H + h;
    T z, d, s, c;
    ch.eval(xn, xx, in, &z, &d);
    sin_cos(z, &s, &c);
    const T e = exp_(T(-0.5) * d * ch.gamma);
    const T g = s * e;
    const T go = active ? gh[at] : T(0);
    T dg = go;
    if (HasLin) {
      const T l = active ? lin[at] : T(0);
      dg = go * l;
      const T gl = go * g;
      if (active) {
        dlin[at] = gl;
        if (WriteH) h_out[at] = g * l;
      }
      sums[3] += gl;
    } else if (WriteH && active) {
      h_out[at] = g;
    }
    const T t = dg * g;
    const T dz = dg * c * e;
    const T dd = T(-0.5) * ch.gamma * t;
    sums[0] += dz;
    sums[1] += T(-0.5) * d * t;
    sums[2] += dd;
    const T row_dd = warp_sum(dd);
    for (int i = 0; i < kMaxIn; ++i) {
      if (i < in) {
        sums[kColSums + i] += dz * xn[i];
        sums[kColSums + kMaxIn + i] += dd * xn[i];
        const T dx = warp_sum(dz * ch.w[i]) + T(2) * (row_dd * xn[i] - warp_sum(dd * ch.mu[i]));
        if (lane == 0) prow[(static_cast<int64_t>(blockIdx.y) * N + n) * in + i] = dx;
      }
    }
  }
  for (int j = 0; j < kSums; ++j) shared[warp][j][lane] = sums[j];
  __syncthreads();
  // warp w reduces the sums j = w, w + 8, ... over the 8 warps, in warp order
  for (int j = warp; j < kSums; j += kWarps) {
    const bool used = j < kColSums || (j < kColSums + in) || (j >= kColSums + kMaxIn && j < kColSums + kMaxIn + in);
    if (!used || !active) continue;
    T total = T(0);
    for (int w = 0; w < kWarps; ++w) total += shared[w][j][lane];
    const int slot = j < kColSums + kMaxIn ? j : j - kMaxIn + in;  // dense layout: 4 + 2 IN rows
    pcol[(static_cast<int64_t>(blockIdx.x) * (kColSums + 2 * in) + slot) * H + h] = total;
  }
}

#endif  // __CUDACC__

// Grid sizes, so the binding allocates the partial buffers to match.
inline int64_t fwd_row_blocks(int64_t N) { return (N + kFwdRows - 1) / kFwdRows; }
inline int64_t bwd_row_blocks(int64_t N) { return (N + kBwdRows - 1) / kBwdRows; }
inline int channel_blocks(int H) { return (H + kWarp - 1) / kWarp; }

// out [N, H] = g (lin null) or g * lin, for x [N, in], weight/mu [H, in], bias/gamma [H].
template <typename T>
cudaError_t filter_fwd(const T* x, const T* weight, const T* bias, const T* mu, const T* gamma, const T* lin,
                       T* out, int64_t N, int H, int in, cudaStream_t stream);

// Backward of out = g (* lin) from gh = dLoss/dout: dlin (when lin is given), h_out (when not null),
// pcol [bwd_row_blocks(N), 4 + 2 in, H] and prow [channel_blocks(H), N, in] (see the header).
template <typename T>
cudaError_t filter_bwd(const T* x, const T* weight, const T* bias, const T* mu, const T* gamma, const T* gh,
                       const T* lin, T* dlin, T* h_out, T* pcol, T* prow, int64_t N, int H, int in,
                       cudaStream_t stream);

}  // namespace fastomni::gabor_cuda
