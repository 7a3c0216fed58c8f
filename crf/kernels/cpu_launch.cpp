// CPU build of densecrf.cu: the kernel file compiled unchanged, plus one launcher per kernel with
// CUDA's driver-API calling convention (grid, block, void** kernel_params), so that the Python
// driver launches a kernel the same way on both targets (crf/kernel_interface.py).
//
// The blocks of a launch run on a small persistent thread pool of our own (not OpenMP): a CRF call
// makes ~190 launches, most of a millisecond or less, and on a machine shared with other busy
// processes an OpenMP fork/join per launch waits for every team thread to be scheduled, twice per
// launch, while its idle threads spin and take the CPU from the ones doing the work. Here:
//   - the calling thread starts on the blocks at once and takes whatever the workers do not; a
//     launch waits only for blocks a worker has actually claimed, never for a worker to wake up;
//   - idle workers sleep on a condition variable (futex): no spinning, no busy waiting;
//   - a launch of a few blocks runs on the calling thread alone (no wake-up at all);
//   - two launches at once (two driver threads) do not queue: the second runs on its own thread.
// docs/cpu_crf.md has the measurements behind these choices.
#include "cpu_shim.h"
#include "densecrf.cu"

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include <sched.h>
#include <unistd.h>

namespace {

// Blocks per claim: a claim is one atomic operation, and a worker preempted while it holds one
// delays the launch by at most that claim's work (a few hundred microseconds at most).
constexpr unsigned kBlocksPerClaim = 2;
// Launches of at most this many blocks (2 x 256 threads) run on the calling thread: waking a
// worker costs more than such a launch.
constexpr unsigned kSerialBlocks = kBlocksPerClaim;
constexpr unsigned kMaxThreads = 256;

// Runs blocks [first, end) of the launch described by job.
using BlockRange = void (*)(const void* job, unsigned first, unsigned end);

class Pool {
public:
    explicit Pool(unsigned n_threads)
    {
        for (unsigned i = 1; i < n_threads; i++) workers_.emplace_back([this] { work(); });
    }

    unsigned threads() const { return (unsigned)workers_.size() + 1; }

    // Stops and joins the workers; called with no launch running.
    void stop()
    {
        {
            std::lock_guard<std::mutex> lock(m_);
            stop_ = true;
        }
        wake_.notify_all();
        for (auto& t : workers_) t.join();
        workers_.clear();
    }

    // Runs blocks [0, n_blocks) on the calling thread and on whichever workers wake up in time,
    // per_claim blocks at a time.
    void run(BlockRange body, const void* job, unsigned n_blocks, unsigned per_claim)
    {
        const unsigned n_claims = (n_blocks + per_claim - 1) / per_claim;
        std::uint32_t gen;
        {
            std::lock_guard<std::mutex> lock(m_);
            gen = ++generation_;
            body_ = body;
            job_ = job;
            n_blocks_ = n_blocks;
            n_claims_ = n_claims;
            per_claim_ = per_claim;
            done_.store(0, std::memory_order_relaxed);
            cursor_.store((std::uint64_t)gen << 32, std::memory_order_release);
        }
        wake_.notify_all();
        const unsigned mine = take_claims(gen, body, job, n_blocks, n_claims, per_claim);
        if (done_.fetch_add(mine, std::memory_order_acq_rel) + mine == n_claims) return;
        // Some claims are still running on workers: sleep until the last one reports.
        std::unique_lock<std::mutex> lock(m_);
        finished_.wait(lock, [&] { return done_.load(std::memory_order_acquire) == n_claims; });
    }

private:
    // Claims of generation gen, taken one at a time until none is left; returns how many it ran.
    unsigned take_claims(std::uint32_t gen, BlockRange body, const void* job, unsigned n_blocks, unsigned n_claims,
                         unsigned per_claim)
    {
        unsigned ran = 0;
        std::uint64_t c = cursor_.load(std::memory_order_acquire);
        for (;;) {
            // The generation in the cursor's high half: a worker that wakes up after its launch
            // has ended (and another has begun) finds a different generation and claims nothing.
            if ((std::uint32_t)(c >> 32) != gen || (std::uint32_t)c >= n_claims) return ran;
            if (!cursor_.compare_exchange_weak(c, c + 1, std::memory_order_acq_rel, std::memory_order_acquire))
                continue;
            const unsigned first = (unsigned)(std::uint32_t)c * per_claim;
            body(job, first, std::min(n_blocks, first + per_claim));
            ran++;
            c = cursor_.load(std::memory_order_acquire);
        }
    }

