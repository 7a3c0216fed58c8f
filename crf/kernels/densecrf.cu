// Dense CRF mean field on the permutohedral lattice (Adams et al. 2010; Kraehenbuehl & Koltun 2011).
//
// ONE source for both targets:
//   - nvcc / pycuda compile it for the GPU (crf/gpu_kernels.py);
//   - g++ compiles the same file for the CPU through cpu_shim.h (crf/cpu_kernels.py), which emulates
//     threadIdx/blockIdx and the atomics, running the blocks of a launch in parallel (a thread pool) and
//     the threads of a block one after another.
// To stay inside what that emulation runs faithfully, kernels use only the .x index variables and
// the atomics atomicAdd (int, unsigned long long), atomicCAS and atomicMin (int): no __syncthreads,
// no shared memory, no warp intrinsics.
//
// Layouts: pixel i = y*W + x. Per-pixel label vectors are pixel-major rows of S >= C floats,
// Q[i*S + l]; lattice values are vertex-major rows of the same width, V[v*S + l]. The GPU uses
// S = C; the CPU rounds S up to its SIMD width, so that every label loop is whole vectors on
// aligned rows. Labels C..S-1 are padding: their unary energy is CRF_PAD_ENERGY and their
// marginals exactly 0, so they never touch the real labels (and never make denormals).
// Lattice entries (pixel i, remainder r) are e = i*(d+1) + r.
// The arithmetic follows Permutohedral::init / seqCompute of densecrf (inside pydensecrf) operation
// for operation, so the CPU build (no FMA contraction) agrees with it to float rounding.

#define CRF_MAX_D 5  // bilateral kernel: x, y and three colour channels
#define CRF_PAD_ENERGY 1e30f  // unary of a padding label: never the maximum, exp() of it is 0
#define CRF_MAX_PIXELS_PER_THREAD 16  // crf_update, crf_unary, crf_marginals, crf_embed: pixels per thread, at most
#define CRF_NEIGHBOURS_AHEAD 8  // vertices ahead whose hash slots crf_neighbours prefetches on the CPU
#define CRF_PLANE_AHEAD 128  // floats ahead of a planar read or write that the CPU prefetches
#ifndef CRF_SIMD
#define CRF_SIMD  // the CPU build (cpu_shim.h) marks some label loops for vectorisation
#endif
#ifndef CRF_EMBED_RUNS
// crf_embed's 16-pixel path, the CPU's (cpu_shim.h): compiled into the GPU's kernel, which takes
// one pixel per thread and never runs it, it would cost a 2.4 KB stack frame and register spills
#define CRF_EMBED_RUNS 0
#endif
#ifndef CRF_PREFETCHES
#define CRF_PREFETCHES 0  // 1 where CRF_PREFETCH does something (cpu_shim.h): work done only to prefetch is skipped
#endif
#ifndef CRF_PREFETCH
#define CRF_PREFETCH(address, for_write)  // the CPU build (cpu_shim.h) fetches lines ahead of use
#endif

__device__ __forceinline__ int crf_tid() { return (int)(blockIdx.x * blockDim.x + threadIdx.x); }

// The pixels of this thread in the kernels that take P pixels per thread (crf_update, crf_unary, crf_embed,
// crf_marginals): i0 .. i0 + n - 1, n at most CRF_MAX_PIXELS_PER_THREAD; false when none is left.
__device__ __forceinline__ bool crf_pixel_run(int N, int P, int& i0, int& n)
{
    const long long first = (long long)crf_tid() * P;
    if (first >= N) return false;
    i0 = (int)first;
    n = min(N - i0, min(P, CRF_MAX_PIXELS_PER_THREAD));
    return true;
}

// ------------------------------------------------------------------------------------------------
// Lattice construction (once per image and Gaussian kernel)

// The arithmetic of one pixel's embedding that crf_embed_pixel and crf_embed_run share, step for
// step (both must give the same bits).

// Feature j - 1's scale in the elevation onto the hyperplane: 1.0 / sqrt((double)((j + 1) * j)) for
// j = 1..5, as the reference computes it per pixel (IEEE sqrt and division are correctly rounded,
// so these literals are the same doubles), times the inverse standard deviation.
__device__ __forceinline__ float crf_elevation_scale(int j, int d)
{
    const double inv_sqrt[CRF_MAX_D + 1] = {0.0, 0.7071067811865475, 0.4082482904638631, 0.2886751345948129,
                                            0.22360679774997896, 0.18257418583505536};
    const float inv_std_dev = (float)(sqrt(2.0 / 3.0) * (d + 1));
    return (float)(inv_sqrt[j] * inv_std_dev);
}

// Whether an elevated coordinate fits the 16-bit keys (NaN does not).
__device__ __forceinline__ bool crf_in_key_range(float elevated) { return elevated > -32767.f && elevated < 32767.f; }

// The closest remainder-0 coordinate (ties round down, as the reference).
__device__ __forceinline__ float crf_nearest_rem0(float elevated, int d)
{
    const float v = 1.0f / (float)(d + 1) * elevated;
    const float up = ceilf(v) * (float)(d + 1);
    const float down = floorf(v) * (float)(d + 1);
    return (up - elevated < elevated - down) ? up : down;
}

// Coordinate of vertex r of the simplex, from the remainder-0 coordinate and its rank.
__device__ __forceinline__ int crf_vertex_coordinate(float rem0, int rank, int r, int d)
{
    return (int)rem0 + (rank <= d - r ? r : r - (d + 1));
}

// The first barycentric weight, completed as the reference does it (in double).
__device__ __forceinline__ float crf_first_weight(float first, float last)
{
    return (float)((double)first + (1.0 + (double)last));
}

