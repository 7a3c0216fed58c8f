// Lets g++ compile densecrf.cu unchanged for the CPU: CUDA's index variables become thread-local
// globals set by the launcher, qualifiers are defined away, atomics map onto GCC builtins.
// Faithful only for kernels without __syncthreads / shared memory / warp intrinsics (the threads
// of a block run one after another); densecrf.cu keeps to that.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstddef>

struct dim3 { unsigned int x = 0, y = 0, z = 0; };
// initial-exec: a plain %fs-relative access instead of a __tls_get_addr call per use.
static thread_local dim3 threadIdx __attribute__((tls_model("initial-exec")));
static thread_local dim3 blockIdx __attribute__((tls_model("initial-exec")));
static thread_local dim3 blockDim __attribute__((tls_model("initial-exec")));
static thread_local dim3 gridDim __attribute__((tls_model("initial-exec")));

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict

using std::min;
using std::max;
using std::sqrt;

static inline int atomicAdd(int* address, int val) { return __atomic_fetch_add(address, val, __ATOMIC_SEQ_CST); }

static inline float atomicAdd(float* address, float val)
{
    float old, desired;
    __atomic_load(address, &old, __ATOMIC_SEQ_CST);
    do {
        desired = old + val;
    } while (!__atomic_compare_exchange(address, &old, &desired, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
    return old;
}

static inline int atomicCAS(int* address, int compare, int val)
{
    __atomic_compare_exchange_n(address, &compare, val, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return compare;  // the value found: equal to the original compare on success
}

static inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