    void work()
    {
        std::uint32_t seen = 0;
        std::unique_lock<std::mutex> lock(m_);
        for (;;) {
            wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
            if (stop_) return;
            seen = generation_;
            const BlockRange body = body_;
            const void* job = job_;
            const unsigned n_blocks = n_blocks_, n_claims = n_claims_, per_claim = per_claim_;
            lock.unlock();
            // The launch stays open (job valid) while any claim of it is unfinished, so the job
            // read above is alive whenever a claim succeeds.
            const unsigned ran = take_claims(seen, body, job, n_blocks, n_claims, per_claim);
            if (ran && done_.fetch_add(ran, std::memory_order_acq_rel) + ran == n_claims) {
                lock.lock();  // under the mutex: the caller cannot miss this between its check and its wait
                finished_.notify_one();
                continue;
            }
            lock.lock();
        }
    }

    std::mutex m_;
    std::condition_variable wake_, finished_;
    // the current launch, written under m_
    BlockRange body_ = nullptr;
    const void* job_ = nullptr;
    unsigned n_blocks_ = 0, n_claims_ = 0, per_claim_ = 1;
    std::uint32_t generation_ = 0;
    bool stop_ = false;
    std::atomic<std::uint64_t> cursor_{0};  // (generation << 32) | next claim
    std::atomic<unsigned> done_{0};         // claims finished in the current launch
    std::vector<std::thread> workers_;
};

// The process-wide pool (one per loaded library), created on first use. Never destroyed: workers
// sleeping at exit are simply ended with the process.
std::mutex g_config;      // creating and resizing the pool
std::mutex g_launch;      // held by the launch that uses the pool
Pool* g_pool = nullptr;
pid_t g_pool_pid = 0;     // a forked child has none of the parent's workers: it makes its own
unsigned g_threads = 0;   // 0: not set, default_threads()

unsigned default_threads()
{
    // OMP_NUM_THREADS, as the OpenMP build honoured it; else the CPUs this process may run on.
    if (const char* env = std::getenv("OMP_NUM_THREADS")) {
        const long n = std::strtol(env, nullptr, 10);
        if (n > 0) return (unsigned)std::min<long>(n, kMaxThreads);
    }
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) return (unsigned)std::max(1, CPU_COUNT(&set));
    return std::max(1u, std::thread::hardware_concurrency());
}

// The pool to use, or nullptr for a serial launch; called with g_launch held.
Pool* pool()
{
    std::lock_guard<std::mutex> lock(g_config);
    const pid_t pid = getpid();
    if (g_pool != nullptr && g_pool_pid != pid) g_pool = nullptr;  // the parent's: its threads are not here
    if (g_threads == 0) g_threads = default_threads();
    if (g_threads <= 1) return nullptr;
    if (g_pool == nullptr) {
        g_pool = new Pool(g_threads);
        g_pool_pid = pid;
    }
    return g_pool;
}

// Units [0, n) of a launch (blocks, or a task launcher's threads), per_claim at a time.
void launch_blocks(BlockRange body, const void* job, unsigned n, unsigned per_claim = kBlocksPerClaim)
{
    if (n > std::min(per_claim, kSerialBlocks)) {
        std::unique_lock<std::mutex> busy(g_launch, std::try_to_lock);
        if (busy.owns_lock()) {
            if (Pool* p = pool()) {
                p->run(body, job, n, per_claim);
                return;
            }
        }
    }
    body(job, 0, n);
}

}  // namespace

