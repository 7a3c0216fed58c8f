// Lets g++ compile densecrf.cu unchanged for the CPU: CUDA's index variables become thread-local
// globals set by the launcher, qualifiers are defined away, atomics map onto GCC builtins.
// Faithful only for kernels without __syncthreads / shared memory / warp intrinsics (the threads
// of a block run one after another); densecrf.cu keeps to that.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstring>

struct dim3 { unsigned int x = 0, y = 0, z = 0; };
// No tls_model attribute: the library is dlopen()ed late (ctypes), where initial-exec TLS needs
// the static TLS block ("cannot allocate memory in static TLS block"; glibc's surplus is small on
// aarch64). With -fPIC the module's TLS base is found once per block loop, not per use.
static thread_local dim3 threadIdx;
static thread_local dim3 blockIdx;
static thread_local dim3 blockDim;
static thread_local dim3 gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
// A label loop whose iterations are independent, to be vectorised (-fopenmp-simd): where GCC
// would otherwise keep a row's loads in scalar registers across an outer loop and add lane by lane.
#define CRF_SIMD _Pragma("omp simd")
// A line wanted soon, where the hardware's prefetchers do not see it coming (a few lines of each
// of C label planes at once, C up to hundreds of streams). Past the end of an array it is harmless.
#define CRF_PREFETCH(address, for_write) __builtin_prefetch((address), (for_write))
#define CRF_PREFETCHES 1
// crf_embed embeds runs of 16 pixels in vector operations (densecrf.cu)
#define CRF_EMBED_RUNS 1

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

static inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long val)
{
    return __atomic_fetch_add(address, val, __ATOMIC_SEQ_CST);
}

static inline int atomicMin(int* address, int val)
{
    int old = __atomic_load_n(address, __ATOMIC_SEQ_CST);
    while (val < old && !__atomic_compare_exchange_n(address, &old, val, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
    }
    return old;
}

static inline int atomicCAS(int* address, int compare, int val)
{
    __atomic_compare_exchange_n(address, &compare, val, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return compare;  // the value found: equal to the original compare on success
}

// expf for the CPU build: branch-free (Cephes' polynomial, within 2 ulp of glibc on the range
// the CRF uses), so loops over labels vectorise; glibc's expf is a scalar call. Inputs below -87.3,
// where float exp leaves the normal range, give exp(-87.3) ~ 1e-38 instead of a denormal or 0.
static inline float crf_cpu_expf(float x)
{
    x = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
    const float t = x * 1.44269504088896341f;
    const int n = (int)(t < 0.f ? t - 0.5f : t + 0.5f);
    const float fn = (float)n;
    x = x - fn * 0.693359375f;
    x = x + fn * 2.12194440e-4f;
    const float z = x * x;
    float y = 1.9875691500e-4f;
    y = y * x + 1.3981999507e-3f;
    y = y * x + 8.3334519073e-3f;
    y = y * x + 4.1665795894e-2f;
    y = y * x + 1.6666665459e-1f;
    y = y * x + 5.0000001201e-1f;
    y = y * z + x + 1.0f;
    const int bits = (n + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return y * scale;
}
#define expf crf_cpu_expf

static inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
