// CPU build of densecrf.cu: the kernel file compiled unchanged, plus one launcher per kernel with
// CUDA's driver-API calling convention (grid, block, void** kernel_params), so that the Python
// driver launches a kernel the same way on both targets (crf/backend.py).
#include "cpu_shim.h"
#include "densecrf.cu"

#include <tuple>
#include <utility>

// The kernel is a template argument, so its body is inlined into the thread loop and the
// thread-local index variables are resolved once per block rather than once per thread.
template <auto Kernel, typename F = decltype(Kernel)>
struct Launcher;

template <auto Kernel, typename... A>
struct Launcher<Kernel, void (*)(A...)> {
    static void run(unsigned int grid, unsigned int block, void** params)
    {
        run(grid, block, params, std::index_sequence_for<A...>{});
    }

    template <std::size_t... I>
    static void run(unsigned int grid, unsigned int block, void** params, std::index_sequence<I...>)
    {
        const std::tuple<A...> args(*static_cast<A*>(params[I])...);  // arguments read once
        // Blocks in parallel (OpenMP; dynamic: per-vertex work varies), the threads of a block in order.
#pragma omp parallel for schedule(dynamic, 4)
        for (long long b = 0; b < (long long)grid; b++) {
            blockIdx.x = (unsigned int)b;
            blockDim.x = block;
            gridDim.x = grid;
            for (unsigned int t = 0; t < block; t++) {
                threadIdx.x = t;
                Kernel(std::get<I>(args)...);
            }
        }
    }
};

#define CRF_CPU_LAUNCHER(name) \
    extern "C" __attribute__((visibility("default"))) void launch_##name(unsigned int grid, unsigned int block, void** params) \
    {                                                                                   \
        Launcher<name>::run(grid, block, params);                                       \
    }

CRF_CPU_LAUNCHER(crf_embed)
CRF_CPU_LAUNCHER(crf_hash_insert)
CRF_CPU_LAUNCHER(crf_mark_first)
CRF_CPU_LAUNCHER(crf_number_vertices)
CRF_CPU_LAUNCHER(crf_offsets)
CRF_CPU_LAUNCHER(crf_neighbours)
CRF_CPU_LAUNCHER(crf_count)
CRF_CPU_LAUNCHER(crf_scan_chunks)
CRF_CPU_LAUNCHER(crf_scan_sums)
CRF_CPU_LAUNCHER(crf_scan_apply)
CRF_CPU_LAUNCHER(crf_fill_lists)
CRF_CPU_LAUNCHER(crf_sort_lists)
CRF_CPU_LAUNCHER(crf_list_payload)
CRF_CPU_LAUNCHER(crf_splat)
CRF_CPU_LAUNCHER(crf_splat_fixed)
CRF_CPU_LAUNCHER(crf_blur)
CRF_CPU_LAUNCHER(crf_blur_fixed)
CRF_CPU_LAUNCHER(crf_slice)
CRF_CPU_LAUNCHER(crf_normaliser)
CRF_CPU_LAUNCHER(crf_coefficients)
CRF_CPU_LAUNCHER(crf_update)
CRF_CPU_LAUNCHER(crf_unary)
CRF_CPU_LAUNCHER(crf_check_finite)
CRF_CPU_LAUNCHER(crf_marginals)
CRF_CPU_LAUNCHER(crf_argmax)
CRF_CPU_LAUNCHER(crf_crop_scores)
CRF_CPU_LAUNCHER(crf_fill_int)
CRF_CPU_LAUNCHER(crf_fill_float)