// The kernel is a template argument, inlined (flatten) into the loop over the threads of a block:
// the thread-local index variables and the arguments are read once per block, not per thread.
//
// Kernels that loop over a row of S labels (a launch argument) are compiled again for the common
// row widths with S, and the labels per thread when they equal S (the CPU's choice), as constants:
// those loops become straight-line vector code with no trip-count arithmetic. RowArg / ChunkArg
// are the positions of S and of the labels per thread in the kernel's arguments (-1: none). The
// arithmetic is the same, operation for operation: the results are bit-identical.
//
// The lattice kernels are compiled the same way for the two lattice dimensions d (2: the spatial
// kernel, 5: the bilateral one): their loops over d unroll, and divisions by d + 1 become
// multiplications.
template <int... W>
struct Widths {};
using RowWidths = Widths<2, 4, 8, 16, 24, 32, 40, 48, 64>;  // S: C rounded up to 8, or 2 / 4 (crf/driver.py label_stride)
using LatticeDims = Widths<2, 5>;                      // d: crf/driver.py SPATIAL_D, BILATERAL_D

// Tasks > 0: a task launcher. Its first Tasks threads each do a large independent job (one per
// lattice, say), so each thread is a claim of its own and they run on as many cores; the threads
// past them do nothing and are not run.
template <auto Kernel, int RowArg = -1, int ChunkArg = -1, typename Ws = RowWidths, int Tasks = 0,
          typename F = decltype(Kernel)>
struct Launcher;

template <auto Kernel, int RowArg, int ChunkArg, typename Ws, int Tasks, typename... A>
struct Launcher<Kernel, RowArg, ChunkArg, Ws, Tasks, void (*)(A...)> {
    struct Job {
        std::tuple<A...> args;
        unsigned grid, block;
    };

    static void run(unsigned int grid, unsigned int block, void** params)
    {
        const Job job{read(params, std::index_sequence_for<A...>{}), grid, block};  // arguments read once
        if constexpr (Tasks > 0)
            launch_blocks(pick(job, Ws{}), &job, std::min<unsigned>(Tasks, grid * block), 1);
        else
            launch_blocks(pick(job, Ws{}), &job, grid);
    }

    template <std::size_t... I>
    static std::tuple<A...> read(void** params, std::index_sequence<I...>)
    {
        return std::tuple<A...>(*static_cast<A*>(params[I])...);
    }

    // The block loop for this launch: one compiled for its row width, else the general one.
    template <int... W>
    static BlockRange pick(const Job& job, Widths<W...>)
    {
        if constexpr (RowArg >= 0) {
            const int s = std::get<RowArg>(job.args);
            if constexpr (ChunkArg >= 0)
                if (std::get<ChunkArg>(job.args) != s) return &blocks<0>;
            BlockRange found = &blocks<0>;
            ((s == W ? (found = &blocks<W>, 0) : 0), ...);
            return found;
        }
        return &blocks<0>;
    }

    // Argument I of the kernel call: the constant S where the loop is compiled for one.
    template <int S, std::size_t I>
    static auto arg(const Job& job)
    {
        if constexpr (S > 0 && ((int)I == RowArg || (int)I == ChunkArg))
            return (int)S;
        else
            return std::get<I>(job.args);
    }

    // Blocks [first, end) on this thread, the threads of each block in order (a task launcher:
    // threads [first, end)).
    template <int S>
    static void blocks(const void* p, unsigned first, unsigned end)
    {
        blocks<S>(*static_cast<const Job*>(p), first, end, std::index_sequence_for<A...>{});
    }

    template <int S, std::size_t... I>
    __attribute__((flatten)) static void blocks(const Job& job, unsigned first, unsigned end, std::index_sequence<I...>)
    {
        blockDim.x = job.block;
        gridDim.x = job.grid;
        if constexpr (Tasks > 0) {
            for (unsigned u = first; u < end; u++) {
                blockIdx.x = u / job.block;
                threadIdx.x = u % job.block;
                Kernel(arg<S, I>(job)...);
            }
            return;
        }
        for (unsigned b = first; b < end; b++) {
            blockIdx.x = b;
            for (unsigned t = 0; t < job.block; t++) {
                threadIdx.x = t;
                Kernel(arg<S, I>(job)...);
            }
        }
    }
};

// launch_<name>: the kernel's block loop, compiled again for each of ``widths`` where its argument
// ``arg`` (and ``chunk_arg``, when not -1) takes that value; ``tasks`` > 0 makes a task launcher.
#define CRF_CPU_LAUNCHER_FOR(name, arg, chunk_arg, widths, tasks) \
    extern "C" __attribute__((visibility("default"))) void launch_##name(unsigned int grid, unsigned int block, void** params) \
    {                                                                                   \
        Launcher<name, arg, chunk_arg, widths, tasks>::run(grid, block, params);        \
    }