// Features of pixel i (pydensecrf's order: x/sxy, y/sxy, c0/srgb, c1/srgb, c2/srgb), elevated onto
// the hyperplane, rounded to the enclosing simplex: writes the d+1 vertex keys (d ints each) and
// barycentric weights. image may be NULL when d == 2 (the spatial kernel). Keys are stored as
// 16-bit integers, as in the reference; a key outside that range (a bandwidth tiny for the image)
// sets overflow[0] and the driver refuses the result.
__device__ __forceinline__ void crf_embed_pixel(int i, const unsigned char* image, int W, int d, float sxy, float srgb,
                                                short* keys, float* weights, int* overflow)
{
    float f[CRF_MAX_D];
    f[0] = (float)(i % W) / sxy;
    f[1] = (float)(i / W) / sxy;
    for (int c = 0; c < d - 2; c++) f[2 + c] = (float)image[i * 3 + c] / srgb;

    float elevated[CRF_MAX_D + 1];
    float sm = 0.f;
    for (int j = d; j > 0; j--) {
        const float cf = f[j - 1] * crf_elevation_scale(j, d);
        elevated[j] = sm - (float)j * cf;
        sm += cf;
    }
    elevated[0] = sm;
    // A bandwidth tiny for the image puts coordinates beyond the 16-bit keys, and far enough out,
    // beyond int: the host refuses such inputs before launching (crf/driver.py check_limits); this
    // stops here anyway, before any float -> int conversion, with the entries zeroed (NaN fails too).
    for (int k = 0; k <= d; k++) {
        if (!crf_in_key_range(elevated[k])) {
            overflow[0] = 1;
            for (int e = i * (d + 1); e < (i + 1) * (d + 1); e++) {
                for (int c = 0; c < d; c++) keys[(long long)e * d + c] = 0;
                weights[e] = 0.f;
            }
            return;
        }
    }

    // Closest remainder-0 point, coordinate-wise.
    const float down_factor = 1.0f / (float)(d + 1);
    float rem0[CRF_MAX_D + 1];
    int sum = 0;
    for (int k = 0; k <= d; k++) {
        rem0[k] = crf_nearest_rem0(elevated[k], d);
        sum += (int)rem0[k] / (d + 1);
    }
    // Rank of each residual; the earlier index loses ties.
    // Fixed-size clears (not up to d): a variable-length one compiles to a slow `rep stos` on the CPU.
    int rank[CRF_MAX_D + 1];
    for (int k = 0; k <= CRF_MAX_D; k++) rank[k] = 0;
    // Counted without branches: the comparisons go either way at random (a mispredicted branch
    // each on the CPU).
    for (int a = 0; a < d; a++)
        for (int b = a + 1; b <= d; b++) {
            const int lt = elevated[a] - rem0[a] < elevated[b] - rem0[b];
            rank[a] += lt;
            rank[b] += 1 - lt;
        }
    // Bring the point back onto the plane if the rounding left it off.
    for (int k = 0; k <= d; k++) {
        rank[k] += sum;
        if (rank[k] < 0) { rank[k] += d + 1; rem0[k] += (float)(d + 1); }
        else if (rank[k] > d) { rank[k] -= d + 1; rem0[k] -= (float)(d + 1); }
    }
    // Barycentric weights: coordinate k adds its residual v_k at d - rank[k] and subtracts it at
    // d - rank[k] + 1 (the reference's loop). The ranks are a permutation, so each weight gets one
    // residual of each sign, and (0 + a) - b and (0 - b) + a are both a - b exactly: taken here
    // through the inverse permutation, without the reference's read-modify-writes at computed
    // indices (a chain of dependent stores and loads on the CPU).
    float v[CRF_MAX_D + 1];
    int by_rank[CRF_MAX_D + 1];
    for (int k = 0; k <= d; k++) {
        v[k] = (elevated[k] - rem0[k]) * down_factor;
        by_rank[rank[k]] = k;
    }
    float bary[CRF_MAX_D + 2];
    bary[0] = v[by_rank[d]];
    for (int r = 1; r <= d; r++) bary[r] = v[by_rank[d - r]] - v[by_rank[d - r + 1]];
    bary[d + 1] = -v[by_rank[0]];
    bary[0] = crf_first_weight(bary[0], bary[d + 1]);

    for (int r = 0; r <= d; r++) {
        const int e = i * (d + 1) + r;
        for (int k = 0; k < d; k++) {
            const int key = crf_vertex_coordinate(rem0[k], rank[k], r, d);
            if (key < -32768 || key > 32767) overflow[0] = 1;
            keys[(long long)e * d + k] = (short)key;
        }
        weights[e] = bary[r];
    }
}

// crf_embed for n pixels i0 .. i0 + n - 1 at once, each step for all of them before the next (the
// pixels innermost: with n a constant, the CPU build does each step as vector operations across
// the pixels): crf_embed_pixel's operations, selects instead of its branches and of its indexing
// by rank (each select picks one exact value): the same bits. A block in which any coordinate
// falls outside the 16-bit keys is done again pixel by pixel, for crf_embed_pixel's zeroing.
__device__ __forceinline__ void crf_embed_run(int i0, int n, const unsigned char* image, int W, int d, float sxy,
                                              float srgb, short* keys, float* weights, int* overflow)
{
    d = min(max(d, 1), CRF_MAX_D);  // 2 or 5 always: said for the compiler's bounds analysis (else a warning)
    float el[CRF_MAX_D + 1][CRF_MAX_PIXELS_PER_THREAD], rem0[CRF_MAX_D + 1][CRF_MAX_PIXELS_PER_THREAD];
    int rank[CRF_MAX_D + 1][CRF_MAX_PIXELS_PER_THREAD], sum[CRF_MAX_PIXELS_PER_THREAD];
    float sm[CRF_MAX_PIXELS_PER_THREAD];
    // x and y of each pixel without a division per pixel (the caller ensures n <= W: one wrap at most)
    int px[CRF_MAX_PIXELS_PER_THREAD], py[CRF_MAX_PIXELS_PER_THREAD];
    const int x0 = i0 % W, y0 = i0 / W;
    for (int p = 0; p < n; p++) {
        const int wrap = x0 + p >= W;
        px[p] = x0 + p - (wrap ? W : 0);
        py[p] = y0 + wrap;
    }
    for (int p = 0; p < n; p++) sm[p] = 0.f;
    for (int j = d; j > 0; j--) {
        const float scale = crf_elevation_scale(j, d);
        for (int p = 0; p < n; p++) {
            const int i = i0 + p;
            const float f = j == 1 ? (float)px[p] / sxy
                          : j == 2 ? (float)py[p] / sxy
                                   : (float)image[i * 3 + (j - 3)] / srgb;
            const float cf = f * scale;
            el[j][p] = sm[p] - (float)j * cf;
            sm[p] += cf;
        }
    }
    int outside = 0;
    for (int p = 0; p < n; p++) el[0][p] = sm[p];
    for (int k = 0; k <= d; k++)
        for (int p = 0; p < n; p++) outside |= !crf_in_key_range(el[k][p]);
    if (outside) {
        for (int p = 0; p < n; p++) crf_embed_pixel(i0 + p, image, W, d, sxy, srgb, keys, weights, overflow);
        return;
    }
    const float down_factor = 1.0f / (float)(d + 1);
    for (int p = 0; p < n; p++) sum[p] = 0;
    for (int k = 0; k <= d; k++)
        for (int p = 0; p < n; p++) {
            rem0[k][p] = crf_nearest_rem0(el[k][p], d);
            sum[p] += (int)rem0[k][p] / (d + 1);
        }
    // Rank of each residual, as crf_embed_pixel counts it (the earlier index loses ties): for
    // coordinate k, the later ones it is below, and the earlier ones it is not below.
    float res[CRF_MAX_D + 1][CRF_MAX_PIXELS_PER_THREAD];
    for (int k = 0; k <= d; k++)
        for (int p = 0; p < n; p++) res[k][p] = el[k][p] - rem0[k][p];
    for (int k = 0; k <= d; k++) {
        int count[CRF_MAX_PIXELS_PER_THREAD];
        for (int p = 0; p < n; p++) count[p] = sum[p];
        for (int b = 0; b < k; b++)
            for (int p = 0; p < n; p++) count[p] += !(res[b][p] < res[k][p]);
        for (int b = k + 1; b <= d; b++)
            for (int p = 0; p < n; p++) count[p] += res[k][p] < res[b][p];
        for (int p = 0; p < n; p++) rank[k][p] = count[p];
    }
    for (int k = 0; k <= d; k++)
        CRF_SIMD
        for (int p = 0; p < n; p++) {
            const int r = rank[k][p];
            rank[k][p] = r < 0 ? r + (d + 1) : (r > d ? r - (d + 1) : r);
            rem0[k][p] = r < 0 ? rem0[k][p] + (float)(d + 1) : (r > d ? rem0[k][p] - (float)(d + 1) : rem0[k][p]);
        }
    // The residual of rank t (exactly one k has it; rem0 as corrected above): selects, not sums, so
    // that even the sign of a zero is kept. by_rank[t] = v[k] with rank[k] == t.
    float v[CRF_MAX_D + 1][CRF_MAX_PIXELS_PER_THREAD], by_rank[CRF_MAX_D + 1][CRF_MAX_PIXELS_PER_THREAD];
    for (int k = 0; k <= d; k++)
        for (int p = 0; p < n; p++) v[k][p] = (el[k][p] - rem0[k][p]) * down_factor;
    for (int t = 0; t <= d; t++) {
        float pick[CRF_MAX_PIXELS_PER_THREAD];
        for (int p = 0; p < n; p++) pick[p] = 0.f;
        for (int k = 0; k <= d; k++) {
            CRF_SIMD
            for (int p = 0; p < n; p++) pick[p] = rank[k][p] == t ? v[k][p] : pick[p];
        }
        for (int p = 0; p < n; p++) by_rank[t][p] = pick[p];
    }
    float bary[CRF_MAX_D + 2][CRF_MAX_PIXELS_PER_THREAD];
    for (int p = 0; p < n; p++) bary[0][p] = by_rank[d][p];
    for (int r = 1; r <= d; r++)
        for (int p = 0; p < n; p++) bary[r][p] = by_rank[d - r][p] - by_rank[d - r + 1][p];
    for (int p = 0; p < n; p++) bary[d + 1][p] = -by_rank[0][p];
    for (int p = 0; p < n; p++) bary[0][p] = crf_first_weight(bary[0][p], bary[d + 1][p]);
    // Each pixel's smallest and largest key coordinate, for the 16-bit check after the loop: lane
    // by lane, so the loop stays vector code (an "any out of range" flag made GCC extract every lane).
    int lo[CRF_MAX_PIXELS_PER_THREAD], hi[CRF_MAX_PIXELS_PER_THREAD];
    for (int p = 0; p < n; p++) lo[p] = hi[p] = 0;
    for (int r = 0; r <= d; r++) {
        short key[CRF_MAX_D][CRF_MAX_PIXELS_PER_THREAD];
        for (int k = 0; k < d; k++) {
            CRF_SIMD
            for (int p = 0; p < n; p++) {
                const int kv = crf_vertex_coordinate(rem0[k][p], rank[k][p], r, d);
                lo[p] = kv < lo[p] ? kv : lo[p];
                hi[p] = kv > hi[p] ? kv : hi[p];
                key[k][p] = (short)kv;
            }
        }
        for (int p = 0; p < n; p++) {
            const int e = (i0 + p) * (d + 1) + r;
            for (int k = 0; k < d; k++) keys[(long long)e * d + k] = key[k][p];
            weights[e] = bary[r][p];
        }
    }
    int bad = 0;
    for (int p = 0; p < n; p++) bad |= lo[p] < -32768 || hi[p] > 32767;
    if (bad) overflow[0] = 1;
}

