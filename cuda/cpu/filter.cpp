// CPU driver: lf_box_filter (langfield_abi.h), on lf_math.h's box_running_sums.
//
// One task per (map, strip of lf::BOX_STRIP columns): the rows' window sums of the
// strip's columns (each row's running sum starts from the strip's first window, as
// in the CUDA driver), kept in
// a per-thread buffer that lives across calls (no work buffer: `work` may be
// NULL here), then the strip's columns' window sums down the rows, 64 running
// sums at a time (vectorised across the strip).
#include <algorithm>
#include <vector>
#include "common.h"

extern "C" {

LF_API int lf_box_filter(int n_maps, int height, int width, int size, const float *in, double *work, float *out,
                         void *stream) {
    (void)stream;
    (void)work;  // the CPU driver keeps its own per-thread strip buffers
    LF_CHECK(n_maps >= 0 && height >= 0 && width >= 0 && size >= 1, "lf_box_filter: bad n_maps, H, W or size");
    if ((int64_t)n_maps * height * width == 0) return 0;
    LF_CHECK(in && out, "lf_box_filter: null pointer");
    LF_CHECK(in != out, "lf_box_filter: out may not alias in");
    const bool refl = lf::box_reflects(width, size) && lf::box_reflects(height, size);
    const int a = (size - 1) / 2, b = size / 2;
    const double inv = 1.0 / ((double)size * size);
    constexpr int S = lf::BOX_STRIP;
    return lfcpu::guarded("lf_box_filter", [&]() -> int {
        const int64_t strips = (width + S - 1) / S;
        lfcpu::parallel_for((int64_t)n_maps * strips, 1, [&](int64_t t0, int64_t t1, int) {
            static thread_local std::vector<double> hbuf;
            if (hbuf.size() < (size_t)height * S) hbuf.resize((size_t)height * S);
            double acc[S];
            for (int64_t t = t0; t < t1; ++t) {
                const int64_t m = t / strips;
                const int x0 = (int)(t % strips) * S, nx = std::min(S, width - x0);
                const float *src = in + m * (int64_t)height * width;
                float *o = out + m * (int64_t)height * width + x0;
                double *h = hbuf.data();  // [height][S]: the rows' window sums of the strip
                for (int y = 0; y < height; ++y)
                    lf::box_running_sums(src + (int64_t)y * width, 1, width, size, refl, x0, nx, h + (size_t)y * S, 1);
                for (int x = 0; x < nx; ++x) acc[x] = 0.0;
                for (int k = -b; k <= a; ++k) {
                    const double *row = h + (size_t)lf::box_border(k, height, refl) * S;
                    for (int x = 0; x < nx; ++x) acc[x] += row[x];
                }
                for (int x = 0; x < nx; ++x) o[x] = (float)(acc[x] * inv);
                for (int y = 1; y < height; ++y) {
                    const double *add = h + (size_t)lf::box_border(y + a, height, refl) * S;
                    const double *sub = h + (size_t)lf::box_border(y - 1 - b, height, refl) * S;
                    float *oy = o + (int64_t)y * width;
                    for (int x = 0; x < nx; ++x) {
                        acc[x] += add[x] - sub[x];
                        oy[x] = (float)(acc[x] * inv);
                    }
                }
            }
        });
        return 0;
    });
}

}  // extern "C"
