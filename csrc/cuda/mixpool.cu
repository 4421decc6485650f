// Fused feature mixup + global average + global max pooling: pooled[m, c] = mean_hw(x) + max_hw(x)
// of x = lam * f[i_m, c] + (1 - lam) * f[j_m, c], without the [M, C, H, W] mixed maps.
// Forward: one warp per (m, c), lanes over H*W (coalesced), argmax kept (first on ties).
// Backward: one thread per (b, c) owns grad_features[b, c, :] and walks the mixed examples that
// use b (a CSR built by the caller), so the sum over m has a fixed order and needs no atomics.
#include "common.cuh"

namespace mx {
namespace {

constexpr int THREADS = 256, WARPS = THREADS / 32;

template <typename T>
__global__ void __launch_bounds__(THREADS) forward_kernel(const MixpoolArgs p) {
  const int64_t row = (int64_t)blockIdx.x * WARPS + threadIdx.x / 32;  // (m, c)
  const int lane = threadIdx.x % 32;
  if (row >= p.M * p.C) return;  // uniform across the warp
  const int64_t m = row / p.C, c = row % p.C;
  const T* fi = static_cast<const T*>(p.features) + (p.i[m] * p.C + c) * p.HW;
  const T* fj = static_cast<const T*>(p.features) + (p.j[m] * p.C + c) * p.HW;
  const float lam = p.lam, mu = 1.0f - p.lam;
  float sum = 0.0f, best = -INFINITY;
  int32_t arg = 0;
  for (int64_t k = lane; k < p.HW; k += 32) {
    const float x = lam * to_float(fi[k]) + mu * to_float(fj[k]);
    sum += x;
    if (x > best) {
      best = x;
      arg = (int32_t)k;
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    sum += __shfl_xor_sync(0xffffffffu, sum, off);
    const float ob = __shfl_xor_sync(0xffffffffu, best, off);
    const int32_t oa = __shfl_xor_sync(0xffffffffu, arg, off);
    if (ob > best || (ob == best && oa < arg)) {
      best = ob;
      arg = oa;
    }
  }
  if (lane == 0) {
    static_cast<T*>(p.pooled)[row] = from_float<T>(sum / (float)p.HW + best);
    p.argmax[row] = arg;
  }
}

template <typename T>
__global__ void __launch_bounds__(THREADS) backward_kernel(const MixpoolArgs p) {
  const int64_t row = (int64_t)blockIdx.x * THREADS + threadIdx.x;  // (b, c)
  if (row >= p.B * p.C) return;
  const int64_t b = row / p.C, c = row % p.C;
  const T* gp = static_cast<const T*>(p.grad_pooled);
  float* out = p.grad_features + row * p.HW;
  // entry k < M is m = k mixed with weight lam on i; k >= M is m = k - M with 1 - lam on j
  float mean = 0.0f;
  for (int64_t e = p.offsets[b]; e < p.offsets[b + 1]; ++e) {
    const int64_t k = p.order[e], m = k < p.M ? k : k - p.M;
    mean += (k < p.M ? p.lam : 1.0f - p.lam) * to_float(gp[m * p.C + c]);
  }
  mean /= (float)p.HW;
  for (int64_t k = 0; k < p.HW; ++k) out[k] = mean;
  for (int64_t e = p.offsets[b]; e < p.offsets[b + 1]; ++e) {
    const int64_t k = p.order[e], m = k < p.M ? k : k - p.M;
    out[p.argmax[m * p.C + c]] += (k < p.M ? p.lam : 1.0f - p.lam) * to_float(gp[m * p.C + c]);
  }
}

}  // namespace

cudaError_t mixpool_forward(const MixpoolArgs& p, cudaStream_t stream) {
  if (p.M * p.C == 0) return cudaSuccess;
  return dispatch_dtype(p.dtype, [&](auto t) {
    forward_kernel<decltype(t)><<<blocks_for(p.M * p.C, WARPS), THREADS, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

cudaError_t mixpool_backward(const MixpoolArgs& p, cudaStream_t stream) {
  if (p.B * p.C == 0) return cudaSuccess;
  return dispatch_dtype(p.dtype, [&](auto t) {
    backward_kernel<decltype(t)><<<blocks_for(p.B * p.C, THREADS), THREADS, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace mx