// Features of pixels P*t .. P*t + P - 1 (thread t; the GPU takes one), see crf_embed_pixel.
extern "C" __global__ void crf_embed(const unsigned char* image, int H, int W, int d, float sxy, float srgb,
                                     short* keys, float* weights, int* overflow, int P)
{
    int i0, n;
    if (!crf_pixel_run(H * W, P, i0, n)) return;
    if (CRF_EMBED_RUNS && n == CRF_MAX_PIXELS_PER_THREAD && W >= CRF_MAX_PIXELS_PER_THREAD)
        crf_embed_run(i0, CRF_MAX_PIXELS_PER_THREAD, image, W, d, sxy, srgb, keys, weights, overflow);
    else
        for (int p = 0; p < n; p++) crf_embed_pixel(i0 + p, image, W, d, sxy, srgb, keys, weights, overflow);
}

template <typename K>
__device__ __forceinline__ unsigned int crf_hash(const K* key, int d)
{
    unsigned int h = 0;
    for (int k = 0; k < d; k++) h = (h + (unsigned int)key[k]) * 2531011u;
    return h;
}

template <typename K>
__device__ __forceinline__ bool crf_same_key(const short* a, const K* b, int d)
{
    for (int k = 0; k < d; k++)
        if (a[k] != b[k]) return false;
    return true;
}

// Open addressing, linear probing. A slot holds -1 (empty) or the smallest entry with its key
// (atomicMin: every entry in a slot has the same key, so comparing against whichever entry the
// slot holds at the moment is always right). Keys were written by crf_embed (an earlier launch),
// so no locks are needed, and two entries with the same key always meet at the same slot.
// The table is sized for a typical vertex count (a few % of the entries), not the worst case:
// fill[0] counts the slots taken; past `limit` (half the table) fill[1] is set, every thread
// stops, and the driver builds again with a table for the worst case.
extern "C" __global__ void crf_hash_insert(const short* keys, int n_entries, int d, int* table, unsigned int mask,
                                           int limit, int* fill, int* slot_of)
{
    const int e = crf_tid();
    if (e >= n_entries) return;
    const short* key = keys + (long long)e * d;
    unsigned int h = crf_hash(key, d) & mask;
    for (;;) {
        // A plain read first: most entries find their key already there (a vertex is shared by
        // ~25 entries), and a locked compare-and-swap costs far more than a load on the CPU. A
        // stale -1 only sends us to the atomicCAS, which sees the truth; a slot never goes back to -1.
        int cur = *(volatile const int*)&table[h];
        if (cur == -1) cur = atomicCAS(&table[h], -1, e);
        if (cur == -1) {
            slot_of[e] = (int)h;
            if (atomicAdd(&fill[0], 1) >= limit) fill[1] = 1;
            return;
        }
        if (crf_same_key(keys + (long long)cur * d, key, d)) {
            atomicMin(&table[h], e);
            slot_of[e] = (int)h;
            return;
        }
        h = (h + 1) & mask;
        if (*(volatile const int*)&fill[1]) {  // too full: this build is abandoned and redone
            slot_of[e] = 0;  // a valid slot, so that the kernels queued behind this one stay in bounds
            return;
        }
    }
}

// Entry e's bookkeeping in the serial insertions (crf_insert_serial, crf_insert_dense), once its
// vertex v is known: a new vertex gets the key and the entry's weight as its first sum, a known
// one adds the weight; the entry's offset is v.
__device__ __forceinline__ void crf_serial_entry(int e, int v, bool is_new, const short* key, int d,
                                                 short* vertex_keys, int* offsets, const float* weights,
                                                 float* weight_sums)
{
    if (is_new) {
        for (int k = 0; k < d; k++) vertex_keys[(long long)v * d + k] = key[k];
        if (weight_sums) weight_sums[v] = weights[e];
    } else if (weight_sums) {
        weight_sums[v] += weights[e];
    }
    offsets[e] = v;
}

// The CPU's insertion (crf/driver.py "insert": "serial"): one thread walks the entries in order,
// so a vertex is numbered when its first entry arrives, which is the numbering crf_hash_insert +
// crf_mark_first + the scan + crf_number_vertices + crf_offsets make in five passes with atomics:
// the same table (slot -> vertex id) and offsets. fill[0] := the vertex count; past `limit`
// vertices fill[1] is set and the driver builds again with a table for the worst case.
// vertex_keys (`limit` keys of d) gets each vertex's key, in vertex order: the keys compared while
// probing are then in a compact array that stays in cache, not spread over all entries' keys (what
// vertex_entry points into on the GPU). weight_sums (or NULL): each vertex's barycentric weights added in
// entry order, the splat of ones that the normaliser filters (the same additions as the float
// splats make of it, so the same bits) at the cost of one addition per entry here instead of a
// pass over all entries; `limit` floats.
extern "C" __global__ void crf_insert_serial(const short* keys, int n_entries, int d, int* table, unsigned int mask,
                                             int limit, int* fill, short* vertex_keys, int* offsets,
                                             const float* weights, float* weight_sums)
{
    if (crf_tid() != 0) return;
    int m = 0;
    for (int e = 0; e < n_entries; e++) {
        const short* key = keys + (long long)e * d;
        unsigned int h = crf_hash(key, d) & mask;
        for (;;) {
            const int v = table[h];
            if (v < 0) {
                if (m >= limit) {
                    fill[1] = 1;
                    return;
                }
                table[h] = m;
                crf_serial_entry(e, m++, true, key, d, vertex_keys, offsets, weights, weight_sums);
                break;
            }
            if (crf_same_key(vertex_keys + (long long)v * d, key, d)) {
                crf_serial_entry(e, v, false, key, d, vertex_keys, offsets, weights, weight_sums);
                break;
            }
            h = (h + 1) & mask;
        }
    }
    fill[0] = m;
}

