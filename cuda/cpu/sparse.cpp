// CPU driver: sparse channels (lf_rasterize_sparse_fwd / _bwd, langfield_abi.h).
//
// Each Gaussian carries K (channel, weight) pairs into L output channels: a
// sparse codebook's top-k coefficients. The tile / row / 8-pixel structure and
// the per-pixel alpha, skip and stop rules are those of rasterize.cpp (the same
// lfcpu::alpha_bbox, alpha_row_span and row_eval, so the blended Gaussians and
// their weights alpha*T are bit-identical to a dense render of the scattered
// weights); only the channel update differs: K scattered adds per blended
// (pixel, Gaussian) pair instead of L.
//
// Backward (weights only) recomputes the front-to-back recurrence exactly as the
// forward did (no division by 1 - alpha) and sums, per intersection, alpha T
// v_render[pixel, idx_j] into a private slot of K floats; the slots are reduced
// per Gaussian in intersection order, so the result is deterministic.
#include <algorithm>
#include <cstring>
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
    if (!lfcpu::alpha_bbox(g.m, g.con, g.op, bx0, bx1, by0, by1)) return false;
    g.lx0 = std::max(bx0 - tg.px0, 0);
    g.lx1 = std::min(bx1 - tg.px0, tg.pw);
    g.ly0 = std::max(by0 - tg.py0, 0);
    g.ly1 = std::min(by1 - tg.py0, tg.ph);
    if (g.lx0 >= g.lx1 || g.ly0 >= g.ly1) return false;
    g.Lg = logf(g.op * 255.f);
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

struct SpScratch {
    std::vector<float> T, buf;  // transmittance; channel-major [L][P+8] (acc or v_render)
    std::vector<int32_t> last, done;
    void init(int P, int L) {
        T.resize(P + 8); buf.resize((size_t)(P + 8) * L); last.resize(P + 8); done.resize(P + 8);
    }
};

// The blend step of the 8 pixels [p0 + j, p0 + j + 8) of one row for the Gaussian
// of intersection `cur` (rasterize.cpp's forward, verbatim): updates T, done and
// last, returns the per-lane blend weights alpha*T (0 where the pixel does not
// blend) and the number of pixels that finished.
inline lf_vf8 blend8(SpScratch &sc, int p0, int j, int n, const float *sig, const float *vis, float op,
                     int32_t cur, int &nd) {
    const lf_vi8 lane_i = {0, 1, 2, 3, 4, 5, 6, 7};
    lf_vf8 sv, vv, Tv;
    lf_vi8 dn, lv;
    __builtin_memcpy(&sv, sig + j, 32);
    __builtin_memcpy(&vv, vis + j, 32);
    __builtin_memcpy(&Tv, sc.T.data() + p0 + j, 32);
    __builtin_memcpy(&dn, sc.done.data() + p0 + j, 32);
    __builtin_memcpy(&lv, sc.last.data() + p0 + j, 32);
    const lf_vf8 opv = lf_vf8{} + op;
    lf_vf8 alpha = opv * vv;
    alpha = alpha < lf::ALPHA_MAX ? alpha : lf_vf8{} + lf::ALPHA_MAX;
    const lf_vi8 inrow = (lane_i + j) < n;
    const lf_vi8 valid = inrow & (dn == 0) & (sv >= 0.f) & (alpha >= lf::ALPHA_THRESHOLD);
    const lf_vf8 nT = Tv * (1.f - alpha);
    const lf_vi8 fin = valid & (nT <= lf::T_MIN);
    const lf_vi8 contrib = valid & ~fin;
    const lf_vf8 w = (lf_vf8)((lf_vi8)(alpha * Tv) & contrib);
    Tv = (lf_vf8)(((lf_vi8)nT & contrib) | ((lf_vi8)Tv & ~contrib));
    dn = dn | (fin & 1);
    lv = (contrib & cur) | (lv & ~contrib);
    __builtin_memcpy(sc.T.data() + p0 + j, &Tv, 32);
    __builtin_memcpy(sc.done.data() + p0 + j, &dn, 32);
    __builtin_memcpy(sc.last.data() + p0 + j, &lv, 32);
    nd += lfcpu::count_lanes(fin);
    return w;
}

