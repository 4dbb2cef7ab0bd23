// CPU driver: tile rasterization, forward and backward.
//
// One parallel task per tile (cuda/cpu/parallel.h). Inside a tile the loop order is Gaussian-outer,
// pixel-inner: each Gaussian in depth order updates the pixels of its
// conservative alpha rectangle (lfcpu::alpha_bbox) that are not yet
// saturated. Per pixel this visits the Gaussians in exactly the order of the
// per-pixel formulation, so results equal it, while small Gaussians cost only
// the pixels they touch.
//
// Backward is deterministic: each tile writes its per-Gaussian gradient sums
// into a private slot per intersection, and the slots are reduced per
// Gaussian in intersection order (partitioned by Gaussian id across threads).
#include <algorithm>
#include <cstring>
#include <vector>
#include "common.h"

using lfcpu::lf_vf8;
using lfcpu::lf_vi8;

namespace {

struct TileGeom {
    int64_t cam, tile, start, end;
    int px0, py0, pw, ph;
};

inline TileGeom tile_geom(int64_t t, int tile_size, int tile_width, int tile_height, int width, int height,
                          const int32_t *tile_offsets, int64_t n_tiles, int64_t n_isects) {
    TileGeom g;
    const int64_t per_cam = (int64_t)tile_width * tile_height;
    g.cam = t / per_cam;
    g.tile = t % per_cam;
    const int ty = (int)(g.tile / tile_width), tx = (int)(g.tile % tile_width);
    g.px0 = tx * tile_size;
    g.py0 = ty * tile_size;
    g.pw = std::min(tile_size, width - g.px0);
    g.ph = std::min(tile_size, height - g.py0);
    if (!tile_offsets || n_isects == 0) {
        g.start = g.end = 0;
        return g;
    }
    g.start = tile_offsets[t];
    g.end = (t + 1 < n_tiles) ? tile_offsets[t + 1] : n_isects;
    if (g.end < g.start) g.end = g.start;
    return g;
}

// Forward scratch of one thread. Rows are processed 8 pixels at a time, so
// every array has 8 floats of padding past the tile; acc is channel-major
// [D][PP] with PP = P + 8.
// One Gaussian clipped to one tile: what forward and backward both need, computed by
// the same code so that their skip decisions agree exactly.
struct TileGauss {
    const float *m, *con, *col;
    float op, L;
    bool pd;  // positive-definite conic: per-row chords are valid
    int lx0, lx1, ly0, ly1;  // tile-local pixel rectangle
};

inline bool tile_gauss(const TileGeom &tg, int64_t gid, const float *means2d, const float *conics,
                       const float *colors, const float *opacities, int D, TileGauss &g) {
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
    g.col = colors + gid * (int64_t)D;
    g.L = logf(g.op * 255.f);
    g.pd = g.con[0] * g.con[2] - g.con[1] * g.con[1] > 0.f;
    return true;
}

// Tile-local pixel columns [rx0, rx1) of row ly that can have alpha >= 1/255.
inline bool row_range(const TileGeom &tg, const TileGauss &g, int ly, int &rx0, int &rx1) {
    rx0 = g.lx0;
    rx1 = g.lx1;
    if (!g.pd || g.lx1 - g.lx0 <= 8) return true;  // one chunk either way: the chord would not save one
    int sx0, sx1;
    if (!lfcpu::alpha_row_span(g.m, g.con, g.L, (float)(tg.py0 + ly) + 0.5f, sx0, sx1)) return false;
    rx0 = std::max(g.lx0, sx0 - tg.px0);
    rx1 = std::min(g.lx1, sx1 - tg.px0);
    return rx0 < rx1;
}

struct FwdScratch {
    std::vector<float> T, acc;
    std::vector<int32_t> last, done;
    void init(int P, int D) {
        T.resize(P + 8); acc.resize((size_t)(P + 8) * D); last.resize(P + 8); done.resize(P + 8);
    }
};

// Backward scratch of one thread: per-pixel state with 8 floats of padding,
// channel-major [D][P+8] arrays, and one vector accumulator per channel.
struct BwdScratch {
    std::vector<float> T, Tf, va, bgdot, buf, vr;
    std::vector<int32_t> last;
    std::vector<lf_vf8> gcol;
    void init(int P, int D) {
        const size_t PP = (size_t)P + 8;
        T.assign(PP, 0.f); Tf.assign(PP, 0.f); va.assign(PP, 0.f); bgdot.assign(PP, 0.f);
        buf.assign(PP, 0.f); vr.resize(PP * D); last.resize(PP); gcol.resize(D);
    }
};

// a[k] += w * c[k], unrolled for the common small channel counts
inline void accumulate(float *__restrict a, const float *__restrict c, float w, int D) {
    switch (D) {
    case 1: a[0] += w * c[0]; return;
    case 3: a[0] += w * c[0]; a[1] += w * c[1]; a[2] += w * c[2]; return;
    case 4: a[0] += w * c[0]; a[1] += w * c[1]; a[2] += w * c[2]; a[3] += w * c[3]; return;
    default:
        for (int k = 0; k < D; ++k) a[k] += w * c[k];
    }
}

}  // namespace