// Vertex numbering in entry (= pixel) order, so that vertices close in number are close in the
// image: splat's gathers, the update's reads and the blur then walk memory mostly in order. The
// representative of a slot is its smallest entry (what the table holds after insertion); a scan
// over the "is representative" flags gives the vertex ids. Deterministic, whatever order the
// threads inserted in.
extern "C" __global__ void crf_mark_first(const int* slot_of, const int* table, int n_entries, int* first)
{
    const int e = crf_tid();
    if (e >= n_entries) return;
    first[e] = table[slot_of[e]] == e ? 1 : 0;
}

// rank = exclusive scan of the flags (scanned in place: entry e is a representative where
// rank[e+1] > rank[e]). table[slot] := vertex id of the slot, vertex_entry[id] := its representative.
extern "C" __global__ void crf_number_vertices(const int* slot_of, const int* rank, int n_entries, int* table,
                                               int* vertex_entry)
{
    const int e = crf_tid();
    if (e >= n_entries || rank[e + 1] == rank[e]) return;
    table[slot_of[e]] = rank[e];
    vertex_entry[rank[e]] = e;
}

extern "C" __global__ void crf_offsets(const int* slot_of, const int* table, int n_entries, int* offsets)
{
    const int e = crf_tid();
    if (e >= n_entries) return;
    offsets[e] = table[slot_of[e]];
}

// The key of vertex v: keys[vertex_entry[v]] (the entries' keys, the GPU's atomic insertion), or
// with vertex_entry NULL, row v of keys (crf_insert_serial's vertex_keys).
__device__ __forceinline__ const short* crf_vertex_key(const short* keys, const int* vertex_entry, int v, int d)
{
    return keys + (long long)(vertex_entry ? vertex_entry[v] : v) * d;
}

__device__ int crf_find(const int* key, int d, const short* keys, const int* vertex_entry, const int* table,
                        unsigned int mask)
{
    unsigned int h = crf_hash(key, d) & mask;
    for (;;) {
        const int v = table[h];
        if (v < 0) return -1;
        if (crf_same_key(crf_vertex_key(keys, vertex_entry, v, d), key, d)) return v;
        h = (h + 1) & mask;
    }
}

// The keys of a vertex's two neighbours along direction j (crf_neighbours).
__device__ __forceinline__ void crf_neighbour_keys(const short* key, int j, int d, int* n1, int* n2)
{
    for (int k = 0; k < d; k++) { n1[k] = key[k] - 1; n2[k] = key[k] + 1; }
    if (j < d) { n1[j] = key[j] + d; n2[j] = key[j] - d; }
}

// Blur neighbours of vertex v along direction j: key -1 on every coordinate and +d on coordinate j
// (and the opposite); direction d moves all coordinates by -1/+1. nbr[(j*M + v)*2 + {0,1}]; an
// absent neighbour is M, a row of zeros kept at the end of the value buffers (no branch in the blur).
// Vertex keys as crf_vertex_key.
extern "C" __global__ void crf_neighbours(const short* keys, const int* vertex_entry, int M, int d, const int* table,
                                          unsigned int mask, int* nbr)
{
    const int t = crf_tid();
    if (t >= M * (d + 1)) return;
    const int v = t % M, j = t / M;
    int n1[CRF_MAX_D], n2[CRF_MAX_D];
    // The hash slots of the vertex a few ahead (the CPU's threads of a block take the vertices in
    // order): a lattice of 200,000 vertices has a table of megabytes, each probe a cache miss.
    if (CRF_PREFETCHES && v + CRF_NEIGHBOURS_AHEAD < M) {
        crf_neighbour_keys(crf_vertex_key(keys, vertex_entry, v + CRF_NEIGHBOURS_AHEAD, d), j, d, n1, n2);
        CRF_PREFETCH(table + (crf_hash(n1, d) & mask), 0);
        CRF_PREFETCH(table + (crf_hash(n2, d) & mask), 0);
    }
    crf_neighbour_keys(crf_vertex_key(keys, vertex_entry, v, d), j, d, n1, n2);
    const int a = crf_find(n1, d, keys, vertex_entry, table, mask);
    const int b = crf_find(n2, d, keys, vertex_entry, table, mask);
    nbr[t * 2] = a < 0 ? M : a;
    nbr[t * 2 + 1] = b < 0 ? M : b;
}

// The spatial lattice's keys (d = 2) on the CPU ("spatial_table": "dense"): a table indexed by
// the key itself, slot (k0 - box[0]) * box[3] + (k1 - box[1]), in place of the hash table: no
// hashing, no probing and no key comparison. The keys' box: box[0], box[1] their minima,
// box[2], box[3] the spans (max - min + 1). One thread.
extern "C" __global__ void crf_key_box(const short* keys, int n_entries, int* box)
{
    if (crf_tid() != 0) return;
    int lo0 = 32767, lo1 = 32767, hi0 = -32768, hi1 = -32768;
    for (int e = 0; e < n_entries; e++) {
        const int k0 = keys[2 * (long long)e], k1 = keys[2 * (long long)e + 1];
        lo0 = k0 < lo0 ? k0 : lo0;
        hi0 = k0 > hi0 ? k0 : hi0;
        lo1 = k1 < lo1 ? k1 : lo1;
        hi1 = k1 > hi1 ? k1 : hi1;
    }
    box[0] = lo0;
    box[1] = lo1;
    box[2] = n_entries ? hi0 - lo0 + 1 : 0;
    box[3] = n_entries ? hi1 - lo1 + 1 : 0;
}

// The dense table's slot of a 2-D key, or -1 outside the box.
template <typename K>
__device__ __forceinline__ long long crf_dense_slot(const K* key, const int* box)
{
    const int a = key[0] - box[0], b = key[1] - box[1];
    if (a < 0 || a >= box[2] || b < 0 || b >= box[3]) return -1;
    return (long long)a * box[3] + b;
}

// crf_insert_serial with the dense table (every slot -1 before): the same vertices, numbering,
// vertex keys, offsets and weight sums. fill[0] := the vertex count (the table cannot fill up).
extern "C" __global__ void crf_insert_dense(const short* keys, int n_entries, const int* box, int* table, int* fill,
                                            short* vertex_keys, int* offsets, const float* weights,
                                            float* weight_sums)
{
    if (crf_tid() != 0) return;
    int m = 0;
    for (int e = 0; e < n_entries; e++) {
        const short* key = keys + 2 * (long long)e;
        int* slot = table + crf_dense_slot(key, box);
        const bool is_new = *slot < 0;
        if (is_new) *slot = m++;
        crf_serial_entry(e, *slot, is_new, key, 2, vertex_keys, offsets, weights, weight_sums);
    }
    fill[0] = m;
}

// crf_neighbours with the dense table (vertex keys as crf_insert_serial's): the same nbr.
extern "C" __global__ void crf_neighbours_dense(const short* vertex_keys, int M, const int* box, const int* table,
                                                int* nbr)
{
    const int t = crf_tid();
    if (t >= M * 3) return;
    const int v = t % M, j = t / M;
    int n1[2], n2[2];
    crf_neighbour_keys(vertex_keys + 2 * (long long)v, j, 2, n1, n2);
    const long long s1 = crf_dense_slot(n1, box), s2 = crf_dense_slot(n2, box);
    const int a = s1 < 0 ? -1 : table[s1], b = s2 < 0 ? -1 : table[s2];
    nbr[t * 2] = a < 0 ? M : a;
    nbr[t * 2 + 1] = b < 0 ? M : b;
}

