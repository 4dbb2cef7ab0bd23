// CPU driver: sparse channels (lf_rasterize_sparse_fwd / _bwd, langfield_abi.h).
//
// Each Gaussian carries K (channel, weight) pairs into L output channels: a
// sparse codebook's top-k coefficients. The tile / row / 8-pixel structure and
// the per-pixel alpha, skip and stop rules are those of rasterize.cpp (the same
// lfcpu::alpha_bbox, alpha_row_span and row_eval, so the blended Gaussians and
// their weights alpha*T are bit-identical to a dense render of the scattered
// weights); only the channel update differs: K scattered adds per blended
// (pixel, Gaussian) pair instead of L, made per (Gaussian, tile) for all of its
// 8-pixel chunks at once (walk_tile_g).
//
// Backward (weights only) recomputes the front-to-back recurrence exactly as the
// forward did (no division by 1 - alpha) and sums, per intersection, alpha T
// v_render[pixel, idx_j] (8 pixels per vector, then across the lanes) into a
// private slot of K floats; the slots are reduced per Gaussian in intersection
// order, so the result is deterministic.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <new>
#include <vector>
#include "common.h"

using lfcpu::lf_vf8;
using lfcpu::lf_vi8;

namespace {

struct SpTile {
    int64_t cam, start, end;
    int px0, py0, pw, ph;
};

inline SpTile sp_tile(int64_t t, int tile_size, int tile_width, int tile_height, int width, int height,
                      const int32_t *tile_offsets, int64_t n_tiles, int64_t n_isects) {
    SpTile g;
    const int64_t per_cam = (int64_t)tile_width * tile_height;
    g.cam = t / per_cam;
    const int64_t tile = t % per_cam;
    const int ty = (int)(tile / tile_width), tx = (int)(tile % tile_width);
    g.px0 = tx * tile_size;
    g.py0 = ty * tile_size;
    g.pw = std::min(tile_size, width - g.px0);
    g.ph = std::min(tile_size, height - g.py0);
    g.start = g.end = 0;
    if (tile_offsets && n_isects > 0) {
        g.start = tile_offsets[t];
        g.end = (t + 1 < n_tiles) ? tile_offsets[t + 1] : n_isects;
        if (g.end < g.start) g.end = g.start;
    }
    return g;
}

// One Gaussian clipped to one tile (as rasterize.cpp's tile_gauss).
struct SpGauss {
    const float *m, *con;
    float op, Lg;
    bool pd;
    int lx0, lx1, ly0, ly1;
};

inline bool sp_gauss(const SpTile &tg, int64_t gid, const float *means2d, const float *conics,
                     const float *opacities, SpGauss &g) {
    g.m = means2d + gid * 2;
    g.con = conics + gid * 3;
    g.op = opacities[gid];
    int bx0, bx1, by0, by1;
    if (!lfcpu::alpha_bbox(g.m, g.con, g.op, bx0, bx1, by0, by1, &g.Lg)) return false;
    g.lx0 = std::max(bx0 - tg.px0, 0);
    g.lx1 = std::min(bx1 - tg.px0, tg.pw);
    g.ly0 = std::max(by0 - tg.py0, 0);
    g.ly1 = std::min(by1 - tg.py0, tg.ph);
    if (g.lx0 >= g.lx1 || g.ly0 >= g.ly1) return false;
    g.pd = g.con[0] * g.con[2] - g.con[1] * g.con[1] > 0.f;
    return true;
}

inline bool sp_row_range(const SpTile &tg, const SpGauss &g, int ly, int &rx0, int &rx1) {
    rx0 = g.lx0;
    rx1 = g.lx1;
    if (!g.pd || g.lx1 - g.lx0 <= 8) return true;
    int sx0, sx1;
    if (!lfcpu::alpha_row_span(g.m, g.con, g.Lg, (float)(tg.py0 + ly) + 0.5f, sx0, sx1)) return false;
    rx0 = std::max(g.lx0, sx0 - tg.px0);
    rx1 = std::min(g.lx1, sx1 - tg.px0);
    return rx0 < rx1;
}

// 64-byte-aligned storage: scratch rows of a multiple of 16 floats start on a cache line
template <class T>
struct Al64 {
    using value_type = T;
    Al64() = default;
    template <class U>
    Al64(const Al64<U> &) {}
    T *allocate(size_t n) { return static_cast<T *>(::operator new(n * sizeof(T), std::align_val_t(64))); }
    void deallocate(T *p, size_t) { ::operator delete(p, std::align_val_t(64)); }
    template <class U>
    bool operator==(const Al64<U> &) const { return true; }
    template <class U>
    bool operator!=(const Al64<U> &) const { return false; }
};

struct SpScratch {
    std::vector<float, Al64<float>> T, buf;  // transmittance; channel-major [L][P+8] (acc or v_render)
    std::vector<int32_t, Al64<int32_t>> last;
    void init(int P, int L) {
        T.resize(P + 8); buf.resize((size_t)(P + 8) * L); last.resize(P + 8);
    }
};

// The blend step of the 8 pixels [p0 + j, p0 + j + 8) of one row for the Gaussian
// of intersection `cur` (rasterize.cpp's forward, with the same arithmetic): updates T and
// (with Last) last, returns the per-lane blend weights alpha*T (0 where the pixel does not
// blend) and the number of pixels that finished. A finished pixel keeps its T with the sign
// bit set (T > 0 always: it starts at 1 and only steps that leave it above T_MIN are taken),
// which saves rasterize.cpp's separate `done` flags (a load and a store per chunk); without
// Last the last-blended ids are not tracked (another load and store).
template <bool Last>
inline lf_vf8 blend8(SpScratch &sc, int p0, int j, int n, const float *sig, const float *vis, float op,
                     int32_t cur, int &nd, int lo = 0) {
    const lf_vi8 lane_i = {0, 1, 2, 3, 4, 5, 6, 7};
    lf_vf8 sv, vv, Tv;
    __builtin_memcpy(&sv, sig + j, 32);
    __builtin_memcpy(&vv, vis + j, 32);
    __builtin_memcpy(&Tv, sc.T.data() + p0 + j, 32);
    const lf_vf8 opv = lf_vf8{} + op;
    lf_vf8 alpha = opv * vv;
    alpha = alpha < lf::ALPHA_MAX ? alpha : lf_vf8{} + lf::ALPHA_MAX;
    const lf_vi8 inrow = ((lane_i + j) < n) & ((lane_i + j) >= lo);
    const lf_vi8 valid = inrow & (Tv > 0.f) & (sv >= 0.f) & (alpha >= lf::ALPHA_THRESHOLD);
    const lf_vf8 nT = Tv * (1.f - alpha);
    const lf_vi8 fin = valid & (nT <= lf::T_MIN);
    const lf_vi8 contrib = valid & ~fin;
    const lf_vf8 w = (lf_vf8)((lf_vi8)(alpha * Tv) & contrib);
    Tv = (lf_vf8)((((lf_vi8)nT & contrib) | ((lf_vi8)Tv & ~contrib)) | (fin & (int32_t)0x80000000));
    __builtin_memcpy(sc.T.data() + p0 + j, &Tv, 32);
    if (Last) {
        lf_vi8 lv;
        __builtin_memcpy(&lv, sc.last.data() + p0 + j, 32);
        lv = (contrib & cur) | (lv & ~contrib);
        __builtin_memcpy(sc.last.data() + p0 + j, &lv, 32);
    }
    nd += lfcpu::count_lanes(fin);
    return w;
}

// The tile's front-to-back recurrence, one call per (Gaussian, tile): visitg(i, gid, w, p, nc) gets, for
// intersection i, the
// blend weights alpha*T of the nc 8-pixel chunks the Gaussian touched (w[c] for the
// tile-local pixels [p[c], p[c] + 8) of one row; 0 in lanes that do not blend, including
// lanes past the row: adding w * x there adds exactly 0, so channel-major accumulators
// can take all 8 lanes). A Gaussian covers each pixel at most once, so a visitor that
// loops channel-outer, chunk-inner adds to every (channel, pixel) in the same order as
// a per-chunk visitor would: the sums are bit-identical, and the per-Gaussian work
// (its channel list, weights and checks) is done once per tile instead of per chunk.
// prefetch(gid) fetches the visitor's data of the Gaussian lfcpu::PREFETCH_AHEAD intersections ahead.
template <bool Last, typename VisitG, typename Prefetch>
void walk_tile_g(SpScratch &sc, const SpTile &tg, int tile_size, const float *means2d, const float *conics,
                 const float *opacities, const int32_t *flatten_ids, VisitG &&visitg, Prefetch &&prefetch) {
    const int n_pix = tg.pw * tg.ph;
    std::fill(sc.T.begin(), sc.T.end(), 1.f);
    if (Last) std::fill(sc.last.begin(), sc.last.end(), -1);
    int row_done[32] = {0};
    float sig[32], vis[32];  // a row's span from its aligned start: <= tile_size <= 32 pixels
    lf_vf8 wbuf[32 * 4];      // <= 32 rows x 4 chunks
    int pbuf[32 * 4];
    // with tiles of a multiple of 8 pixels, a row's chunks start at multiples of 8 (the lanes
    // before the Gaussian's span do not blend): with 64-byte-aligned scratch rows no 8-float
    // access crosses a cache line (a split load or store costs about twice, and a split store
    // does not forward to the next Gaussian's load of the same pixels)
    const bool aligned = tile_size % 8 == 0;
    int n_done = 0;
    for (int64_t i = tg.start; i < tg.end && n_done < n_pix; ++i) {
        const int64_t gid = flatten_ids[i];
        if (i + lfcpu::PREFETCH_AHEAD < tg.end) {
            const int64_t pg = flatten_ids[i + lfcpu::PREFETCH_AHEAD];
            lfcpu::prefetch_gauss(pg, means2d, conics, opacities);
            prefetch(pg);
        }
        SpGauss g;
        if (!sp_gauss(tg, gid, means2d, conics, opacities, g)) continue;
        int nc = 0;
        for (int ly = g.ly0; ly < g.ly1; ++ly) {
            if (row_done[ly] == tg.pw) continue;
            const float dy = g.m[1] - ((float)(tg.py0 + ly) + 0.5f);
            int rx0, rx1;
            if (!sp_row_range(tg, g, ly, rx0, rx1)) continue;
            const int ax0 = aligned ? (rx0 & ~7) : rx0, lo = rx0 - ax0;
            const int n = rx1 - ax0;
            lfcpu::row_eval(n, g.m[0], dy, (float)(tg.px0 + ax0), g.con, sig, vis);
            const int p0 = ly * tile_size + ax0;
            int nd = 0;
            for (int j = 0; j < n; j += 8) {
                const lf_vf8 w = blend8<Last>(sc, p0, j, n, sig, vis, g.op, (int32_t)i, nd, j < 8 ? lo : 0);
                if (lfcpu::any_lane((lf_vi8)w != 0)) {
                    wbuf[nc] = w;
                    pbuf[nc++] = p0 + j;
                }
            }
            row_done[ly] += nd;
            n_done += nd;
        }
        if (nc) visitg(i, gid, wbuf, pbuf, nc);
    }
    for (float &x : sc.T) x = std::fabs(x);  // the finished pixels' sign bits (blend8)
}

inline lf_vf8 ld8(const float *p) {
    lf_vf8 v;
    __builtin_memcpy(&v, p, 32);
    return v;
}
inline void st8(float *p, lf_vf8 v) { __builtin_memcpy(p, &v, 32); }
// a[p[c] .. + 8) += w[c] * v for the nc chunks. Lanes that do not blend have w = 0 and
// add exactly 0, unless v is not finite (0 * inf = NaN): then only the blended lanes add,
// as a per-pixel loop would.
inline void add_chunks(float *a, const lf_vf8 *w, const int *pp, int nc, float v) {
    if (std::isfinite(v)) {
        for (int c = 0; c < nc; ++c) st8(a + pp[c], ld8(a + pp[c]) + w[c] * v);
        return;
    }
    for (int c = 0; c < nc; ++c)
        st8(a + pp[c], ld8(a + pp[c]) + (lf_vf8)((lf_vi8)(w[c] * v) & ((lf_vi8)w[c] != 0)));
}

// acc[off[q] + p[c] .. + 8) += w[c] * val[q] for the nq updates and nc chunks, chunk by chunk
// (each chunk's weights and position loaded once for all of its updates; with NQ known, the
// values stay in registers): per (channel, pixel) the same single add as add_chunks.
template <int NQ>
inline void add_updates_n(float *acc, const int *off, const float *val, const lf_vf8 *w, const int *pp, int nc) {
    lf_vf8 v[NQ];
#pragma GCC unroll 16
    for (int q = 0; q < NQ; ++q) v[q] = lf_vf8{} + val[q];
    for (int c = 0; c < nc; ++c) {
        float *b = acc + pp[c];
        const lf_vf8 wc = w[c];
#pragma GCC unroll 16
        for (int q = 0; q < NQ; ++q) {
            float *a = b + off[q];
            st8(a, ld8(a) + wc * v[q]);
        }
    }
}
inline void add_updates(float *acc, const int *off, const float *val, int nq, bool finite, const lf_vf8 *w,
                        const int *pp, int nc) {
    switch (finite ? nq : 0) {  // non-finite values (they add only in the blended lanes) or more than
                                // 16 updates: value by value with add_chunks (default)
#define LF_ADD_CASE(n) case n: add_updates_n<n>(acc, off, val, w, pp, nc); return;
        LF_ADD_CASE(1) LF_ADD_CASE(2) LF_ADD_CASE(3) LF_ADD_CASE(4) LF_ADD_CASE(5) LF_ADD_CASE(6)
        LF_ADD_CASE(7) LF_ADD_CASE(8) LF_ADD_CASE(9) LF_ADD_CASE(10) LF_ADD_CASE(11) LF_ADD_CASE(12)
        LF_ADD_CASE(13) LF_ADD_CASE(14) LF_ADD_CASE(15) LF_ADD_CASE(16)
#undef LF_ADD_CASE
        default:
            for (int q = 0; q < nq; ++q) add_chunks(acc + off[q], w, pp, nc, val[q]);
    }
}

inline lf_vf8 vsqrt(lf_vf8 x) {  // correctly rounded, as sqrtf per lane
#if defined(__AVX__)
    return (lf_vf8)__builtin_ia32_sqrtps256((__v8sf)x);
#else
    for (int q = 0; q < 8; ++q) x[q] = sqrtf(x[q]);
    return x;
#endif
}

}  // namespace

