// One affine coupling layer of OmniMotion's bijection, CUDA device code (spec:
// fastomni/reference/affine_coupling.py). Torch-free: raw pointers, cuda_runtime.h only. The launchers
// (affine_coupling_cuda.cu) are declared at the end, outside the __CUDACC__ block, so the host-compiled
// binding can include this header.
//
// Network: encoding e (2 + 4F) -> p (PD) -> h0 (H0, + per-frame code bias) -> h1 (H1) -> h2 (H2) -> (s, t),
// LeakyReLU after every hidden linear, widths <= kMaxWidth. Weights in torch's Linear layout [out, in].
//
// A block of kThreads threads takes BM points of one frame (grid: point blocks x frames), so the frame's
// code bias is one row. The block's activations live in shared memory, rows padded to width + 1 so
// that threads reading different rows of one column hit different banks. Each linear layer is a loop
// over register tiles of TM points x TN outputs per thread (TM + TN loads per TM * TN FMAs); weights
// are read through L1/L2 (every block reads all of them, so they stay in L2).
//   forward:  two activation buffers, alternating; s, t by two dot products per point.
//   backward: recomputes e, p, h0, h1, h2 (h0 to h2 in three buffers), then the chain rule, each gradient
//             taking the buffer of an activation no longer needed (h0 is recomputed from p for its own
//             step); a layer's weight gradient is the block's partial sum dW[n][k] = sum_m g[m][n] a[m][k],
//             added to the output with one atomicAdd per weight (so the weight gradients must start at
//             zero, and their float rounding depends on the order of the blocks: not deterministic).
// Shared memory (BM * sizeof(T) = 128 B, widths 256, F = 4): forward 68,224 B, backward 134,272 B per
// block (shared_bytes), under sm_80's opt-in limit of 166,912 B.
// Bytes per point from DRAM: forward y and x (24 B for float32), backward y, grad and grad_y (36 B); the
// weights come from L2 once per block: ~806 KB / BM forward, ~1.6 MB / BM backward, and the backward
// adds ~806 KB of atomics per block.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fastomni::affine_coupling_cuda {

constexpr int kThreads = 256;
constexpr int kMaxWidth = 256;  // widest layer the shared-memory plan allows
constexpr double kSClamp = 8.0;

// Points per block: the backward keeps four [BM, width + 1] buffers; BM * sizeof(T) = 128 bytes keeps
// them under sm_80's 163 KB for both float32 and float64.
template <typename T>
constexpr int kPointsPerBlock = static_cast<int>(128 / sizeof(T));

// Device pointers of the layer's parameters, torch layout: proj_w [PD, 2+4F], in_w [H0, PD],
// w1 [H1, H0], w2 [H2, H1], out_w [2, H2], biases [out]; and the transposes of the four hidden weights,
// [in, out] contiguous (made by the binding): the forward's products read them, so that the threads
// of a warp, on consecutive outputs, read consecutive weights (the backward's g W reads W itself,
// which is [in, out] for it).
template <typename T>
struct Weights {
  const T* proj_w;
  const T* proj_b;
  const T* in_w;
  const T* w1;
  const T* b1;
  const T* w2;
  const T* b2;
  const T* out_w;
  const T* out_b;
  const T* sigma;  // [F]
  const T* proj_wt;  // [2+4F, PD]
  const T* in_wt;    // [PD, H0]
  const T* w1t;      // [H0, H1]
  const T* w2t;      // [H1, H2]
};

// Gradient outputs, same shapes as the inputs; all but y must be zero-initialised (atomic sums).
template <typename T>
struct Grads {
  T* y;
  T* code_bias;
  T* proj_w;
  T* proj_b;
  T* in_w;
  T* w1;
  T* b1;
  T* w2;
  T* b2;
  T* out_w;
  T* out_b;
};

struct Sizes {
  int64_t n, P;  // frames, points per frame
  int F, PD, H0, H1, H2;
  int transformed;
  bool inverse;
  double negative_slope;
};

struct Layout {  // shared-memory row strides of a block
  int enc, ld;   // encoding width 2 + 4F; activation row stride (widest layer + 1)
  __host__ __device__ explicit Layout(const Sizes& s) : enc(2 + 4 * s.F) {
    int w = s.PD > s.H0 ? s.PD : s.H0;
    w = w > s.H1 ? w : s.H1;
    w = w > s.H2 ? w : s.H2;
    ld = (w > enc ? w : enc) + 1;
  }
};