// Runs the tile's front-to-back recurrence and calls visit(i, gid, p, w) for every
// blended (intersection i, pixel p, weight w = alpha T) in blend order.
template <typename Visit>
void walk_tile(SpScratch &sc, const SpTile &tg, int tile_size, const float *means2d, const float *conics,
               const float *opacities, const int32_t *flatten_ids, Visit &&visit) {
    const int n_pix = tg.pw * tg.ph;
    std::fill(sc.T.begin(), sc.T.end(), 1.f);
    std::fill(sc.last.begin(), sc.last.end(), -1);
    std::fill(sc.done.begin(), sc.done.end(), 0);
    int row_done[32] = {0};
    float sig[32], vis[32];
    int n_done = 0;
    for (int64_t i = tg.start; i < tg.end && n_done < n_pix; ++i) {
        const int64_t gid = flatten_ids[i];
        SpGauss g;
        if (!sp_gauss(tg, gid, means2d, conics, opacities, g)) continue;
        for (int ly = g.ly0; ly < g.ly1; ++ly) {
            if (row_done[ly] == tg.pw) continue;
            const float dy = g.m[1] - ((float)(tg.py0 + ly) + 0.5f);
            int rx0, rx1;
            if (!sp_row_range(tg, g, ly, rx0, rx1)) continue;
            const int n = rx1 - rx0;
            lfcpu::row_eval(n, g.m[0], dy, (float)(tg.px0 + rx0), g.con, sig, vis);
            const int p0 = ly * tile_size + rx0;
            int nd = 0;
            for (int j = 0; j < n; j += 8) {
                const lf_vf8 w = blend8(sc, p0, j, n, sig, vis, g.op, (int32_t)i, nd);
                for (int q = 0; q < 8; ++q)
                    if (w[q] != 0.f) visit(i, gid, p0 + j + q, w[q]);
            }
            row_done[ly] += nd;
            n_done += nd;
        }
    }
}


// walk_tile's recurrence with an 8-pixel visitor: visit8(gid, p, w) gets the
// blend weights alpha*T of the tile-local pixels [p, p + 8) of one row (0 in
// lanes that do not blend, including lanes past the row: adding w * x there
// adds exactly 0, so channel-major accumulators can take all 8 lanes).
template <typename Visit8>
void walk_tile8(SpScratch &sc, const SpTile &tg, int tile_size, const float *means2d, const float *conics,
                const float *opacities, const int32_t *flatten_ids, Visit8 &&visit8) {
    const int n_pix = tg.pw * tg.ph;
    std::fill(sc.T.begin(), sc.T.end(), 1.f);
    std::fill(sc.last.begin(), sc.last.end(), -1);
    std::fill(sc.done.begin(), sc.done.end(), 0);
    int row_done[32] = {0};
    float sig[32], vis[32];
    int n_done = 0;
    for (int64_t i = tg.start; i < tg.end && n_done < n_pix; ++i) {
        const int64_t gid = flatten_ids[i];
        SpGauss g;
        if (!sp_gauss(tg, gid, means2d, conics, opacities, g)) continue;
        for (int ly = g.ly0; ly < g.ly1; ++ly) {
            if (row_done[ly] == tg.pw) continue;
            const float dy = g.m[1] - ((float)(tg.py0 + ly) + 0.5f);
            int rx0, rx1;
            if (!sp_row_range(tg, g, ly, rx0, rx1)) continue;
            const int n = rx1 - rx0;
            lfcpu::row_eval(n, g.m[0], dy, (float)(tg.px0 + rx0), g.con, sig, vis);
            const int p0 = ly * tile_size + rx0;
            int nd = 0;
            for (int j = 0; j < n; j += 8) {
                const lf_vf8 w = blend8(sc, p0, j, n, sig, vis, g.op, (int32_t)i, nd);
                const lf_vi8 any = (lf_vi8)w != 0;
                if (lfcpu::count_lanes(any)) visit8(gid, p0 + j, w);
            }
            row_done[ly] += nd;
            n_done += nd;
        }
    }
}

