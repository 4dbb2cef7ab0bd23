// CPU driver internals: error reporting and small helpers.
#pragma once
#include <stdint.h>
#include <string>
#include <exception>
#include <math.h>
#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "langfield_abi.h"
#include "lf_math.h"
#include "parallel.h"

namespace lfcpu {

void set_error(const std::string &msg);

#define LF_CHECK(cond, msg)                 \
    do {                                    \
        if (!(cond)) {                      \
            ::lfcpu::set_error(msg);        \
            return 1;                       \
        }                                   \
    } while (0)

// Runs `body` and turns a C++ exception (e.g. std::bad_alloc) into an error code.
template <typename F> int guarded(const char *what, F &&body) {
    try {
        return body();
    } catch (const std::exception &e) {
        set_error(std::string(what) + ": " + e.what());
        return 2;
    } catch (...) {
        set_error(std::string(what) + ": unknown C++ exception");
        return 2;
    }
}

// Conservative pixel rectangle [x0,x1) x [y0,y1) (image coordinates) outside
// of which a Gaussian's alpha is below 1/255 at every pixel centre. Returns
// false when it touches no pixel. Derived from the conic: alpha >= 1/255 needs
// sigma <= L = ln(255 * opacity); the ellipse sigma <= L has half-extents
// sqrt(2 L Sigma_xx), sqrt(2 L Sigma_yy) with Sigma = conic^-1.
inline bool alpha_bbox(const float *mean2d, const float *conic, float opacity, int &x0, int &x1,
                       int &y0, int &y1, float *L_out = nullptr) {
    if (!(opacity > 0.f)) return false;
    float L = logf(opacity * 255.f);
    if (!(L >= 0.f)) return false;  // opacity < 1/255: never visible
    if (L_out) *L_out = L;
    float det = conic[0] * conic[2] - conic[1] * conic[1];
    if (!(det > 0.f)) {  // not positive definite: no safe bound, use everything
        x0 = -(1 << 30); x1 = 1 << 30; y0 = -(1 << 30); y1 = 1 << 30;
        return true;
    }
    float ex = sqrtf(2.f * L * conic[2] / det) + 1.f;  // +1 px margin for rounding
    float ey = sqrtf(2.f * L * conic[0] / det) + 1.f;
    // pixel p is inside if |mean - (p + 0.5)| <= e
    float fx0 = ceilf(mean2d[0] - ex - 0.5f), fx1 = floorf(mean2d[0] + ex - 0.5f) + 1.f;
    float fy0 = ceilf(mean2d[1] - ey - 0.5f), fy1 = floorf(mean2d[1] + ey - 0.5f) + 1.f;
    const float BIG = (float)(1 << 30);
    x0 = (int)lf::lf_max(-BIG, lf::lf_min(BIG, fx0));
    x1 = (int)lf::lf_max(-BIG, lf::lf_min(BIG, fx1));
    y0 = (int)lf::lf_max(-BIG, lf::lf_min(BIG, fy0));
    y1 = (int)lf::lf_max(-BIG, lf::lf_min(BIG, fy1));
    return x1 > x0 && y1 > y0;
}

// exp(x) for x <= 0 (Cephes' range reduction and polynomial, about 1 ulp),
// branch-free so the compiler vectorises loops that call it. Forward and
// backward both use it, so their skip decisions agree.
inline float exp_neg(float x) {
    x = fminf(fmaxf(x, -87.33654f), 0.f);
    float fx = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - fx * 0.693359375f + fx * 2.12194440e-4f;
    float z = r * r;
    float y = ((((1.9875691500E-4f * r + 1.3981999507E-3f) * r + 8.3334519073E-3f) * r + 4.1665795894E-2f) * r +
               1.6666665459E-1f) * r + 5.0000001201E-1f;
    y = y * z + r + 1.f;
    int32_t n = (int32_t)fx + 127;
    uint32_t bits = (uint32_t)n << 23;
    float scale;
    __builtin_memcpy(&scale, &bits, 4);
    return y * scale;
}

// Pixels [x0, x1) of the image row whose centre is at height py_centre that
// can have alpha >= 1/255: the chord of the ellipse sigma <= ln(255 opacity)
// through that row, widened by one pixel on each side for rounding.
inline bool alpha_row_span(const float *mean2d, const float *conic, float L, float py_centre, int &x0,
                           int &x1) {
    const float a = conic[0], b = conic[1], c = conic[2];
    const float dy = mean2d[1] - py_centre;
    const float disc = 2.f * a * L - dy * dy * (a * c - b * b);
    if (!(disc >= 0.f) || !(a > 0.f)) return false;
    const float r = sqrtf(disc);
    const float dx_lo = (-b * dy - r) / a, dx_hi = (-b * dy + r) / a;
    // dx = mean.x - (px + 0.5)
    const float BIG = (float)(1 << 30);
    const float f0 = ceilf(mean2d[0] - dx_hi - 0.5f - 1.f), f1 = floorf(mean2d[0] - dx_lo - 0.5f + 1.f) + 1.f;
    x0 = (int)lf::lf_max(-BIG, lf::lf_min(BIG, f0));
    x1 = (int)lf::lf_max(-BIG, lf::lf_min(BIG, f1));
    return x1 > x0;
}

// Vectorised evaluation along an image row (GCC/Clang vector extensions; any
// architecture): for the pixels px_start + j, j < n (n <= 32), writes
// sigma = 0.5 (a dx^2 + c dy^2) + b dx dy with dx = mx - (px + 0.5), and
// exp(-sigma) computed as in exp_neg (about 1e-7 relative error). sig and vis
// must hold 32 floats. Forward and backward both call this, so their skip
// decisions agree bit for bit.
typedef float lf_vf8 __attribute__((vector_size(32)));
typedef int32_t lf_vi8 __attribute__((vector_size(32)));

inline lf_vf8 vexp_neg(lf_vf8 x) {
    const lf_vf8 zero = {};
    const lf_vf8 lo = zero - 87.33654f;
    x = x < lo ? lo : x;
    x = x > zero ? zero : x;
    lf_vf8 t = x * 1.44269504088896341f + 0.5f;
    lf_vi8 ti = __builtin_convertvector(t, lf_vi8);  // toward zero
    lf_vf8 fx = __builtin_convertvector(ti, lf_vf8);
    lf_vi8 up = fx > t;                               // -1 where truncation went up
    fx = fx + __builtin_convertvector(up, lf_vf8);    // floor
    ti = __builtin_convertvector(fx, lf_vi8);
    lf_vf8 r = x - fx * 0.693359375f + fx * 2.12194440e-4f;
    lf_vf8 z = r * r;
    lf_vf8 y = ((((1.9875691500E-4f * r + 1.3981999507E-3f) * r + 8.3334519073E-3f) * r + 4.1665795894E-2f) * r +
                1.6666665459E-1f) * r + 5.0000001201E-1f;
    y = y * z + r + 1.f;
    lf_vi8 bits = (ti + 127) << 23;
    return y * (lf_vf8)bits;
}

inline lf_vf8 select(lf_vi8 mask, lf_vf8 a, lf_vf8 b) {
    return (lf_vf8)(((lf_vi8)a & mask) | ((lf_vi8)b & ~mask));
}
inline lf_vf8 vabs(lf_vf8 x) { return (lf_vf8)((lf_vi8)x & 0x7fffffff); }
inline float hsum(lf_vf8 v) {
    return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}
// Lane masks are all-ones (-1) or 0 per lane.
inline int lane_bits(lf_vi8 m) {
#if defined(__AVX__)
    return __builtin_ia32_movmskps256((__v8sf)m);
#else
    int r = 0;
    for (int q = 0; q < 8; ++q) r |= (m[q] != 0) << q;
    return r;
#endif
}
inline bool any_lane(lf_vi8 m) { return lane_bits(m) != 0; }
inline int count_lanes(lf_vi8 m) { return __builtin_popcount((unsigned)lane_bits(m)); }

inline void row_eval(int n, float mx, float dy, float px_start, const float *conic, float *sig, float *vis) {
    const lf_vf8 lane = {0.5f, 1.5f, 2.5f, 3.5f, 4.5f, 5.5f, 6.5f, 7.5f};
    const float ca = conic[0], cb = conic[1], cc = conic[2];
    const float cdy = 0.5f * cc * dy * dy, bdy = cb * dy;
    for (int j = 0; j < n; j += 8) {
        lf_vf8 dx = mx - ((px_start + (float)j) + lane);
        lf_vf8 s = 0.5f * (ca * dx * dx) + cdy + bdy * dx;
        lf_vf8 v = vexp_neg(-s);
        __builtin_memcpy(sig + j, &s, sizeof(s));
        __builtin_memcpy(vis + j, &v, sizeof(v));
    }
}

inline int max_threads() { return num_threads(); }

// Prefetch of the cache line at p. An asm statement on x86, because GCC 12 drops
// some __builtin_prefetch calls (all of those in the sparse relevancy driver's walk).
inline void prefetch_line(const void *p) {
#if defined(__x86_64__) || defined(__i386__)
    asm volatile("prefetcht0 %0" : : "m"(*(const char *)p));
#else
    __builtin_prefetch(p);
#endif
}
// the first and the last cache line of the n >= 1 elements at p (all of them when n * sizeof(T) <= 64)
template <typename T>
inline void prefetch_span(const T *p, int64_t n) {
    prefetch_line(p);
    prefetch_line(p + (n - 1));
}
// A tile's Gaussians come in depth order, scattered in memory: the rasterizer passes fetch the
// data of the Gaussian PREFETCH_AHEAD intersections ahead while they blend the current one
// (about 0.8x the time of a forward pass at 100k Gaussians, 640x480).
constexpr int PREFETCH_AHEAD = 8;
inline void prefetch_gauss(int64_t gid, const float *means2d, const float *conics, const float *opacities) {
    prefetch_span(means2d + gid * 2, 2);
    prefetch_span(conics + gid * 3, 3);
    prefetch_line(opacities + gid);
}

}  // namespace lfcpu