#define CRF_CPU_LAUNCHER_ROWS(name, row_arg, chunk_arg) CRF_CPU_LAUNCHER_FOR(name, row_arg, chunk_arg, RowWidths, 0)
#define CRF_CPU_LAUNCHER_DIMS(name, d_arg) CRF_CPU_LAUNCHER_FOR(name, d_arg, -1, LatticeDims, 0)
#define CRF_CPU_LAUNCHER(name) CRF_CPU_LAUNCHER_ROWS(name, -1, -1)
// Launcher's Tasks: ``tasks`` threads, each a claim of its own, compiled for the row widths at ``row_arg``.
#define CRF_CPU_LAUNCHER_TASKS(name, row_arg, tasks) CRF_CPU_LAUNCHER_FOR(name, row_arg, -1, RowWidths, tasks)

CRF_CPU_LAUNCHER_DIMS(crf_embed, 3)
CRF_CPU_LAUNCHER(crf_hash_insert)
CRF_CPU_LAUNCHER_DIMS(crf_insert_serial, 2)
CRF_CPU_LAUNCHER(crf_mark_first)
CRF_CPU_LAUNCHER(crf_number_vertices)
CRF_CPU_LAUNCHER(crf_offsets)
CRF_CPU_LAUNCHER_DIMS(crf_neighbours, 3)
CRF_CPU_LAUNCHER(crf_key_box)
CRF_CPU_LAUNCHER(crf_insert_dense)
CRF_CPU_LAUNCHER(crf_neighbours_dense)
CRF_CPU_LAUNCHER(crf_count)
CRF_CPU_LAUNCHER(crf_scan_chunks)
CRF_CPU_LAUNCHER(crf_scan_sums)
CRF_CPU_LAUNCHER(crf_scan_apply)
CRF_CPU_LAUNCHER(crf_fill_lists)
CRF_CPU_LAUNCHER(crf_lists_serial)
CRF_CPU_LAUNCHER(crf_sort_lists)
CRF_CPU_LAUNCHER(crf_list_payload)
CRF_CPU_LAUNCHER(crf_splat)
CRF_CPU_LAUNCHER_TASKS(crf_splat_scatter, 2, 2)
CRF_CPU_LAUNCHER(crf_splat_fixed)
CRF_CPU_LAUNCHER_ROWS(crf_blur, 5, 6)
CRF_CPU_LAUNCHER(crf_blur_fixed)
CRF_CPU_LAUNCHER(crf_slice)
CRF_CPU_LAUNCHER(crf_normaliser)
CRF_CPU_LAUNCHER(crf_coefficients)
CRF_CPU_LAUNCHER_ROWS(crf_update, 3, -1)
CRF_CPU_LAUNCHER(crf_unary)
CRF_CPU_LAUNCHER(crf_marginals)
CRF_CPU_LAUNCHER(crf_argmax)
CRF_CPU_LAUNCHER(crf_crop_scores)
CRF_CPU_LAUNCHER(crf_fill_int)
CRF_CPU_LAUNCHER(crf_fill_float)

// Threads the launches use (the caller's included); 1 runs every launch on the calling thread.
// n = 0 restores the default (OMP_NUM_THREADS, else the CPUs this process may run on). Waits for a
// launch in progress; the pool is shared by everything in the process that uses this library.
extern "C" __attribute__((visibility("default"))) void crf_cpu_set_threads(unsigned int n)
{
    std::lock_guard<std::mutex> busy(g_launch);
    std::lock_guard<std::mutex> lock(g_config);
    const unsigned want = n == 0 ? default_threads() : std::min(n, kMaxThreads);
    if (g_pool != nullptr && g_pool_pid == getpid() && g_pool->threads() != want) {
        g_pool->stop();
        delete g_pool;
        g_pool = nullptr;
    }
    g_threads = want;
}

extern "C" __attribute__((visibility("default"))) unsigned int crf_cpu_threads()
{
    std::lock_guard<std::mutex> lock(g_config);
    return g_threads == 0 ? default_threads() : g_threads;
}