// Entry lists per vertex (CSR), so that splatting is a gather without float atomics.
extern "C" __global__ void crf_count(const int* offsets, int n_entries, int* counts)
{
    const int e = crf_tid();
    if (e >= n_entries) return;
    atomicAdd(&counts[offsets[e]], 1);
}

// Exclusive scan in three launches (no block-level synchronisation needed): per-chunk sums, a
// serial scan of the chunk sums, per-chunk serial scans with their offsets. out has n+1 entries.
extern "C" __global__ void crf_scan_chunks(const int* in, int n, int chunk, int* sums)
{
    const int t = crf_tid();
    if (t * chunk >= n) return;
    const int end = min(n, (t + 1) * chunk);
    int s = 0;
    for (int k = t * chunk; k < end; k++) s += in[k];
    sums[t] = s;
}

extern "C" __global__ void crf_scan_sums(int* sums, int n_chunks)
{
    if (crf_tid() != 0) return;
    int run = 0;
    for (int k = 0; k < n_chunks; k++) { const int s = sums[k]; sums[k] = run; run += s; }
    sums[n_chunks] = run;
}

extern "C" __global__ void crf_scan_apply(const int* in, int n, int chunk, const int* sums, int n_chunks, int* out)
{
    const int t = crf_tid();
    if (t == 0) out[n] = sums[n_chunks];
    if (t * chunk >= n) return;
    const int end = min(n, (t + 1) * chunk);
    int run = sums[t];
    for (int k = t * chunk; k < end; k++) { const int x = in[k]; out[k] = run; run += x; }  // in == out is fine
}

extern "C" __global__ void crf_fill_lists(const int* offsets, int n_entries, const int* starts, int* cursor, int* list)
{
    const int e = crf_tid();
    if (e >= n_entries) return;
    const int v = offsets[e];
    list[starts[v] + atomicAdd(&cursor[v], 1)] = e;
}

// Slot k of the entry lists as splatting reads it, contiguous: entry e's weight and (to_pixels)
// its pixel in place of the entry (crf_splat_fixed keeps the entries: to_pixels 0).
__device__ __forceinline__ void crf_list_slot(int k, int e, const float* weights, int dp1, int to_pixels, int* list,
                                              float* list_w)
{
    list_w[k] = weights[e];
    list[k] = to_pixels ? e / dp1 : e;
}

// The entry lists in one pass by one thread (the CPU's choice, crf/driver.py "lists": "serial"):
// walking the entries in order fills each list already sorted, with plain increments. On the CPU
// the atomics of crf_count / crf_fill_lists cost more than the work itself (a locked add per
// entry), and the sort pass goes too; what crf_list_payload would write is written here too (the
// pixel of each entry when to_pixels, and its weight in list_w). counts: M zeros on entry. The
// same lists as count + scan + fill + sort + payload.
extern "C" __global__ void crf_lists_serial(const int* offsets, int n_entries, int M, int* counts, int* starts,
                                            int* list, const float* weights, int dp1, int to_pixels, float* list_w)
{
    if (crf_tid() != 0) return;
    for (int e = 0; e < n_entries; e++) counts[offsets[e]]++;
    int run = 0;
    for (int v = 0; v < M; v++) {
        starts[v] = run;
        run += counts[v];
        counts[v] = 0;  // from here on, the fill cursor of v
    }
    starts[M] = run;
    for (int e = 0; e < n_entries; e++) {
        crf_list_slot(starts[offsets[e]] + counts[offsets[e]]++, e, weights, dp1, to_pixels, list, list_w);
    }
}

// Sort each vertex's entries by index: splat then adds in pixel order, as the reference does,
// and the result does not depend on the order in which threads filled the lists.
extern "C" __global__ void crf_sort_lists(const int* starts, int M, int* list)
{
    const int v = crf_tid();
    if (v >= M) return;
    for (int a = starts[v] + 1; a < starts[v + 1]; a++) {
        const int x = list[a];
        int b = a - 1;
        while (b >= starts[v] && list[b] > x) { list[b + 1] = list[b]; b--; }
        list[b + 1] = x;
    }
}

// The filled entry lists turned into what splatting reads (crf_list_slot), slot by slot.
extern "C" __global__ void crf_list_payload(int* list, const float* weights, int dp1, int n_entries, int to_pixels,
                                            float* list_w)
{
    const int k = crf_tid();
    if (k >= n_entries) return;
    crf_list_slot(k, list[k], weights, dp1, to_pixels, list, list_w);
}

// ------------------------------------------------------------------------------------------------
// Filtering (every iteration, all labels at once)

// Label chunking: a thread handles labels [c0, c1) of one row of S. The GPU launches one thread
// per label (chunk 1: neighbouring threads touch neighbouring floats); the CPU one thread per row
// (chunk S: the label loop is contiguous and vectorises).
__device__ __forceinline__ void crf_chunk(int t, int S, int chunk, int& row, int& c0, int& c1)
{
    const int per_row = (S + chunk - 1) / chunk;
    row = t / per_row;
    c0 = (t - row * per_row) * chunk;
    c1 = min(S, c0 + chunk);
}

// V[v*S + l] = sum over the entries of v of weight * (prescale[pixel] * Q[pixel*S + l]), in pixel
// order (S: the row width, padding included). prescale may be NULL (normalisation "after");
// "symmetric" passes 1/sqrt(norm).
extern "C" __global__ void crf_splat(const float* __restrict__ Q, const float* __restrict__ prescale,
                                     const int* __restrict__ starts, const int* __restrict__ list_pix,
                                     const float* __restrict__ list_w, int M, int S, int chunk, float* __restrict__ V)
{
    int v, c0, c1;
    crf_chunk(crf_tid(), S, chunk, v, c0, c1);
    if (v >= M) return;
    float* out = V + (long long)v * S;
    // The first entry sets the row (0 + x is x: the terms are >= +0), rather than a zeroing loop
    // first: on the CPU that becomes a memset call whose byte stores the first additions' vector
    // loads would wait for. A vertex has at least one entry.
    const int k_end = starts[v + 1];
    int k = starts[v];
    {
        const int pix = list_pix[k];
        const float sc = prescale ? prescale[pix] : 1.f, w = list_w[k];
        const float* q = Q + (long long)pix * S;
        for (int l = c0; l < c1; l++) out[l] = w * (q[l] * sc);
        k++;
    }
    // Four entries per pass over the labels: the same additions in the same order as one at a
    // time, with a quarter of the loop overhead (label loops are short: ~21 labels).
    for (; k + 4 <= k_end; k += 4) {
        const int p0 = list_pix[k], p1 = list_pix[k + 1], p2 = list_pix[k + 2], p3 = list_pix[k + 3];
        const float s0 = prescale ? prescale[p0] : 1.f, s1 = prescale ? prescale[p1] : 1.f;
        const float s2 = prescale ? prescale[p2] : 1.f, s3 = prescale ? prescale[p3] : 1.f;
        const float w0 = list_w[k], w1 = list_w[k + 1], w2 = list_w[k + 2], w3 = list_w[k + 3];
        const float* q0 = Q + (long long)p0 * S;
        const float* q1 = Q + (long long)p1 * S;
        const float* q2 = Q + (long long)p2 * S;
        const float* q3 = Q + (long long)p3 * S;
        for (int l = c0; l < c1; l++)
            out[l] = (((out[l] + w0 * (q0[l] * s0)) + w1 * (q1[l] * s1)) + w2 * (q2[l] * s2)) + w3 * (q3[l] * s3);
    }
    for (; k < k_end; k++) {
        const int pix = list_pix[k];
        const float sc = prescale ? prescale[pix] : 1.f, w = list_w[k];
        const float* q = Q + (long long)pix * S;
        for (int l = c0; l < c1; l++) out[l] += w * (q[l] * sc);
    }
}