// Bytes of dynamic shared memory a block of the forward / backward kernel needs for these sizes:
// forward e, two activation buffers, st; backward e, p, three activation/gradient buffers, st, gyc.
// At PD = H = 256, F = 4: forward 68,224 B, backward 134,272 B (float32 and float64 alike), within
// the 166,912 B a block may opt in to on sm_80 (232,448 B on sm_90). tests/test_gpu_resources.py
// checks these numbers, and the backend check compares them with the device's limit.
template <typename T>
inline size_t shared_bytes(const Sizes& s, bool backward) {
  const Layout L(s);
  const size_t bm = kPointsPerBlock<T>;
  const size_t elems = backward ? bm * L.enc + 4 * bm * L.ld + 3 * bm : bm * L.enc + 2 * bm * L.ld + 2 * bm;
  return elems * sizeof(T);
}

// FASTOMNI_CUDA_EMULATE: tests compile the kernels as plain C++ and run them with one thread per block
// (every loop below strides by blockDim.x and every phase ends at a barrier, so one thread computes
// exactly what a full block does), which checks their indexing and math against the reference on a
// machine without a GPU; see tests/affine_coupling_cuda_emulation.cpp.
#if defined(__CUDACC__) || defined(FASTOMNI_CUDA_EMULATE)

constexpr int kTM = 4, kTN = 4;  // register tile: points x outputs

// out[m][j] = sum_i A[m][i] * W[i * ws_i + j * ws_j] for m < M, j < N. With (ws_i, ws_j) = (N, 1) it is
// A W for W [K, N] (a transposed torch weight, or the backward's g W); with (1, K), A W^T for W [N, K].
// Consecutive threads take consecutive output tiles: with ws_j = 1 a warp's weight reads are contiguous
// (coalesced, kTN values per thread), its reads of A one shared-memory broadcast. Weights are read
// through L1/L2, not staged: every block reads the same weights (they stay in L2), and the backward's
// shared memory (134 KB at width 256) leaves no room for a weight tile on sm_80.
template <typename T>
__device__ void block_matmul(const T* A, int lda, int M, int K, const T* __restrict__ W, int64_t ws_i, int64_t ws_j,
                             int N, T* out, int ldo) {
  const int m_tiles = (M + kTM - 1) / kTM, n_tiles = (N + kTN - 1) / kTN;
  for (int item = threadIdx.x; item < m_tiles * n_tiles; item += blockDim.x) {
    const int n0 = (item % n_tiles) * kTN, m0 = (item / n_tiles) * kTM;
    T acc[kTM][kTN] = {};
    for (int i = 0; i < K; ++i) {
      T a[kTM], w[kTN];
#pragma unroll
      for (int r = 0; r < kTM; ++r) a[r] = m0 + r < M ? A[(m0 + r) * lda + i] : T(0);
#pragma unroll
      for (int c = 0; c < kTN; ++c) w[c] = n0 + c < N ? W[i * ws_i + (n0 + c) * ws_j] : T(0);
#pragma unroll
      for (int r = 0; r < kTM; ++r)
#pragma unroll
        for (int c = 0; c < kTN; ++c) acc[r][c] += a[r] * w[c];
    }
#pragma unroll
    for (int r = 0; r < kTM; ++r)
#pragma unroll
      for (int c = 0; c < kTN; ++c)
        if (m0 + r < M && n0 + c < N) out[(m0 + r) * ldo + n0 + c] = acc[r][c];
  }
}

// x[m][j] <- leaky(x[m][j] + bias[j])
template <typename T>
__device__ void bias_leaky(T* x, int ld, int M, int N, const T* __restrict__ bias, T slope) {
  for (int idx = threadIdx.x; idx < M * N; idx += blockDim.x) {
    const int m = idx / N, j = idx % N;
    const T a = x[m * ld + j] + bias[j];
    x[m * ld + j] = a > T(0) ? a : a * slope;
  }
}

