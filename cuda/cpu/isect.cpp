// CPU driver: tile intersection. Intersections are generated per (camera,
// Gaussian) in tile order, bucketed by tile with a stable counting sort, then
// each tile is sorted by depth (stable, so ties keep generation order): the
// same order as a stable radix sort on (camera | tile | depth) keys.
#include <algorithm>
#include <cstring>
#include <vector>
#include "common.h"

namespace {
inline uint32_t float_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}
thread_local std::vector<int32_t> t_ids;
inline std::vector<int32_t> &ids_scratch(int, int64_t n) {
    if ((int64_t)t_ids.size() < n) t_ids.resize(n);
    return t_ids;
}
inline int bit_width(int64_t n) {  // floor(log2(n)) + 1, 0 for n == 0
    int b = 0;
    while (n > 0) { ++b; n >>= 1; }
    return b;
}
}  // namespace

extern "C" {

LF_API int lf_isect_count(int C, int N, const int32_t *radii, const float *means2d, int tile_size,
                          int tile_width, int tile_height, int64_t *cum_tiles, int64_t *n_isects,
                          void *stream) {
    (void)stream;
    LF_CHECK(C >= 0 && N >= 0, "lf_isect_count: negative C or N");
    LF_CHECK(tile_size > 0 && tile_width > 0 && tile_height > 0, "lf_isect_count: bad tile grid");
    LF_CHECK(n_isects, "lf_isect_count: null n_isects");
    const int64_t total = (int64_t)C * N;
    *n_isects = 0;
    if (total == 0) return 0;
    LF_CHECK(radii && means2d && cum_tiles, "lf_isect_count: null pointer");
    lfcpu::parallel_for(total, 4096, [&](int64_t b, int64_t e, int) {
    for (int64_t idx = b; idx < e; ++idx) {
        int64_t n = 0;
        if (radii[idx * 2] > 0 && radii[idx * 2 + 1] > 0) {
            int x0, x1, y0, y1;
            lf::tile_bounds(lf::v2{means2d[idx * 2], means2d[idx * 2 + 1]}, radii[idx * 2], radii[idx * 2 + 1],
                            tile_size, tile_width, tile_height, x0, x1, y0, y1);
            n = (int64_t)(x1 - x0) * (y1 - y0);
        }
        cum_tiles[idx] = n;
    }
    });
    int64_t acc = 0;
    for (int64_t idx = 0; idx < total; ++idx) {
        acc += cum_tiles[idx];
        cum_tiles[idx] = acc;
    }
    *n_isects = acc;
    return 0;
}

LF_API int lf_isect_fill(int C, int N, const int32_t *radii, const float *means2d, const float *depths,
                         int tile_size, int tile_width, int tile_height, const int64_t *cum_tiles,
                         int64_t n_isects, int64_t *isect_ids, int32_t *flatten_ids, int32_t *tile_offsets,
                         void *stream) {
    (void)stream;
    LF_CHECK(C >= 0 && N >= 0 && n_isects >= 0, "lf_isect_fill: negative size");
    LF_CHECK(tile_size > 0 && tile_width > 0 && tile_height > 0, "lf_isect_fill: bad tile grid");
    const int64_t n_tiles = (int64_t)C * tile_width * tile_height;
    LF_CHECK(tile_offsets || n_tiles == 0, "lf_isect_fill: null tile_offsets");
    if (n_isects == 0) {
        for (int64_t t = 0; t < n_tiles; ++t) tile_offsets[t] = 0;
        return 0;
    }
    LF_CHECK(radii && means2d && depths && cum_tiles && isect_ids && flatten_ids, "lf_isect_fill: null pointer");
    LF_CHECK(n_isects < (int64_t)INT32_MAX, "lf_isect_fill: more than 2^31 intersections");
    return lfcpu::guarded("lf_isect_fill", [&]() -> int {
        const int64_t total = (int64_t)C * N;
        const int64_t tiles_per_cam = (int64_t)tile_width * tile_height;
        std::vector<int32_t> gen_tile(n_isects);
        std::vector<int32_t> gen_id(n_isects);
        lfcpu::parallel_for(total, 2048, [&](int64_t b, int64_t e, int) {
        for (int64_t idx = b; idx < e; ++idx) {
            int64_t start = idx == 0 ? 0 : cum_tiles[idx - 1];
            int64_t end = cum_tiles[idx];
            if (end == start) continue;
            int x0, x1, y0, y1;
            lf::tile_bounds(lf::v2{means2d[idx * 2], means2d[idx * 2 + 1]}, radii[idx * 2], radii[idx * 2 + 1],
                            tile_size, tile_width, tile_height, x0, x1, y0, y1);
            const int64_t c = idx / N;
            int64_t k = start;
            for (int ty = y0; ty < y1; ++ty)
                for (int tx = x0; tx < x1; ++tx, ++k) {
                    gen_tile[k] = (int32_t)(c * tiles_per_cam + (int64_t)ty * tile_width + tx);
                    gen_id[k] = (int32_t)idx;
                }
        }
        });
        // stable counting sort by tile
        std::vector<int64_t> counts(n_tiles + 1, 0);
        for (int64_t i = 0; i < n_isects; ++i) counts[gen_tile[i] + 1]++;
        for (int64_t t = 0; t < n_tiles; ++t) counts[t + 1] += counts[t];
        for (int64_t t = 0; t < n_tiles; ++t) tile_offsets[t] = (int32_t)counts[t];
        {
            std::vector<int64_t> cursor(counts.begin(), counts.end() - 1);
            for (int64_t i = 0; i < n_isects; ++i) flatten_ids[cursor[gen_tile[i]]++] = gen_id[i];
        }
        // sort each tile by depth; ties keep generation order (the key holds
        // the generation rank in its low bits, so the sort need not be stable)
        const int tile_bits = bit_width(tiles_per_cam);
        std::vector<std::vector<uint64_t>> scratch(lfcpu::num_threads());
        lfcpu::parallel_for(n_tiles, 8, [&](int64_t tb, int64_t te, int tid) {
            std::vector<uint64_t> &buf = scratch[tid];
            for (int64_t t = tb; t < te; ++t) {
                const int64_t s = counts[t], e = counts[t + 1];
                if (e - s > 1) {
                    buf.resize(e - s);
                    for (int64_t i = s; i < e; ++i)
                        buf[i - s] = ((uint64_t)float_bits(depths[flatten_ids[i]]) << 32) | (uint64_t)(i - s);
                    std::sort(buf.begin(), buf.end());
                    // permute: flatten_ids[s..e) by the sorted ranks
                    std::vector<int32_t> &ids = ids_scratch(tid, e - s);
                    for (int64_t i = 0; i < e - s; ++i) ids[i] = flatten_ids[s + (int64_t)(buf[i] & 0xffffffffu)];
                    std::memcpy(flatten_ids + s, ids.data(), sizeof(int32_t) * (e - s));
                }
                const int64_t c = t / tiles_per_cam, tile = t % tiles_per_cam;
                for (int64_t i = s; i < e; ++i)
                    isect_ids[i] = (int64_t)(((uint64_t)c << (32 + tile_bits)) | ((uint64_t)tile << 32) |
                                             (uint64_t)float_bits(depths[flatten_ids[i]]));
            }
        });
        return 0;
    });
}

}  // extern "C"