// One lattice's scatter splat (crf_splat_scatter): rows 0..M-1 of V zeroed, then each pixel's row
// added into its d+1 vertex rows, pixel after pixel.
__device__ __forceinline__ void crf_scatter_lattice(const float* __restrict__ Q, const float* __restrict__ prescale,
                                                    const int* __restrict__ offsets,
                                                    const float* __restrict__ weights, int N, int dp1, int M, int S,
                                                    float* __restrict__ V)
{
    for (long long j = 0; j < (long long)M * S; j++) V[j] = 0.f;
    for (int i = 0; i < N; i++) {
        const float sc = prescale ? prescale[i] : 1.f;
        const float* q = Q + (long long)i * S;
        for (int r = 0; r < dp1; r++) {
            const float w = weights[i * dp1 + r];
            float* out = V + (long long)offsets[i * dp1 + r] * S;
            CRF_SIMD
            for (int l = 0; l < S; l++) out[l] += w * (q[l] * sc);
        }
    }
}

// The GPU's splat. crf_splat gives one thread a whole vertex: on a GPU that is one thread looping
// over thousands of entries where a vertex covers a flat region (4,572 entries at most on a 500x375
// photograph, 6,517 on a flat image), and it needs the lists sorted (one thread per vertex again).
// Here a thread takes K consecutive list slots (the same work for every thread, whatever the list
// lengths) and adds its sums per vertex into V with atomics, in 32.32 fixed point: integer
// additions are exact, so neither the order of the listed entries nor the order in which the
// atomics land changes the result: deterministic without sorting the lists. Each term is rounded
// to 2^-32 (absolute error <= 1.2e-10 per entry; sums stay below 2^31 for any image the kernels
// take). list holds entry ids grouped by vertex (any order within a vertex), list_w their weights.
#define CRF_FIXED_ONE 4294967296.0f  // 2^32
extern "C" __global__ void crf_splat_fixed(const float* __restrict__ Q, const float* __restrict__ prescale,
                                           const int* __restrict__ list, const float* __restrict__ list_w,
                                           const int* __restrict__ offsets, int n_entries, int dp1, int K, int S,
                                           int chunk, unsigned long long* __restrict__ V)
{
    int c, c0, c1;
    crf_chunk(crf_tid(), S, chunk, c, c0, c1);
    const long long k_begin = (long long)c * K;
    if (k_begin >= n_entries) return;
    const int k0 = (int)k_begin, k1 = min(n_entries, k0 + K);
    for (int l = c0; l < c1; l++) {
        long long acc = 0;
        int cur = offsets[list[k0]];
        for (int k = k0; k < k1; k++) {
            const int e = list[k];
            const int v = offsets[e];
            if (v != cur) {  // the slots of one vertex are contiguous: flush at each change
                atomicAdd(&V[(long long)cur * S + l], (unsigned long long)acc);
                acc = 0;
                cur = v;
            }
            const int pix = e / dp1;
            const float sc = prescale ? prescale[pix] : 1.f;
            acc += llrintf(list_w[k] * (Q[(long long)pix * S + l] * sc) * CRF_FIXED_ONE);
        }
        atomicAdd(&V[(long long)cur * S + l], (unsigned long long)acc);
    }
}

// A lattice value as float: float sums as they are, fixed-point sums (crf_splat_fixed) / 2^32.
__device__ __forceinline__ float crf_value(float x) { return x; }
__device__ __forceinline__ float crf_value(unsigned long long x) { return (float)(long long)x * (1.0f / CRF_FIXED_ONE); }

// Labels [c0, c1) of vertex v's row after the blur along direction j: its value plus half of each
// neighbour's (row M of in, zeros, where a neighbour is absent).
template <typename T>
__device__ __forceinline__ void crf_blur_row(const T* __restrict__ in, float* __restrict__ out,
                                             const int* __restrict__ nbr, int j, int M, int S, int v, int c0, int c1)
{
    const T* a = in + (long long)nbr[(j * M + v) * 2] * S;
    const T* b = in + (long long)nbr[(j * M + v) * 2 + 1] * S;
    const T* x = in + (long long)v * S;
    float* y = out + (long long)v * S;
    for (int l = c0; l < c1; l++) y[l] = crf_value(x[l]) + 0.5f * (crf_value(a[l]) + crf_value(b[l]));
}

// One blur pass along direction j of this thread's labels: out = in + 0.5 (in[n1] + in[n2]); row M
// of in is zeros. Returns the thread's row (M or more: none).
template <typename T>
__device__ __forceinline__ int crf_blur_pass(const T* __restrict__ in, float* __restrict__ out,
                                             const int* __restrict__ nbr, int j, int M, int S, int chunk, int& c0,
                                             int& c1)
{
    int v;
    crf_chunk(crf_tid(), S, chunk, v, c0, c1);
    if (v >= M) return v;
    crf_blur_row(in, out, nbr, j, M, S, v, c0, c1);
    return v;
}

// A blur pass over float values. zero_fixed (the fixed-point splat's second pass; else NULL):
// clears this thread's part of the fixed-point sums, which the first pass has read, so they are
// zero for the next splat.
extern "C" __global__ void crf_blur(const float* __restrict__ in, float* __restrict__ out, const int* __restrict__ nbr,
                                    int j, int M, int S, int chunk, unsigned long long* __restrict__ zero_fixed)
{
    int c0, c1;
    const int v = crf_blur_pass(in, out, nbr, j, M, S, chunk, c0, c1);
    if (v < M && zero_fixed)
        for (int l = c0; l < c1; l++) zero_fixed[(long long)v * S + l] = 0ull;
}

// The first blur pass after crf_splat_fixed, reading its sums as they are (converted to float
// exactly as a separate conversion pass would, one launch fewer).
extern "C" __global__ void crf_blur_fixed(const unsigned long long* __restrict__ in, float* __restrict__ out,
                                          const int* __restrict__ nbr, int j, int M, int S, int chunk)
{
    int c0, c1;
    crf_blur_pass(in, out, nbr, j, M, S, chunk, c0, c1);
}

// The CPU's splat (crf/driver.py "splat": "scatter"): one thread per lattice (thread 0: lattice a,
// thread 1: lattice b, absent when offsets_b is NULL) walks the pixels in order and adds each
// pixel's row into its d+1 vertex rows. Every vertex gets the same additions in the same order as
// crf_splat's sorted gather (pixel order, as the reference): the same bits. But Q is read once and
// in order, and the vertex rows written stay in cache (neighbouring pixels share their vertices),
// where the gather reads a pixel row at random per entry; and no entry lists are needed. The CPU
// build runs each thread of this launch as its own claim (cpu_launch.cpp), so the two lattices
// are splatted at once on two cores. weights: the barycentric weights in entry order. Row M of V
// (the blur's zero row) is not touched.
//
// nbr_b (else NULL): thread 1 also blurs lattice b, all its directions, once its splat is done,
// between V_b and W_b (the result in W_b for an odd d + 1, else in V_b: the driver's _blur_passes
// rule), while thread 0 is still splatting the larger lattice a (DeepLab's: 6 vertex rows per
// pixel against 3): what crf_blur's launches would do after the splat, row for row the same
// arithmetic: the same bits.
extern "C" __global__ void crf_splat_scatter(const float* __restrict__ Q, int N, int S,
                                             const float* __restrict__ prescale_a, const int* __restrict__ offsets_a,
                                             const float* __restrict__ weights_a, int dp1_a, int M_a,
                                             float* __restrict__ V_a,
                                             const float* __restrict__ prescale_b, const int* __restrict__ offsets_b,
                                             const float* __restrict__ weights_b, int dp1_b, int M_b,
                                             float* __restrict__ V_b, const int* __restrict__ nbr_b,
                                             float* __restrict__ W_b)
{
    const int t = crf_tid();
    if (t == 0)
        crf_scatter_lattice(Q, prescale_a, offsets_a, weights_a, N, dp1_a, M_a, S, V_a);
    else if (t == 1 && offsets_b) {
        crf_scatter_lattice(Q, prescale_b, offsets_b, weights_b, N, dp1_b, M_b, S, V_b);
        if (nbr_b)
            for (int j = 0; j < dp1_b; j++) {
                const float* in = j % 2 ? W_b : V_b;
                float* out = j % 2 ? V_b : W_b;
                for (int v = 0; v < M_b; v++) crf_blur_row(in, out, nbr_b, j, M_b, S, v, 0, S);
            }
    }
}