inline lf_vf8 ld8(const float *p) {
    lf_vf8 v;
    __builtin_memcpy(&v, p, 32);
    return v;
}
inline void st8(float *p, lf_vf8 v) { __builtin_memcpy(p, &v, 32); }

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
        const int P = tile_size * tile_size, PP = P + 8;
        std::vector<SpScratch> scratch(lfcpu::num_threads());
        lfcpu::parallel_for(n_tiles, 1, [&](int64_t tb, int64_t te, int tid) {
            SpScratch &sc = scratch[tid];
            sc.init(P, L);
            for (int64_t t = tb; t < te; ++t) {
                const SpTile tg = sp_tile(t, tile_size, tile_width, tile_height, width, height, tile_offsets,
                                          n_tiles, n_isects);
                std::fill(sc.buf.begin(), sc.buf.end(), 0.f);
                float *acc = sc.buf.data();
                walk_tile(sc, tg, tile_size, means2d, conics, opacities, flatten_ids,
                          [&](int64_t, int64_t gid, int p, float w) {
                              const int32_t *ix = sp_idx + gid * K;
                              const float *wt = sp_w + gid * K;
                              for (int q = 0; q < K; ++q) {
                                  const int32_t d = ix[q];
                                  if (d >= 0 && d < L) acc[(size_t)d * PP + p] += w * wt[q];
                              }
                          });
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
        const int P = tile_size * tile_size, PP = P + 8;
        std::vector<SpScratch> scratch(lfcpu::num_threads());
        lfcpu::parallel_for(n_tiles, 1, [&](int64_t tb, int64_t te, int tid) {
            SpScratch &sc = scratch[tid];
            sc.init(P, L);
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
                walk_tile(sc, tg, tile_size, means2d, conics, opacities, flatten_ids,
                          [&](int64_t i, int64_t gid, int p, float w) {
                              const int32_t *ix = sp_idx + gid * K;
                              float *slot = slots.data() + (size_t)i * K;
                              for (int q = 0; q < K; ++q) {
                                  const int32_t d = ix[q];
                                  if (d >= 0 && d < L) slot[q] += w * vr[(size_t)d * PP + p];
                              }
                          });
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
    LF_CHECK(relevancy && render_alphas && last_ids && A && G && (D == 0 || render),
             "lf_rasterize_sparse_relevancy_fwd: null output, A or G");
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
            std::vector<uint8_t> used(NL, 0);
            std::vector<int> act(L);
            const int Lp = (L + 3) & ~3;
            std::vector<lf_vf8> zc(2 * (size_t)Lp), dots(2 * (size_t)M);
            std::vector<float> H((size_t)Lp * Lp), As((size_t)L * M);
            float *acc = sc.buf.data();            // [NL][PP] coefficients
            float *dacc = acc + (size_t)NL * PP;   // [D][PP] dense channels
            for (int64_t t = tb; t < te; ++t) {
                const SpTile tg = sp_tile(t, tile_size, tile_width, tile_height, width, height, tile_offsets,
                                          n_tiles, n_isects);
                walk_tile8(sc, tg, tile_size, means2d, conics, opacities, flatten_ids,
                           [&](int64_t gid, int p, lf_vf8 w) {
                               const int32_t *ix = sp_idx + gid * K;
                               const float *wt = sp_w + gid * K;
                               for (int q = 0; q < K; ++q) {
                                   const int32_t d = ix[q];
                                   if (d < 0 || d >= NL || wt[q] == 0.f) continue;
                                   float *a = acc + (size_t)d * PP + p;
                                   st8(a, ld8(a) + w * wt[q]);
                                   used[d] = 1;
                               }
                               if (D) {
                                   const float *col = colors + gid * (int64_t)D;
                                   for (int k = 0; k < D; ++k) {
                                       float *a = dacc + (size_t)k * PP + p;
                                       st8(a, ld8(a) + w * col[k]);
                                   }
                               }
                           });
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
                        last_ids[pix] = sc.last[p];
                    }
                if (D) std::fill(dacc, dacc + (size_t)D * PP, 0.f);
                // per level: cosines z (C e) / sqrt(z G z) over the channels the tile used, then
                // LERF relevancy against the canonical columns. z G z = z H z with H the upper
                // triangle of G, off-diagonal doubled (half the multiply-adds), compacted to the
                // s used channels; 16 pixels x 4 rows of H at a time (register blocking).
                for (int l = 0; l < n_levels; ++l) {
                    int s = 0;
                    for (int a = 0; a < L; ++a)
                        if (used[l * L + a]) act[s++] = a;
                    const int sp = (s + 3) & ~3;  // rows padded to a multiple of 4 (zero rows)
                    for (int a = 0; a < sp; ++a)
                        for (int b = 0; b < sp; ++b) {
                            float h = 0.f;
                            if (a < s && b < s && b >= a) h = G[(size_t)act[a] * L + act[b]] * (b > a ? 2.f : 1.f);
                            H[(size_t)a * sp + b] = h;
                        }
                    for (int a = 0; a < s; ++a)
                        for (int m = 0; m < M; ++m) As[(size_t)a * M + m] = A[(size_t)act[a] * M + m];
                    float *zl = acc + (size_t)l * L * PP;
                    for (int p0 = 0; p0 < P; p0 += 16) {
                        bool any_ok = false;  // a block of pixels that are all empty space scores 0
                        for (int q = 0; q < 16 && !any_ok; ++q) any_ok = 1.f - sc.T[p0 + q] > min_alpha;
                        if (!any_ok) {
                            for (int a = 0; a < s; ++a) {  // the accumulators start the next tile at 0
                                float *src = zl + (size_t)act[a] * PP + p0;
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
                        // z of the 16 pixels [p0, p0 + 16), compacted: zc[a][0..1]
                        for (int a = 0; a < s; ++a) {  // read, and leave 0 for the next tile
                            float *src = zl + (size_t)act[a] * PP + p0;
                            zc[2 * a] = ld8(src);
                            zc[2 * a + 1] = ld8(src + 8);  // PP = P + 16 keeps this in bounds
                            st8(src, lf_vf8{});
                            st8(src + 8, lf_vf8{});
                        }
                        for (int a = s; a < sp; ++a) zc[2 * a] = zc[2 * a + 1] = lf_vf8{};
                        lf_vf8 n0 = {}, n1 = {};
                        for (int a0 = 0; a0 < sp; a0 += 4) {
                            lf_vf8 y00 = {}, y01 = {}, y10 = {}, y11 = {}, y20 = {}, y21 = {}, y30 = {}, y31 = {};
                            const float *h0 = H.data() + (size_t)a0 * sp, *h1 = h0 + sp, *h2 = h1 + sp, *h3 = h2 + sp;
                            for (int b = a0; b < sp; ++b) {
                                const lf_vf8 z0 = zc[2 * b], z1 = zc[2 * b + 1];
                                y00 += h0[b] * z0; y01 += h0[b] * z1;
                                y10 += h1[b] * z0; y11 += h1[b] * z1;
                                y20 += h2[b] * z0; y21 += h2[b] * z1;
                                y30 += h3[b] * z0; y31 += h3[b] * z1;
                            }
                            n0 += zc[2 * a0] * y00 + zc[2 * a0 + 2] * y10 + zc[2 * a0 + 4] * y20 + zc[2 * a0 + 6] * y30;
                            n1 += zc[2 * a0 + 1] * y01 + zc[2 * a0 + 3] * y11 + zc[2 * a0 + 5] * y21 +
                                  zc[2 * a0 + 7] * y31;
                        }
                        for (int m = 0; m < M; ++m) dots[2 * m] = dots[2 * m + 1] = lf_vf8{};
                        for (int a = 0; a < s; ++a) {
                            const lf_vf8 z0 = zc[2 * a], z1 = zc[2 * a + 1];
                            const float *Aa = As.data() + (size_t)a * M;
                            for (int m = 0; m < M; ++m) {
                                dots[2 * m] += Aa[m] * z0;
                                dots[2 * m + 1] += Aa[m] * z1;
                            }
                        }
                        for (int q = 0; q < 16; ++q) {
                            const int p = p0 + q;
                            if (p >= P) break;
                            const int ly = p / tile_size, lx = p % tile_size;
                            if (ly >= tg.ph || lx >= tg.pw) continue;
                            const int hv = q >> 3, lane = q & 7;
                            const int64_t pix = (int64_t)(tg.py0 + ly) * width + tg.px0 + lx;
                            const float nq = hv ? n1[lane] : n0[lane];
                            const float nz = fmaxf(sqrtf(fmaxf(nq, 0.f)), 1e-12f);
                            const bool ok = 1.f - sc.T[p] > min_alpha;
                            float worst = -INFINITY;
                            for (int m = Q; m < M; ++m) worst = fmaxf(worst, dots[2 * m + hv][lane] / nz);
                            for (int qq = 0; qq < Q; ++qq) {
                                float r = 0.f;
                                if (ok) {
                                    const float x = temperature * (dots[2 * qq + hv][lane] / nz - worst);
                                    r = 1.f / (1.f + expf(-x));
                                }
                                relevancy[(((int64_t)tg.cam * Q + qq) * n_levels + l) * ((int64_t)height * width) +
                                          pix] = r;
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