// g[m][j] <- g[m][j] * leaky'(act[m][j]) (act is the LeakyReLU output: same sign as its input)
template <typename T>
__device__ void leaky_backward(T* g, const T* act, int ld, int M, int N, T slope) {
  for (int idx = threadIdx.x; idx < M * N; idx += blockDim.x) {
    const int m = idx / N, j = idx % N;
    if (!(act[m * ld + j] > T(0))) g[m * ld + j] *= slope;
  }
}

// dW[n][k] += sum_m g[m][n] a[m][k] and (bias_grad non-null) bias_grad[n] += sum_m g[m][n]. Consecutive
// threads take consecutive k: coalesced atomics, conflict-free shared reads.
template <typename T>
__device__ void add_weight_grad(const T* g, int ldg, const T* a, int lda, int M, int N, int K, T* dW, T* bias_grad) {
  for (int idx = threadIdx.x; idx < N * K; idx += blockDim.x) {
    const int n = idx / K, k = idx % K;
    T acc = 0;
    for (int m = 0; m < M; ++m) acc += g[m * ldg + n] * a[m * lda + k];
    atomicAdd(dW + idx, acc);
  }
  if (bias_grad == nullptr) return;
  for (int n = threadIdx.x; n < N; n += blockDim.x) {
    T acc = 0;
    for (int m = 0; m < M; ++m) acc += g[m * ldg + n];
    atomicAdd(bias_grad + n, acc);
  }
}

template <typename T>
struct Point {  // the block's points: kept coordinates and the transformed one
  int M;        // valid points in this block
  const T* y;   // first point's row of y [.., 3]
};

// e = [v0, v1, sin(v0 sigma), cos(v0 sigma), sin(v1 sigma), cos(v1 sigma)] for the block's points.
template <typename T>
__device__ void encode(const Point<T>& pts, const Sizes& s, const T* __restrict__ sigma, T* e, int ld_e) {
  const int k0 = s.transformed == 0 ? 1 : 0, k1 = s.transformed == 2 ? 1 : 2, F = s.F;
  for (int idx = threadIdx.x; idx < pts.M * (2 + 4 * F); idx += blockDim.x) {
    const int m = idx / (2 + 4 * F), j = idx % (2 + 4 * F);
    const T v0 = pts.y[m * 3 + k0], v1 = pts.y[m * 3 + k1];
    T val;
    if (j < 2) {
      val = j == 0 ? v0 : v1;
    } else {
      const int jj = j - 2, d = jj / (2 * F), r = jj % (2 * F);
      const T arg = (d == 0 ? v0 : v1) * sigma[r % F];
      val = r < F ? sin(arg) : cos(arg);
    }
    e[m * ld_e + j] = val;
  }
}

// The network on the block's points: acts[0..3] receive p, h0, h1, h2 (acts may repeat buffers when
// earlier layers are not needed later); st[m] = (s before the clamp, t).
template <typename T>
__device__ void network(const Point<T>& pts, const Sizes& s, const Weights<T>& w, const T* __restrict__ code_bias_row,
                        const Layout& L, T* e, T* const acts[4], T* st) {
  const T slope = static_cast<T>(s.negative_slope);
  const int M = pts.M;
  encode(pts, s, w.sigma, e, L.enc);
  __syncthreads();
  block_matmul(e, L.enc, M, L.enc, w.proj_wt, s.PD, 1, s.PD, acts[0], L.ld);
  __syncthreads();
  bias_leaky(acts[0], L.ld, M, s.PD, w.proj_b, slope);
  __syncthreads();
  block_matmul(acts[0], L.ld, M, s.PD, w.in_wt, s.H0, 1, s.H0, acts[1], L.ld);
  __syncthreads();
  bias_leaky(acts[1], L.ld, M, s.H0, code_bias_row, slope);
  __syncthreads();
  block_matmul(acts[1], L.ld, M, s.H0, w.w1t, s.H1, 1, s.H1, acts[2], L.ld);
  __syncthreads();
  bias_leaky(acts[2], L.ld, M, s.H1, w.b1, slope);
  __syncthreads();
  block_matmul(acts[2], L.ld, M, s.H1, w.w2t, s.H2, 1, s.H2, acts[3], L.ld);
  __syncthreads();
  bias_leaky(acts[3], L.ld, M, s.H2, w.b2, slope);
  __syncthreads();
  block_matmul(acts[3], L.ld, M, s.H2, w.out_w, 1, s.H2, 2, st, 2);
  __syncthreads();
  for (int idx = threadIdx.x; idx < 2 * M; idx += blockDim.x) st[idx] += w.out_b[idx % 2];
  __syncthreads();
}