extern "C" {

LF_API int lf_rasterize_fwd(int C, int N, int D, int width, int height, int tile_size, int tile_width,
                            int tile_height, const float *means2d, const float *conics, const float *colors,
                            const float *opacities, const float *backgrounds, const int32_t *tile_offsets,
                            const int32_t *flatten_ids, int64_t n_isects, float *render_colors,
                            float *render_alphas, int32_t *last_ids, void *stream) {
    (void)stream;
    LF_CHECK(C >= 0 && N >= 0 && D >= 1, "lf_rasterize_fwd: bad C, N or D");
    LF_CHECK(width > 0 && height > 0 && tile_size > 0, "lf_rasterize_fwd: bad image or tile size");
    LF_CHECK(tile_width == (width + tile_size - 1) / tile_size &&
                 tile_height == (height + tile_size - 1) / tile_size,
             "lf_rasterize_fwd: tile grid does not match the image");
    LF_CHECK(render_colors && render_alphas && last_ids, "lf_rasterize_fwd: null output");
    LF_CHECK(n_isects == 0 || (means2d && conics && colors && opacities && flatten_ids && tile_offsets),
             "lf_rasterize_fwd: null input");
    const int64_t n_tiles = (int64_t)C * tile_width * tile_height;
    return lfcpu::guarded("lf_rasterize_fwd", [&]() -> int {
        const int P = tile_size * tile_size;
        std::vector<FwdScratch> scratch(lfcpu::num_threads());
        lfcpu::parallel_for(n_tiles, 1, [&](int64_t tb, int64_t te, int tid) {
            FwdScratch &sc = scratch[tid];
            sc.init(P, D);
            std::vector<float> &T = sc.T, &acc = sc.acc;
            std::vector<int32_t> &last = sc.last, &done = sc.done;
            const int PP = P + 8;
            const lf_vi8 lane_i = {0, 1, 2, 3, 4, 5, 6, 7};
            for (int64_t t = tb; t < te; ++t) {
                TileGeom tg = tile_geom(t, tile_size, tile_width, tile_height, width, height, tile_offsets,
                                        n_tiles, n_isects);
                const int n_pix = tg.pw * tg.ph;
                std::fill(T.begin(), T.end(), 1.f);
                std::fill(acc.begin(), acc.end(), 0.f);
                std::fill(last.begin(), last.end(), -1);
                std::fill(done.begin(), done.end(), 0);
                int row_done[32] = {0};
                float sig[32], vis[32];
                int n_done = 0;
                for (int64_t i = tg.start; i < tg.end && n_done < n_pix; ++i) {
                    if (i + lfcpu::PREFETCH_AHEAD < tg.end) {
                        const int64_t pg = flatten_ids[i + lfcpu::PREFETCH_AHEAD];
                        lfcpu::prefetch_gauss(pg, means2d, conics, opacities);
                        lfcpu::prefetch_span(colors + pg * D, D);
                    }
                    TileGauss g;
                    if (!tile_gauss(tg, flatten_ids[i], means2d, conics, colors, opacities, D, g)) continue;
                    const float *m = g.m, *con = g.con, *col = g.col;
                    const float op = g.op;
                    const int32_t cur = (int32_t)i;
                    for (int ly = g.ly0; ly < g.ly1; ++ly) {
                        if (row_done[ly] == tg.pw) continue;
                        const float dy = m[1] - ((float)(tg.py0 + ly) + 0.5f);
                        int rx0, rx1;
                        if (!row_range(tg, g, ly, rx0, rx1)) continue;
                        const int n = rx1 - rx0;
                        // pass 1 (vectorised): sigma and exp(-sigma) along the row
                        lfcpu::row_eval(n, m[0], dy, (float)(tg.px0 + rx0), con, sig, vis);
                        // pass 2: the blend step of every pixel of the row, 8 pixels at a
                        // time (pixels are independent; per pixel the order is front to back)
                        const int p0 = ly * tile_size + rx0;
                        const lf_vf8 opv = lf_vf8{} + op;
                        int nd = 0;
                        for (int j = 0; j < n; j += 8) {
                            lf_vf8 sv, vv, Tv;
                            lf_vi8 dn, lv;
                            __builtin_memcpy(&sv, sig + j, 32);
                            __builtin_memcpy(&vv, vis + j, 32);
                            __builtin_memcpy(&Tv, T.data() + p0 + j, 32);
                            __builtin_memcpy(&dn, done.data() + p0 + j, 32);
                            __builtin_memcpy(&lv, last.data() + p0 + j, 32);
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
                            __builtin_memcpy(T.data() + p0 + j, &Tv, 32);
                            __builtin_memcpy(done.data() + p0 + j, &dn, 32);
                            __builtin_memcpy(last.data() + p0 + j, &lv, 32);
                            nd += lfcpu::count_lanes(fin);
                            for (int k = 0; k < D; ++k) {
                                float *ak = acc.data() + (size_t)k * PP + p0 + j;
                                lf_vf8 av;
                                __builtin_memcpy(&av, ak, 32);
                                av += w * col[k];
                                __builtin_memcpy(ak, &av, 32);
                            }
                        }
                        row_done[ly] += nd;
                        n_done += nd;
                    }
                }
                const float *bg = backgrounds ? backgrounds + tg.cam * D : nullptr;
                for (int ly = 0; ly < tg.ph; ++ly)
                    for (int lx = 0; lx < tg.pw; ++lx) {
                        const int p = ly * tile_size + lx;
                        const int64_t pix = (tg.cam * height + tg.py0 + ly) * (int64_t)width + tg.px0 + lx;
                        float *out = render_colors + pix * D;
                        for (int k = 0; k < D; ++k) out[k] = acc[(size_t)k * PP + p] + (bg ? T[p] * bg[k] : 0.f);
                        render_alphas[pix] = 1.f - T[p];
                        last_ids[pix] = last[p];
                    }
            }
        });
        return 0;
    });
}

LF_API int lf_rasterize_bwd(int C, int N, int D, int width, int height, int tile_size, int tile_width,
                            int tile_height, const float *means2d, const float *conics, const float *colors,
                            const float *opacities, const float *backgrounds, const int32_t *tile_offsets,
                            const int32_t *flatten_ids, int64_t n_isects, const float *render_alphas,
                            const int32_t *last_ids, const float *v_render_colors, const float *v_render_alphas,
                            float *v_means2d, float *v_means2d_abs, float *v_conics, float *v_colors,
                            float *v_opacities, float *v_backgrounds, void *stream) {
    (void)stream;
    LF_CHECK(C >= 0 && N >= 0 && D >= 1, "lf_rasterize_bwd: bad C, N or D");
    LF_CHECK(width > 0 && height > 0 && tile_size > 0, "lf_rasterize_bwd: bad image or tile size");
    LF_CHECK(tile_width == (width + tile_size - 1) / tile_size &&
                 tile_height == (height + tile_size - 1) / tile_size,
             "lf_rasterize_bwd: tile grid does not match the image");
    LF_CHECK(render_alphas && last_ids && v_render_colors && v_render_alphas, "lf_rasterize_bwd: null input");
    // geometry gradients: all three or none (colours only)
    const bool geo = v_means2d != nullptr;
    LF_CHECK((v_conics != nullptr) == geo && (v_opacities != nullptr) == geo && (geo || !v_means2d_abs),
             "lf_rasterize_bwd: v_means2d, v_conics and v_opacities must be all given or all NULL");
    LF_CHECK(n_isects == 0 || (means2d && conics && colors && opacities && flatten_ids && tile_offsets && v_colors),
             "lf_rasterize_bwd: null pointer");
    const int64_t n_tiles = (int64_t)C * tile_width * tile_height;
    const bool absgrad = v_means2d_abs != nullptr;
    // per-intersection slot: [v_xy(2) v_conic(3) v_opac(1) [v_xy_abs(2)]] v_color(D)
    const int S_ABS = 6, S_COL = !geo ? 0 : absgrad ? 8 : 6;
    const int S = S_COL + D;
    return lfcpu::guarded("lf_rasterize_bwd", [&]() -> int {
        std::vector<float> slots((size_t)n_isects * S, 0.f);
        std::vector<double> bg_part(v_backgrounds ? (size_t)n_tiles * D : 0, 0.0);
        const int P = tile_size * tile_size;
        std::vector<BwdScratch> scratch(lfcpu::num_threads());
        const int PP = P + 8;
        lfcpu::parallel_for(n_tiles, 1, [&](int64_t tb, int64_t te, int tid) {
            BwdScratch &sc = scratch[tid];
            sc.init(P, D);
            const lf_vi8 lane_i = {0, 1, 2, 3, 4, 5, 6, 7};
            const lf_vf8 lane_c = {0.5f, 1.5f, 2.5f, 3.5f, 4.5f, 5.5f, 6.5f, 7.5f};
            float sig[32], vis_row[32];
            for (int64_t t = tb; t < te; ++t) {
                TileGeom tg = tile_geom(t, tile_size, tile_width, tile_height, width, height, tile_offsets,
                                        n_tiles, n_isects);
                const float *bg = backgrounds ? backgrounds + tg.cam * D : nullptr;
                // tile state, channel-major with 8 floats of padding: T (current transmittance,
                // recovered back to front), Tf (final), v_render (SoA), buf (v_render . colour
                // blended behind the current Gaussian)
                std::fill(sc.last.begin(), sc.last.end(), -1);
                std::fill(sc.buf.begin(), sc.buf.end(), 0.f);
                std::fill(sc.vr.begin(), sc.vr.end(), 0.f);
                std::fill(sc.bgdot.begin(), sc.bgdot.end(), 0.f);
                int32_t max_last = -1;
                for (int ly = 0; ly < tg.ph; ++ly)
                    for (int lx = 0; lx < tg.pw; ++lx) {
                        const int p = ly * tile_size + lx;
                        const int64_t pix = (tg.cam * height + tg.py0 + ly) * (int64_t)width + tg.px0 + lx;
                        sc.Tf[p] = sc.T[p] = 1.f - render_alphas[pix];
                        sc.last[p] = last_ids[pix];
                        sc.va[p] = v_render_alphas[pix];
                        if (sc.last[p] > max_last) max_last = sc.last[p];
                        const float *vr = v_render_colors + pix * D;
                        float dot = 0.f;
                        for (int k = 0; k < D; ++k) {
                            sc.vr[(size_t)k * PP + p] = vr[k];
                            if (bg) dot += bg[k] * vr[k];
                        }
                        sc.bgdot[p] = dot;
                        if (v_backgrounds) {
                            double *dst = bg_part.data() + (size_t)t * D;
                            for (int k = 0; k < D; ++k) dst[k] += (double)sc.Tf[p] * vr[k];
                        }
                    }
                for (int64_t i = std::min<int64_t>(max_last, tg.end - 1); i >= tg.start; --i) {
                    if (i - lfcpu::PREFETCH_AHEAD >= tg.start) {  // back to front
                        const int64_t pg = flatten_ids[i - lfcpu::PREFETCH_AHEAD];
                        lfcpu::prefetch_gauss(pg, means2d, conics, opacities);
                        lfcpu::prefetch_span(colors + pg * D, D);
                    }
                    TileGauss tgs;
                    if (!tile_gauss(tg, flatten_ids[i], means2d, conics, colors, opacities, D, tgs)) continue;
                    const float *m = tgs.m, *con = tgs.con, *col = tgs.col;
                    const float op = tgs.op;
                    const float ca = con[0], cb = con[1], cc = con[2];
                    const lf_vf8 zero = {};
                    lf_vf8 g_x = zero, g_y = zero, g_ax = zero, g_ay = zero, g_c0 = zero, g_c1 = zero,
                           g_c2 = zero, g_op = zero;
                    lf_vf8 *g_col = sc.gcol.data();
                    for (int k = 0; k < D; ++k) g_col[k] = zero;
                    lf_vi8 any_v = {};
                    const int32_t cur = (int32_t)i;
                    for (int ly = tgs.ly0; ly < tgs.ly1; ++ly) {
                        const float dy = m[1] - ((float)(tg.py0 + ly) + 0.5f);
                        int rx0, rx1;
                        if (!row_range(tg, tgs, ly, rx0, rx1)) continue;
                        const int n = rx1 - rx0;
                        lfcpu::row_eval(n, m[0], dy, (float)(tg.px0 + rx0), con, sig, vis_row);
                        const int p0 = ly * tile_size + rx0;
                        for (int j = 0; j < n; j += 8) {
                            const int pj = p0 + j;
                            lf_vf8 sv, vv, Tv, Tfv, vav, bgd;
                            lf_vi8 lv;
                            __builtin_memcpy(&sv, sig + j, 32);
                            __builtin_memcpy(&vv, vis_row + j, 32);
                            __builtin_memcpy(&Tv, sc.T.data() + pj, 32);
                            __builtin_memcpy(&Tfv, sc.Tf.data() + pj, 32);
                            __builtin_memcpy(&vav, sc.va.data() + pj, 32);
                            __builtin_memcpy(&bgd, sc.bgdot.data() + pj, 32);
                            __builtin_memcpy(&lv, sc.last.data() + pj, 32);
                            const lf_vf8 ov = op * vv;
                            const lf_vf8 alpha = ov < lf::ALPHA_MAX ? ov : zero + lf::ALPHA_MAX;
                            const lf_vi8 valid = ((lane_i + j) < n) & (cur <= lv) & (sv >= 0.f) &
                                                 (alpha >= lf::ALPHA_THRESHOLD);
                            if (!lfcpu::any_lane(valid)) continue;
                            any_v |= valid;
                            const lf_vf8 ra = 1.f / (1.f - alpha);
                            const lf_vf8 Tn = Tv * ra;
                            Tv = lfcpu::select(valid, Tn, Tv);
                            __builtin_memcpy(sc.T.data() + pj, &Tv, 32);
                            const lf_vf8 fac = lfcpu::select(valid, alpha * Tn, zero);
                            if (!geo) {  // colours only: d render / d colour_k = alpha T
                                for (int k = 0; k < D; ++k) {
                                    lf_vf8 vr;
                                    __builtin_memcpy(&vr, sc.vr.data() + (size_t)k * PP + pj, 32);
                                    g_col[k] += fac * vr;
                                }
                                continue;
                            }
                            // v_render . colour of this Gaussian, and v_render . colour
                            // blended behind it (one scalar per pixel, not D channels)
                            lf_vf8 cdot = zero, behind;
                            for (int k = 0; k < D; ++k) {
                                lf_vf8 vr;
                                __builtin_memcpy(&vr, sc.vr.data() + (size_t)k * PP + pj, 32);
                                g_col[k] += fac * vr;
                                cdot += col[k] * vr;
                            }
                            __builtin_memcpy(&behind, sc.buf.data() + pj, 32);
                            lf_vf8 v_alpha = cdot * Tn - behind * ra;
                            behind += cdot * fac;
                            __builtin_memcpy(sc.buf.data() + pj, &behind, 32);
                            v_alpha += Tfv * ra * vav;
                            if (bg) v_alpha -= Tfv * ra * bgd;
                            // alpha = min(0.999, op vis): no gradient through the clamp
                            const lf_vi8 m_ok = valid & (ov <= lf::ALPHA_MAX);
                            const lf_vf8 v_sigma = lfcpu::select(m_ok, -ov * v_alpha, zero);
                            const lf_vf8 dx = m[0] - (((float)(tg.px0 + rx0 + j)) + lane_c);
                            g_c0 += 0.5f * v_sigma * dx * dx;
                            g_c1 += v_sigma * dx * dy;
                            g_c2 += 0.5f * v_sigma * dy * dy;
                            const lf_vf8 gx = v_sigma * (ca * dx + cb * dy);
                            const lf_vf8 gy = v_sigma * (cb * dx + cc * dy);
                            g_x += gx;
                            g_y += gy;
                            g_ax += lfcpu::vabs(gx);
                            g_ay += lfcpu::vabs(gy);
                            g_op += lfcpu::select(m_ok, vv * v_alpha, zero);
                        }
                    }
                    if (!lfcpu::any_lane(any_v)) continue;
                    float *slot = slots.data() + (size_t)i * S;
                    if (geo) {
                        slot[0] = lfcpu::hsum(g_x);
                        slot[1] = lfcpu::hsum(g_y);
                        slot[2] = lfcpu::hsum(g_c0);
                        slot[3] = lfcpu::hsum(g_c1);
                        slot[4] = lfcpu::hsum(g_c2);
                        slot[5] = lfcpu::hsum(g_op);
                    }
                    if (absgrad) {
                        slot[S_ABS] = lfcpu::hsum(g_ax);
                        slot[S_ABS + 1] = lfcpu::hsum(g_ay);
                    }
                    for (int k = 0; k < D; ++k) slot[S_COL + k] = lfcpu::hsum(g_col[k]);
                }
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
                const float *s = slots.data() + (size_t)i * S;
                if (geo) {
                    v_means2d[gid * 2] += s[0];
                    v_means2d[gid * 2 + 1] += s[1];
                    v_conics[gid * 3] += s[2];
                    v_conics[gid * 3 + 1] += s[3];
                    v_conics[gid * 3 + 2] += s[4];
                    v_opacities[gid] += s[5];
                }
                if (absgrad) {
                    v_means2d_abs[gid * 2] += s[S_ABS];
                    v_means2d_abs[gid * 2 + 1] += s[S_ABS + 1];
                }
                float *vc = v_colors + gid * (int64_t)D;
                for (int k = 0; k < D; ++k) vc[k] += s[S_COL + k];
            }
        }
        });
        if (v_backgrounds) {
            const int64_t per_cam = (int64_t)tile_width * tile_height;
            for (int64_t c = 0; c < C; ++c)
                for (int k = 0; k < D; ++k) {
                    double acc = 0.0;
                    for (int64_t t = c * per_cam; t < (c + 1) * per_cam; ++t) acc += bg_part[(size_t)t * D + k];
                    v_backgrounds[c * D + k] += (float)acc;
                }
        }
        return 0;
    });
}

}  // extern "C"