extern "C" {

LF_API int lf_rasterize_sparse_fwd(int C, int N, int K, int L, int width, int height, int tile_size, int tile_width,
                                   int tile_height, const float *means2d, const float *conics, const int32_t *sp_idx,
                                   const float *sp_w, const float *opacities, const int32_t *tile_offsets,
                                   const int32_t *flatten_ids, int64_t n_isects, float *render, float *render_alphas,
                                   int32_t *last_ids, void *stream) {
    (void)stream;
    LF_CHECK(C >= 0 && N >= 0 && K >= 1 && L >= 1, "lf_rasterize_sparse_fwd: bad C, N, K or L");
    LF_CHECK(width > 0 && height > 0 && tile_size > 0 && tile_size <= 32,
             "lf_rasterize_sparse_fwd: bad image or tile size");
    LF_CHECK(tile_width == (width + tile_size - 1) / tile_size &&
                 tile_height == (height + tile_size - 1) / tile_size,
             "lf_rasterize_sparse_fwd: tile grid does not match the image");
    LF_CHECK(render && render_alphas && last_ids, "lf_rasterize_sparse_fwd: null output");
    LF_CHECK(n_isects == 0 || (means2d && conics && sp_idx && sp_w && opacities && flatten_ids && tile_offsets),
             "lf_rasterize_sparse_fwd: null input");
    const int64_t n_tiles = (int64_t)C * tile_width * tile_height;
    return lfcpu::guarded("lf_rasterize_sparse_fwd", [&]() -> int {
        const int P = tile_size * tile_size, PP = P + 16;  // 64-byte rows (walk_tile_g)
        std::vector<SpScratch> scratch(lfcpu::num_threads());
        lfcpu::parallel_for(n_tiles, 1, [&](int64_t tb, int64_t te, int tid) {
            SpScratch &sc = scratch[tid];
            sc.init(P + 8, L);
            for (int64_t t = tb; t < te; ++t) {
                const SpTile tg = sp_tile(t, tile_size, tile_width, tile_height, width, height, tile_offsets,
                                          n_tiles, n_isects);
                std::fill(sc.buf.begin(), sc.buf.end(), 0.f);
                float *acc = sc.buf.data();
                walk_tile_g<true>(sc, tg, tile_size, means2d, conics, opacities, flatten_ids,
                            [&](int64_t, int64_t gid, const lf_vf8 *w, const int *pp, int nc) {
                                const int32_t *ix = sp_idx + gid * K;
                                const float *wt = sp_w + gid * K;
                                for (int q = 0; q < K; ++q) {
                                    const int32_t d = ix[q];
                                    if (d < 0 || d >= L) continue;
                                    const float v = wt[q];
                                    float *a = acc + (size_t)d * PP;
                                    add_chunks(a, w, pp, nc, v);
                                }
                            },
                            [&](int64_t pg) { lfcpu::prefetch_span(sp_idx + pg * K, K); lfcpu::prefetch_span(sp_w + pg * K, K); });
                for (int ly = 0; ly < tg.ph; ++ly)
                    for (int lx = 0; lx < tg.pw; ++lx) {
                        const int p = ly * tile_size + lx;
                        const int64_t pix = (tg.cam * height + tg.py0 + ly) * (int64_t)width + tg.px0 + lx;
                        float *out = render + pix * L;
                        for (int k = 0; k < L; ++k) out[k] = acc[(size_t)k * PP + p];
                        render_alphas[pix] = 1.f - sc.T[p];
                        last_ids[pix] = sc.last[p];
                    }
            }
        });
        return 0;
    });
}

LF_API int lf_rasterize_sparse_bwd(int C, int N, int K, int L, int width, int height, int tile_size, int tile_width,
                                   int tile_height, const float *means2d, const float *conics, const int32_t *sp_idx,
                                   const float *opacities, const int32_t *tile_offsets, const int32_t *flatten_ids,
                                   int64_t n_isects, const int32_t *last_ids, const float *v_render, float *v_sp_w,
                                   void *stream) {
    (void)stream;
    (void)last_ids;  // the recurrence is recomputed front to back, exactly as in forward
    LF_CHECK(C >= 0 && N >= 0 && K >= 1 && L >= 1, "lf_rasterize_sparse_bwd: bad C, N, K or L");
    LF_CHECK(width > 0 && height > 0 && tile_size > 0 && tile_size <= 32,
             "lf_rasterize_sparse_bwd: bad image or tile size");
    LF_CHECK(tile_width == (width + tile_size - 1) / tile_size &&
                 tile_height == (height + tile_size - 1) / tile_size,
             "lf_rasterize_sparse_bwd: tile grid does not match the image");
    LF_CHECK(v_render && v_sp_w, "lf_rasterize_sparse_bwd: null gradient");
    LF_CHECK(n_isects == 0 || (means2d && conics && sp_idx && opacities && flatten_ids && tile_offsets),
             "lf_rasterize_sparse_bwd: null input");
    const int64_t n_tiles = (int64_t)C * tile_width * tile_height;
    return lfcpu::guarded("lf_rasterize_sparse_bwd", [&]() -> int {
        std::vector<float> slots((size_t)n_isects * K, 0.f);
        const int P = tile_size * tile_size, PP = P + 16;  // 64-byte rows (walk_tile_g)
        std::vector<SpScratch> scratch(lfcpu::num_threads());
        lfcpu::parallel_for(n_tiles, 1, [&](int64_t tb, int64_t te, int tid) {
            SpScratch &sc = scratch[tid];
            sc.init(P + 8, L);
            std::fill(sc.buf.begin(), sc.buf.end(), 0.f);  // lanes past the tile's pixels read 0
            for (int64_t t = tb; t < te; ++t) {
                const SpTile tg = sp_tile(t, tile_size, tile_width, tile_height, width, height, tile_offsets,
                                          n_tiles, n_isects);
                if (tg.end <= tg.start) continue;
                float *vr = sc.buf.data();  // v_render of the tile, channel-major
                for (int ly = 0; ly < tg.ph; ++ly)
                    for (int lx = 0; lx < tg.pw; ++lx) {
                        const int p = ly * tile_size + lx;
                        const int64_t pix = (tg.cam * height + tg.py0 + ly) * (int64_t)width + tg.px0 + lx;
                        const float *src = v_render + pix * L;
                        for (int k = 0; k < L; ++k) vr[(size_t)k * PP + p] = src[k];
                    }
                // per intersection and pair: the sum over its blended pixels of alpha T v_render,
                // 8 pixels at a time (lanes that do not blend have weight 0)
                walk_tile_g<false>(sc, tg, tile_size, means2d, conics, opacities, flatten_ids,
                            [&](int64_t i, int64_t gid, const lf_vf8 *w, const int *pp, int nc) {
                                const int32_t *ix = sp_idx + gid * K;
                                float *slot = slots.data() + (size_t)i * K;
                                for (int q = 0; q < K; ++q) {
                                    const int32_t d = ix[q];
                                    if (d < 0 || d >= L) continue;
                                    const float *v = vr + (size_t)d * PP;
                                    lf_vf8 s8 = {};
                                    for (int c = 0; c < nc; ++c)  // only blended lanes: a 0 * NaN elsewhere stays out
                                        s8 += (lf_vf8)((lf_vi8)(w[c] * ld8(v + pp[c])) & ((lf_vi8)w[c] != 0));
                                    slot[q] += lfcpu::hsum(s8);
                                }
                            },
                            [&](int64_t pg) { lfcpu::prefetch_span(sp_idx + pg * K, K); });
            }
        });
        // deterministic reduction: Gaussian-id ranges per thread, intersections in order
        const int64_t total = (int64_t)C * N;
        const int n_parts = std::max(1, lfcpu::max_threads());
        lfcpu::parallel_for(n_parts, 1, [&](int64_t pb, int64_t pe, int) {
            for (int64_t part = pb; part < pe; ++part) {
                const int64_t lo = total * part / n_parts, hi = total * (part + 1) / n_parts;
                for (int64_t i = 0; i < n_isects; ++i) {
                    const int64_t gid = flatten_ids[i];
                    if (gid < lo || gid >= hi) continue;
                    const float *s = slots.data() + (size_t)i * K;
                    float *dst = v_sp_w + gid * K;
                    for (int q = 0; q < K; ++q) dst[q] += s[q];
                }
            }
        });
        return 0;
    });
}


LF_API int lf_rasterize_sparse_relevancy_fwd(
    int C, int N, int K, int n_levels, int L, int M, int Q, int D, int width, int height, int tile_size,
    int tile_width, int tile_height, const float *means2d, const float *conics, const int32_t *sp_idx,
    const float *sp_w, const float *opacities, const float *colors, const float *backgrounds,
    const int32_t *tile_offsets, const int32_t *flatten_ids, int64_t n_isects, const float *A, const float *G,
    float temperature, float min_alpha, float *render, float *relevancy, float *render_alphas, int32_t *last_ids,
    void *stream) {
    (void)stream;
    LF_CHECK(C >= 0 && N >= 0 && K >= 1 && n_levels >= 1 && L >= 1 && D >= 0,
             "lf_rasterize_sparse_relevancy_fwd: bad C, N, K, n_levels, L or D");
    LF_CHECK(Q >= 1 && M > Q, "lf_rasterize_sparse_relevancy_fwd: need Q >= 1 queries and M - Q >= 1 canonical columns");
    LF_CHECK(L <= 4096 && (int64_t)n_levels * L <= (1 << 20), "lf_rasterize_sparse_relevancy_fwd: L too large");
    LF_CHECK(width > 0 && height > 0 && tile_size > 0 && tile_size <= 32,
             "lf_rasterize_sparse_relevancy_fwd: bad image or tile size");
    LF_CHECK(tile_width == (width + tile_size - 1) / tile_size &&
                 tile_height == (height + tile_size - 1) / tile_size,
             "lf_rasterize_sparse_relevancy_fwd: tile grid does not match the image");
    LF_CHECK(relevancy && render_alphas && A && G && (D == 0 || render),
             "lf_rasterize_sparse_relevancy_fwd: null output, A or G");  // last_ids: optional
    LF_CHECK(n_isects == 0 || (means2d && conics && sp_idx && sp_w && opacities && flatten_ids && tile_offsets &&
                               (D == 0 || colors)),
             "lf_rasterize_sparse_relevancy_fwd: null input");
    const int64_t n_tiles = (int64_t)C * tile_width * tile_height;
    const int NL = n_levels * L;
    return lfcpu::guarded("lf_rasterize_sparse_relevancy_fwd", [&]() -> int {
        const int P = tile_size * tile_size, PP = P + 16;  // 16-pixel blocks in the epilogue
        std::vector<SpScratch> scratch(lfcpu::num_threads());
        lfcpu::parallel_for(n_tiles, 1, [&](int64_t tb, int64_t te, int tid) {
            SpScratch &sc = scratch[tid];
            sc.init(P + 8, NL + D);  // + 8: 16-pixel blocks read up to P + 15
            std::fill(sc.buf.begin(), sc.buf.end(), 0.f);
            // used[d]: bit b set where a Gaussian added to coefficient d in the 16-pixel block b
            // of the tile (P <= 1024: at most 64 blocks)
            std::vector<uint64_t> used(NL, 0);
            std::vector<int> act(L), bi(L + 8), offs(K + D);
            std::vector<float> vals(K + D);
            const int Lp = (L + 7) & ~7;
            std::vector<lf_vf8> zc(2 * (size_t)Lp), dots(2 * (size_t)M);
            float *acc = sc.buf.data();            // [NL][PP] coefficients
            float *dacc = acc + (size_t)NL * PP;   // [D][PP] dense channels
            for (int64_t t = tb; t < te; ++t) {
                const SpTile tg = sp_tile(t, tile_size, tile_width, tile_height, width, height, tile_offsets,
                                          n_tiles, n_isects);
                const auto visit =
                            [&](int64_t, int64_t gid, const lf_vf8 *w, const int *pp, int nc) {
                                uint64_t blocks = 0;  // the 16-pixel blocks the chunks touch
                                for (int c = 0; c < nc; ++c) blocks |= (1ull << (pp[c] >> 4)) | (1ull << ((pp[c] + 7) >> 4));
                                const int32_t *ix = sp_idx + gid * K;
                                const float *wt = sp_w + gid * K;
                                int nq = 0;  // the channel updates: offsets into the accumulators, values
                                bool finite = true;
                                for (int q = 0; q < K; ++q) {
                                    const int32_t d = ix[q];
                                    const float v = wt[q];
                                    if (d < 0 || d >= NL || v == 0.f) continue;
                                    offs[nq] = d * PP;
                                    vals[nq++] = v;
                                    finite &= std::isfinite(v);
                                    used[d] |= blocks;
                                }
                                if (D) {
                                    const float *col = colors + gid * (int64_t)D;
                                    for (int k = 0; k < D; ++k) {
                                        offs[nq] = (NL + k) * PP;
                                        vals[nq++] = col[k];
                                        finite &= std::isfinite(col[k]);
                                    }
                                }
                                add_updates(acc, offs.data(), vals.data(), nq, finite, w, pp, nc);
                            };
                const auto fetch = [&](int64_t pg) {
                    lfcpu::prefetch_span(sp_idx + pg * K, K);
                    lfcpu::prefetch_span(sp_w + pg * K, K);
                    if (D) lfcpu::prefetch_span(colors + pg * D, D);
                };
                if (last_ids)
                    walk_tile_g<true>(sc, tg, tile_size, means2d, conics, opacities, flatten_ids, visit, fetch);
                else  // (no last-blended ids wanted: one load and store less per 8 pixels)
                    walk_tile_g<false>(sc, tg, tile_size, means2d, conics, opacities, flatten_ids, visit, fetch);
                // dense channels, alpha, last ids
                const float *bg = backgrounds ? backgrounds + tg.cam * D : nullptr;
                for (int ly = 0; ly < tg.ph; ++ly)
                    for (int lx = 0; lx < tg.pw; ++lx) {
                        const int p = ly * tile_size + lx;
                        const int64_t pix = (tg.cam * height + tg.py0 + ly) * (int64_t)width + tg.px0 + lx;
                        if (D) {
                            float *out = render + pix * D;
                            for (int k = 0; k < D; ++k)
                                out[k] = dacc[(size_t)k * PP + p] + (bg ? sc.T[p] * bg[k] : 0.f);
                        }
                        render_alphas[pix] = 1.f - sc.T[p];
                        if (last_ids) last_ids[pix] = sc.last[p];
                    }
                if (D) std::fill(dacc, dacc + (size_t)D * PP, 0.f);
                // per level: cosines z (C e) / sqrt(z G z) over the channels used, then LERF relevancy
                // against the canonical columns. Each 16-pixel block takes only the channels used in it
                // (cidx, in tile order; padded to a multiple of 8 with zero coefficients), reading G and
                // A in place: z G z = 2 sum_a z_a (G_aa z_a / 2 + sum_{b>a} G_ab z_b) (half the
                // multiply-adds; the diagonal starts each row's accumulator), 8 rows of G at a time
                // (register blocking: 16 accumulators, each z and G entry loaded once per use).
                for (int l = 0; l < n_levels; ++l) {
                    int s = 0;
                    for (int a = 0; a < L; ++a)
                        if (used[l * L + a]) act[s++] = a;
                    float *zl = acc + (size_t)l * L * PP;
                    const float *Gl = G, *Al = A;  // one codebook for every level
                    const uint64_t *ul = used.data() + (size_t)l * L;
                    for (int p0 = 0; p0 < P; p0 += 16) {
                        const int blk = p0 >> 4;
                        int sb = 0;  // the channels used in this block, in tile order
                        for (int a = 0; a < s; ++a) {  // branch-free: the bits are as good as random
                            bi[sb] = act[a];
                            sb += (int)((ul[act[a]] >> blk) & 1);
                        }
                        bool any_ok = false;  // a block of pixels that are all empty space scores 0
                        for (int q = 0; q < 16 && !any_ok; ++q) any_ok = 1.f - sc.T[p0 + q] > min_alpha;
                        if (!any_ok) {
                            for (int a = 0; a < sb; ++a) {  // the accumulators start the next tile at 0
                                float *src = zl + (size_t)bi[a] * PP + p0;
                                st8(src, lf_vf8{});
                                st8(src + 8, lf_vf8{});
                            }
                            for (int q = 0; q < 16 && p0 + q < P; ++q) {
                                const int ly = (p0 + q) / tile_size, lx = (p0 + q) % tile_size;
                                if (ly >= tg.ph || lx >= tg.pw) continue;
                                const int64_t pix = (int64_t)(tg.py0 + ly) * width + tg.px0 + lx;
                                for (int qq = 0; qq < Q; ++qq)
                                    relevancy[(((int64_t)tg.cam * Q + qq) * n_levels + l) * ((int64_t)height * width) +
                                              pix] = 0.f;
                            }
                            continue;
                        }
                        const int sbp = (sb + 7) & ~7;  // padded to a multiple of 8 with zero coefficients
                        // z of the 16 pixels [p0, p0 + 16), compacted: zc[a][0..1]
                        for (int a = 0; a < sb; ++a) {  // read, and leave 0 for the next tile
                            float *src = zl + (size_t)bi[a] * PP + p0;
                            zc[2 * a] = ld8(src);
                            zc[2 * a + 1] = ld8(src + 8);  // PP = P + 16 keeps this in bounds
                            st8(src, lf_vf8{});
                            st8(src + 8, lf_vf8{});
                        }
                        for (int a = sb; a < sbp; ++a) {  // z = 0: any channel's G and A do
                            zc[2 * a] = zc[2 * a + 1] = lf_vf8{};
                            bi[a] = sb ? bi[0] : 0;
                        }
                        lf_vf8 o0 = {}, o1 = {};  // z (G/2 on the diagonal, G above it) z
                        for (int a0 = 0; a0 < sbp; a0 += 8) {
                            const float *g[8];
                            lf_vf8 za[8], zb[8], y0[8], y1[8];
#pragma GCC unroll 8
                            for (int k = 0; k < 8; ++k) {
                                g[k] = Gl + (size_t)bi[a0 + k] * L;
                                za[k] = zc[2 * (a0 + k)];
                                zb[k] = zc[2 * (a0 + k) + 1];
                                const float hk = 0.5f * g[k][bi[a0 + k]];  // the diagonal's half
                                y0[k] = hk * za[k];
                                y1[k] = hk * zb[k];
                            }
                            // within the 8 rows: the upper triangle
#pragma GCC unroll 8
                            for (int j = 1; j < 8; ++j) {
                                const int cj = bi[a0 + j];
#pragma GCC unroll 8
                                for (int k = 0; k < j; ++k) {
                                    y0[k] += g[k][cj] * za[j];
                                    y1[k] += g[k][cj] * zb[j];
                                }
                            }
                            for (int b = a0 + 8; b < sbp; ++b) {
                                const int cb = bi[b];
                                const lf_vf8 z0 = zc[2 * b], z1 = zc[2 * b + 1];
#pragma GCC unroll 8
                                for (int k = 0; k < 8; ++k) {
                                    y0[k] += g[k][cb] * z0;
                                    y1[k] += g[k][cb] * z1;
                                }
                            }
#pragma GCC unroll 8
                            for (int k = 0; k < 8; ++k) {
                                o0 += za[k] * y0[k];
                                o1 += zb[k] * y1[k];
                            }
                        }
                        const lf_vf8 n0 = 2.f * o0, n1 = 2.f * o1;
                        // d_m = sum_a A_am z_a in registers, the same order of sums per m: every column in
                        // one pass over z (M <= 8), else 4 columns at a time
                        if (M <= 8) {
                            lf_vf8 r[16] = {};
                            for (int a = 0; a < sb; ++a) {
                                const lf_vf8 z0 = zc[2 * a], z1 = zc[2 * a + 1];
                                const float *Aa = Al + (size_t)bi[a] * M;
#pragma GCC unroll 8
                                for (int k = 0; k < 8; ++k) {
                                    if (k < M) {
                                        r[2 * k] += Aa[k] * z0;
                                        r[2 * k + 1] += Aa[k] * z1;
                                    }
                                }
                            }
#pragma GCC unroll 16
                            for (int k = 0; k < 16; ++k)
                                if (k < 2 * M) dots[k] = r[k];
                        } else
                        for (int m0 = 0; m0 < M; m0 += 4) {
                            lf_vf8 r[8] = {};
                            if (m0 + 4 <= M) {
                                for (int a = 0; a < sb; ++a) {
                                    const lf_vf8 z0 = zc[2 * a], z1 = zc[2 * a + 1];
                                    const float *Aa = Al + (size_t)bi[a] * M + m0;
#pragma GCC unroll 4
                                    for (int k = 0; k < 4; ++k) {
                                        r[2 * k] += Aa[k] * z0;
                                        r[2 * k + 1] += Aa[k] * z1;
                                    }
                                }
                            } else {
                                for (int k = 0; k < M - m0; ++k) {  // one column at a time, in registers
                                    lf_vf8 r0 = {}, r1 = {};
                                    for (int a = 0; a < sb; ++a) {
                                        const float Aak = Al[(size_t)bi[a] * M + m0 + k];
                                        r0 += Aak * zc[2 * a];
                                        r1 += Aak * zc[2 * a + 1];
                                    }
                                    r[2 * k] = r0;
                                    r[2 * k + 1] = r1;
                                }
                            }
                            for (int k = 0; k < 8 && m0 + k / 2 < M; ++k) dots[2 * m0 + k] = r[k];
                        }
                        // LERF relevancy of the 16 pixels, 8 lanes at a time: sigmoid(T (cos_q - max cos_canon))
                        // with exp(-|x|) from the rasterizer's vexp_neg (the CUDA driver's 1 / (1 + expf(-x))
                        // to a few ulps); rows of 8 whole pixels go out with one store, others lane by lane
                        for (int hv = 0; hv < 2; ++hv) {
                            const int pb = p0 + 8 * hv;
                            if (pb >= P) break;
                            const lf_vf8 nq = hv ? n1 : n0;
                            lf_vf8 nz, Tv;
                            nz = vsqrt(nq > 0.f ? nq : lf_vf8{});  // fmaxf(sqrtf(fmaxf(nq, 0)), 1e-12) by lanes
                            nz = nz > 1e-12f ? nz : lf_vf8{} + 1e-12f;
                            __builtin_memcpy(&Tv, sc.T.data() + pb, 32);
                            const lf_vi8 ok = (1.f - Tv) > min_alpha;
                            // max_m (d_m / nz) = (max_m d_m) / nz exactly (nz > 0, rounding is monotone)
                            lf_vf8 dmax = lf_vf8{} - INFINITY;
                            for (int m = Q; m < M; ++m) dmax = dots[2 * m + hv] > dmax ? dots[2 * m + hv] : dmax;
                            const lf_vf8 worst = dmax / nz;
                            const int ly = pb / tile_size, lx = pb % tile_size;
                            const bool whole = tile_size % 8 == 0 && ly < tg.ph && lx + 8 <= tg.pw;
                            for (int qq = 0; qq < Q; ++qq) {
                                const lf_vf8 x = temperature * (dots[2 * qq + hv] / nz - worst);
                                const lf_vi8 pos = x >= 0.f;
                                const lf_vf8 e = lfcpu::vexp_neg(lfcpu::select(pos, lf_vf8{} - x, x));
                                lf_vf8 r = lfcpu::select(pos, 1.f / (1.f + e), e / (1.f + e));
                                r = (lf_vf8)((lf_vi8)r & ok);
                                float *rel = relevancy + (((int64_t)tg.cam * Q + qq) * n_levels + l) * ((int64_t)height * width);
                                if (whole) {
                                    __builtin_memcpy(rel + (int64_t)(tg.py0 + ly) * width + tg.px0 + lx, &r, 32);
                                    continue;
                                }
                                for (int lane = 0; lane < 8 && pb + lane < P; ++lane) {
                                    const int p = pb + lane, py = p / tile_size, px = p % tile_size;
                                    if (py >= tg.ph || px >= tg.pw) continue;
                                    rel[(int64_t)(tg.py0 + py) * width + tg.px0 + px] = r[lane];
                                }
                            }
                        }
                    }
                    for (int a = 0; a < s; ++a) used[l * L + act[a]] = 0;
                }
            }
        });
        return 0;
    });
}

}  // extern "C"