template <typename T>
__device__ T clamp_s(T s) {
  return s < T(-kSClamp) ? T(-kSClamp) : (s > T(kSClamp) ? T(kSClamp) : s);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) coupling_fwd_kernel(const T* __restrict__ y, const T* __restrict__ code_bias,
                                                                Weights<T> w, Sizes s, T* __restrict__ out) {
  extern __shared__ unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  constexpr int BM = kPointsPerBlock<T>;
  const Layout L(s);
  const int64_t frame = blockIdx.y, p0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t left = s.P - p0;
  const Point<T> pts{static_cast<int>(left < BM ? left : BM), y + (frame * s.P + p0) * 3};
  T* e = smem;
  T* buf0 = e + BM * L.enc;
  T* buf1 = buf0 + BM * L.ld;
  T* st = buf1 + BM * L.ld;
  T* const acts[4] = {buf0, buf1, buf0, buf1};
  network(pts, s, w, code_bias + frame * s.H0, L, e, acts, st);
  const int c = s.transformed;
  for (int m = threadIdx.x; m < pts.M; m += blockDim.x) {
    const T* yi = pts.y + m * 3;
    T* oi = out + (frame * s.P + p0 + m) * 3;
    const T sc = clamp_s(st[2 * m]), t = st[2 * m + 1];
    oi[0] = yi[0];
    oi[1] = yi[1];
    oi[2] = yi[2];
    oi[c] = s.inverse ? yi[c] * exp(sc) + t : (yi[c] - t) * exp(-sc);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    coupling_bwd_kernel(const T* __restrict__ grad_out, const T* __restrict__ y, const T* __restrict__ code_bias,
                        Weights<T> w, Sizes s, Grads<T> g) {
  extern __shared__ unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  constexpr int BM = kPointsPerBlock<T>;
  const Layout L(s);
  const T slope = static_cast<T>(s.negative_slope);
  const int64_t frame = blockIdx.y, p0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t left = s.P - p0;
  const Point<T> pts{static_cast<int>(left < BM ? left : BM), y + (frame * s.P + p0) * 3};
  const int M = pts.M;
  // e and p live throughout; three [BM, ld] buffers a, b, c hold h0, h1, h2 and then, as each
  // activation dies, the gradients (h0 is recomputed from p when it is needed again): four
  // activation-sized buffers instead of six, so that widths of 256 fit sm_80 (see shared_bytes)
  T* e = smem;
  T* p = e + BM * L.enc;
  T* a = p + BM * L.ld;
  T* b = a + BM * L.ld;
  T* c = b + BM * L.ld;
  T* st = c + BM * L.ld;  // [BM, 2]: (s_raw, t), then their gradients
  T* gyc = st + 2 * BM;   // [BM]: gradient of the transformed coordinate
  T* const acts[4] = {p, a, b, c};  // p, h0, h1, h2
  const T* cb_row = code_bias + frame * s.H0;
  network(pts, s, w, cb_row, L, e, acts, st);

  // affine update -> (g_s, g_t), in place of (s_raw, t)
  const int tc = s.transformed;
  for (int m = threadIdx.x; m < M; m += blockDim.x) {
    const int64_t row = (frame * s.P + p0 + m) * 3;
    const T s_raw = st[2 * m], t = st[2 * m + 1], gc = grad_out[row + tc], yc = y[row + tc];
    const T scale = s.inverse ? exp(clamp_s(s_raw)) : exp(-clamp_s(s_raw));
    T g_s = s.inverse ? gc * yc * scale : -gc * (yc - t) * scale;
    if (!(s_raw >= T(-kSClamp) && s_raw <= T(kSClamp))) g_s = T(0);  // as torch.clamp's gradient
    st[2 * m] = g_s;
    st[2 * m + 1] = s.inverse ? gc : -gc * scale;
    gyc[m] = gc * scale;
  }
  __syncthreads();

  // (s, t) = Wo h2 + bo; h2 in c, gradient into a (h0 is recomputed below)
  add_weight_grad(st, 2, c, L.ld, M, 2, s.H2, g.out_w, g.out_b);
  block_matmul(st, 2, M, 2, w.out_w, s.H2, 1, s.H2, a, L.ld);
  __syncthreads();
  leaky_backward(a, c, L.ld, M, s.H2, slope);
  __syncthreads();
  // h2 = leaky(W2 h1 + b2); h1 in b, gradient into c (h2 is dead)
  add_weight_grad(a, L.ld, b, L.ld, M, s.H2, s.H1, g.w2, g.b2);
  block_matmul(a, L.ld, M, s.H2, w.w2, s.H1, 1, s.H1, c, L.ld);
  __syncthreads();
  leaky_backward(c, b, L.ld, M, s.H1, slope);
  __syncthreads();
  // h0 again, into a: the same products as the forward, so the same values
  block_matmul(p, L.ld, M, s.PD, w.in_wt, s.H0, 1, s.H0, a, L.ld);
  __syncthreads();
  bias_leaky(a, L.ld, M, s.H0, cb_row, slope);
  __syncthreads();
  // h1 = leaky(W1 h0 + b1); h0 in a, gradient into b (h1 is dead)
  add_weight_grad(c, L.ld, a, L.ld, M, s.H1, s.H0, g.w1, g.b1);
  block_matmul(c, L.ld, M, s.H1, w.w1, s.H0, 1, s.H0, b, L.ld);
  __syncthreads();
  leaky_backward(b, a, L.ld, M, s.H0, slope);
  __syncthreads();
  // h0 = leaky(Win p + code_bias[frame]); gradient into c
  add_weight_grad(b, L.ld, p, L.ld, M, s.H0, s.PD, g.in_w, g.code_bias + frame * s.H0);
  block_matmul(b, L.ld, M, s.H0, w.in_w, s.PD, 1, s.PD, c, L.ld);
  __syncthreads();
  leaky_backward(c, p, L.ld, M, s.PD, slope);
  __syncthreads();
  // p = leaky(Wp e + bp); gradient of e into a
  add_weight_grad(c, L.ld, e, L.enc, M, s.PD, L.enc, g.proj_w, g.proj_b);
  block_matmul(c, L.ld, M, s.PD, w.proj_w, L.enc, 1, L.enc, a, L.ld);
  __syncthreads();

  // encoding -> kept coordinates: d sin(v f)/dv = f cos(v f), d cos(v f)/dv = -f sin(v f)
  const int k0 = tc == 0 ? 1 : 0, k1 = tc == 2 ? 1 : 2, F = s.F;
  for (int m = threadIdx.x; m < M; m += blockDim.x) {
    const int64_t row = (frame * s.P + p0 + m) * 3;
    const T* ge = a + m * L.ld;
    const T* er = e + m * L.enc;
    T gv[2] = {ge[0], ge[1]};
    for (int d = 0; d < 2; ++d) {
      for (int k = 0; k < F; ++k) {
        const int sin_col = 2 + d * 2 * F + k, cos_col = sin_col + F;
        gv[d] += w.sigma[k] * (er[cos_col] * ge[sin_col] - er[sin_col] * ge[cos_col]);
      }
    }
    g.y[row + tc] = gyc[m];
    g.y[row + k0] = grad_out[row + k0] + gv[0];
    g.y[row + k1] = grad_out[row + k1] + gv[1];
  }
}

#endif  // __CUDACC__ || FASTOMNI_CUDA_EMULATE

// Launchers (affine_coupling_cuda.cu): contiguous device arrays y [n, P, 3], code_bias [n, H0]; return
// the first failing CUDA status (sizes beyond the kernels' limits give cudaErrorInvalidValue).
template <typename T>
cudaError_t affine_coupling_fwd(const T* y, const T* code_bias, const Weights<T>& w, const Sizes& s, T* out,
                                cudaStream_t stream);

template <typename T>
cudaError_t affine_coupling_bwd(const T* grad_out, const T* y, const T* code_bias, const Weights<T>& w,
                                const Sizes& s, const Grads<T>& g, cudaStream_t stream);

}  // namespace fastomni::affine_coupling_cuda