// out[i*C + l] = sum_r (weight * V[vertex][l]) * alpha, the reference's slice; used once per image
// to filter ones (the normaliser). The iterations slice inside crf_update.
extern "C" __global__ void crf_slice(const float* V, const int* offsets, const float* weights, int dp1, int N, int C,
                                     float alpha, float* out)
{
    const int t = crf_tid();
    if (t >= N * C) return;
    const int i = t / C, l = t - i * C;
    float s = 0.f;
    for (int r = 0; r < dp1; r++) s += weights[i * dp1 + r] * V[(long long)offsets[i * dp1 + r] * C + l] * alpha;
    out[t] = s;
}

// norm = 1/(filtered ones) ("after") or 1/sqrt(filtered ones) ("symmetric"), in double as the reference.
extern "C" __global__ void crf_normaliser(const float* ones_filtered, int N, int symmetric, float* norm)
{
    const int i = crf_tid();
    if (i >= N) return;
    const double n = (double)ones_filtered[i] + 1e-20;
    norm[i] = (float)(symmetric ? 1.0 / sqrt(n) : 1.0 / n);
}

// Per pixel-vertex coefficients of the update, once per image: coef = (w_k * alpha) * norm[pixel] *
// weight, so that the message of kernel k to pixel i is sum_r coef_r * V[vertex_r] (the weight, the
// slice's alpha and the normalisation folded into one factor). coef may be weights (written over
// them where nothing reads them after the normaliser: the list splats keep their own copy).
extern "C" __global__ void crf_coefficients(const float* weights, const float* norm, int dp1, int N, float scale,
                                            float* coef)
{
    const int i = crf_tid();  // a pixel per thread: no integer division per entry on the CPU
    if (i >= N) return;
    const float f = scale * norm[i];
    for (int r = 0; r < dp1; r++) coef[i * dp1 + r] = f * weights[i * dp1 + r];
}

// max of q[0..n): eight running maxima, a vector register on the CPU (one running maximum is a
// chain of n dependent scalar compares: a serial reduction the compiler may not reorder without
// fast-math). Unmarked, GCC kept the eight in scalar registers, a vmaxss per label. The maximum
// does not depend on the order: same result on both targets.
__device__ __forceinline__ float crf_row_max(const float* q, int n)
{
    float m8[8];
    for (int j = 0; j < 8; j++) m8[j] = -3.402823466e38f;
    int l = 0;
    for (; l + 8 <= n; l += 8) {
        CRF_SIMD
        for (int j = 0; j < 8; j++) m8[j] = q[l + j] > m8[j] ? q[l + j] : m8[j];  // not fmaxf: a libm call on the CPU
    }
    for (; l < n; l++) m8[0] = q[l] > m8[0] ? q[l] : m8[0];
    float m = m8[0];
    for (int j = 1; j < 8; j++) m = m8[j] > m ? m8[j] : m;
    return m;
}

// The messages to pixel i: Q_i := t = -U_i + sum over kernels and their d+1 vertices of coef *
// V[vertex] (Potts compatibility -w, subtracted, as densecrf); with V_s and V_b NULL, t = -U_i.
__device__ __forceinline__ void crf_update_messages(int i, const float* __restrict__ U, int S,
                                                    const float* __restrict__ V_s, const int* __restrict__ off_s,
                                                    const float* __restrict__ coef_s, int dp1_s,
                                                    const float* __restrict__ V_b, const int* __restrict__ off_b,
                                                    const float* __restrict__ coef_b, int dp1_b, float* __restrict__ Q)
{
    float* q = Q + (long long)i * S;
    const float* u = U + (long long)i * S;
    if (V_s && V_b && dp1_s == 3 && dp1_b == 6) {
        // DeepLab's two kernels (d = 2 and d = 5): all nine vertex rows in one pass over the
        // labels, added in the same order as the general loop below.
        const int es = i * 3, eb = i * 6;
        const float* s0 = V_s + (long long)off_s[es] * S;
        const float* s1 = V_s + (long long)off_s[es + 1] * S;
        const float* s2 = V_s + (long long)off_s[es + 2] * S;
        const float* b0 = V_b + (long long)off_b[eb] * S;
        const float* b1 = V_b + (long long)off_b[eb + 1] * S;
        const float* b2 = V_b + (long long)off_b[eb + 2] * S;
        const float* b3 = V_b + (long long)off_b[eb + 3] * S;
        const float* b4 = V_b + (long long)off_b[eb + 4] * S;
        const float* b5 = V_b + (long long)off_b[eb + 5] * S;
        const float cs0 = coef_s[es], cs1 = coef_s[es + 1], cs2 = coef_s[es + 2];
        const float cb0 = coef_b[eb], cb1 = coef_b[eb + 1], cb2 = coef_b[eb + 2];
        const float cb3 = coef_b[eb + 3], cb4 = coef_b[eb + 4], cb5 = coef_b[eb + 5];
        for (int l = 0; l < S; l++) {
            float t = -u[l];
            t += cs0 * s0[l];
            t += cs1 * s1[l];
            t += cs2 * s2[l];
            t += cb0 * b0[l];
            t += cb1 * b1[l];
            t += cb2 * b2[l];
            t += cb3 * b3[l];
            t += cb4 * b4[l];
            t += cb5 * b5[l];
            q[l] = t;
        }
    } else {
        for (int l = 0; l < S; l++) q[l] = -u[l];
        if (V_s)
            for (int r = 0; r < dp1_s; r++) {
                const float c = coef_s[i * dp1_s + r];
                const float* row = V_s + (long long)off_s[i * dp1_s + r] * S;
                for (int l = 0; l < S; l++) q[l] += c * row[l];
            }
        if (V_b)
            for (int r = 0; r < dp1_b; r++) {
                const float c = coef_b[i * dp1_b + r];
                const float* row = V_b + (long long)off_b[i * dp1_b + r] * S;
                for (int l = 0; l < S; l++) q[l] += c * row[l];
            }
    }
}

// q := exp(q - m) on the C labels, exactly 0 on the padding. Separate loops: this one vectorises
// on the CPU. Padding comes out exactly 0, whatever expf's floor: a select, not a second loop from
// C (a memset call per pixel on the CPU, whose byte stores the next loop's vector loads then wait for).
__device__ __forceinline__ void crf_exp_row(float* __restrict__ q, float m, int C, int S)
{
    for (int l = 0; l < S; l++) {
        const float x = expf(q[l] - m);
        q[l] = l < C ? x : 0.f;
    }
}

// q := q / sum of its C labels.
__device__ __forceinline__ void crf_normalise_row(float* __restrict__ q, int C, int S)
{
    float s = 0.f;
    for (int l = 0; l < C; l++) s += q[l];
    for (int l = 0; l < S; l++) q[l] = q[l] / s;
}

