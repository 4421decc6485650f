// Device helpers shared by the kernel files: input conversion and compile-time dispatch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels.cuh"
#include "pair_math.cuh"

namespace mx {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

template <int V> struct IntC { static constexpr int value = V; };

// f(IntC<FORM>()): the sigma form becomes a template parameter (it decides the accumulator).
template <typename F>
cudaError_t dispatch_form(int form, F&& f) {
  switch (form) {
    case FORM_EXP: return f(IntC<FORM_EXP>());
    case FORM_HINGE: return f(IntC<FORM_HINGE>());
    case FORM_SOFTPLUS: return f(IntC<FORM_SOFTPLUS>());
    default: return cudaErrorInvalidValue;
  }
}

// f(T()): the element type of a DType code.
template <typename F>
cudaError_t dispatch_dtype(int dtype, F&& f) {
  switch (dtype) {
    case DTYPE_F32: return f(float());
    case DTYPE_F16: return f(__half());
    case DTYPE_BF16: return f(__nv_bfloat16());
    default: return cudaErrorInvalidValue;
  }
}

inline unsigned blocks_for(int64_t n, int64_t per_block) { return (unsigned)((n + per_block - 1) / per_block); }

}  // namespace mx