// The mean-field update of pixels P*t .. P*t + P - 1 (thread t): Q_i = softmax over the C labels
// of the messages to i (crf_update_messages), in place: both splats of this iteration have already
// read Q. Rows are S wide; labels C..S-1 (padding) come out exactly 0. The GPU takes one pixel per
// thread. The CPU takes a few and does each step for all of them before the next (messages, row
// maxima, exp, normalisation): each pixel's chain of dependent steps is long, and a core overlaps
// the independent chains of neighbouring pixels only when they sit close together in the
// instruction stream (P = 8: crf_update 25-30 % faster than P = 1; 16: a few % more). The same
// operations per pixel whatever P: the same bits.
extern "C" __global__ void crf_update(const float* __restrict__ U, int N, int C, int S,
                                      const float* __restrict__ V_s, const int* __restrict__ off_s,
                                      const float* __restrict__ coef_s, int dp1_s,
                                      const float* __restrict__ V_b, const int* __restrict__ off_b,
                                      const float* __restrict__ coef_b, int dp1_b, float* __restrict__ Q, int P)
{
    int i0, n;
    if (!crf_pixel_run(N, P, i0, n)) return;
    const int i1 = i0 + n;
    float mx[CRF_MAX_PIXELS_PER_THREAD];  // padding labels (-1e30) are never the maximum
    for (int i = i0; i < i1; i++)
        crf_update_messages(i, U, S, V_s, off_s, coef_s, dp1_s, V_b, off_b, coef_b, dp1_b, Q);
    for (int i = i0; i < i1; i++) mx[i - i0] = crf_row_max(Q + (long long)i * S, S);
    for (int i = i0; i < i1; i++) crf_exp_row(Q + (long long)i * S, mx[i - i0], C, S);
    for (int i = i0; i < i1; i++) crf_normalise_row(Q + (long long)i * S, C, S);
}

// ------------------------------------------------------------------------------------------------
// Input and output on the device

// The unary of pixels i0 .. i0 + n - 1 (crf_unary): every step runs over the labels with the
// pixels innermost, reading src plane by plane (n neighbouring pixels are neighbours in each
// plane: at 16, one cache line of each plane). The exponentials are summed as they are made and
// never stored: -log softmax is log(sum exp(x - m)) + m - x. Called with n a constant where it
// can be, so that the CPU build keeps the n running maxima and sums in vector registers.
__device__ __forceinline__ void crf_unary_run(const float* __restrict__ src, int N, int C, int S, int is_logits,
                                              float* __restrict__ U, int i0, int n, int* flag)
{
    for (int p = 0; p < n; p++)
        for (int l = C; l < S; l++) U[(long long)(i0 + p) * S + l] = CRF_PAD_ENERGY;
    // The scores' check: x - x is 0 for a finite x and NaN for NaN and +-inf, and a NaN added in
    // stays: no isfinite() needed on either target, and a loop of float additions vectorises.
    float nan_if_bad[CRF_MAX_PIXELS_PER_THREAD];
    float m[CRF_MAX_PIXELS_PER_THREAD], s[CRF_MAX_PIXELS_PER_THREAD];  // logits: each pixel's maximum, sum
    for (int p = 0; p < n; p++) nan_if_bad[p] = 0.f;
    for (int p = 0; p < n; p++) m[p] = -3.402823466e38f;
    // One pass over the planes: the check, and the energies copied or the logits' maxima taken
    // (is_logits is the same for the whole loop: the compiler makes one loop of each).
    for (int l = 0; l < C; l++) {
        const float* x = src + (long long)l * N + i0;
        CRF_PREFETCH(x + CRF_PLANE_AHEAD, 0);
        for (int p = 0; p < n; p++) {
            nan_if_bad[p] += x[p] - x[p];
            if (is_logits)
                m[p] = x[p] > m[p] ? x[p] : m[p];
            else
                U[(long long)(i0 + p) * S + l] = x[p];
        }
    }
    if (is_logits) {
        for (int p = 0; p < n; p++) s[p] = 0.f;
        for (int l = 0; l < C; l++)
            for (int p = 0; p < n; p++) s[p] += expf(src[(long long)l * N + i0 + p] - m[p]);
        for (int p = 0; p < n; p++) s[p] = logf(s[p]) + m[p];  // log-sum-exp
        for (int l = 0; l < C; l++)
            for (int p = 0; p < n; p++) U[(long long)(i0 + p) * S + l] = s[p] - src[(long long)l * N + i0 + p];
    }
    if (flag)
        for (int p = 0; p < n; p++)
            if (!(nan_if_bad[p] == 0.f)) flag[0] = 1;
}

// U[i*S + l] from planar src[l*N + i] for pixels P*t .. P*t + P - 1 (thread t; P as crf_update's):
// -log softmax of logits (is_logits) or a copy of unary energies; padding labels C..S-1 get
// CRF_PAD_ENERGY. flag (NULL: not checked): flag[0] = 1 if any of the scores is NaN or infinite
// (the driver reads it before it uses what this wrote). The same operations per pixel whatever P.
extern "C" __global__ void crf_unary(const float* __restrict__ src, int N, int C, int S, int is_logits,
                                     float* __restrict__ U, int P, int* flag)
{
    int i0, n;
    if (!crf_pixel_run(N, P, i0, n)) return;
    if (n == CRF_MAX_PIXELS_PER_THREAD)
        crf_unary_run(src, N, C, S, is_logits, U, i0, CRF_MAX_PIXELS_PER_THREAD, flag);
    else
        crf_unary_run(src, N, C, S, is_logits, U, i0, n, flag);
}

// Planar (C, H, W) output for pixels P*t .. P*t + P - 1 (thread t; P as crf_update's): the rows
// are read in order, and each plane gets runs of consecutive floats (one thread per element,
// walking the planes, would read Q once per label: C passes over a Q that does not fit in the
// CPU's caches). The CPU's 16 pixels write whole cache lines of each plane at once: planes a power
// of two apart in memory (1024x768) share cache sets, and runs of 8 or fewer floats per pixel
// thread were evicted before their line was complete (crf_marginals 20x slower than at 500x375).
extern "C" __global__ void crf_marginals(const float* Q, int N, int C, int S, float* out, int P)
{
    int i0, n;
    if (!crf_pixel_run(N, P, i0, n)) return;
    for (int l = 0; l < C; l++) {
        CRF_PREFETCH(out + (long long)l * N + i0 + CRF_PLANE_AHEAD, 1);
        for (int p = 0; p < n; p++) out[(long long)l * N + i0 + p] = Q[(long long)(i0 + p) * S + l];
    }
}

extern "C" __global__ void crf_argmax(const float* Q, int N, int C, int S, unsigned char* labels)
{
    const int i = crf_tid();
    if (i >= N) return;
    const float* q = Q + (long long)i * S;
    int best = 0;
    for (int l = 1; l < C; l++)
        if (q[l] > q[best]) best = l;  // first maximum, as numpy.argmax
    labels[i] = (unsigned char)best;
}

// The top-left C x H x W of image b's padded scores (a network's N x C x Hp x Wp output, src
// pointing at image b) into dense planar C x H x W (what crf_unary reads): one thread per element.
extern "C" __global__ void crf_crop_scores(const float* src, int C, int Hp, int Wp, int H, int W, float* dst)
{
    const int k = crf_tid();
    if (k >= C * H * W) return;
    const int c = k / (H * W), r = k - c * (H * W);
    const int y = r / W, x = r - y * W;
    dst[k] = src[((long long)c * Hp + y) * Wp + x];
}

extern "C" __global__ void crf_fill_int(int* x, int n, int value)
{
    const int k = crf_tid();
    if (k < n) x[k] = value;
}

extern "C" __global__ void crf_fill_float(float* x, int n, float value)
{
    const int k = crf_tid();
    if (k < n) x[k] = value;
}
