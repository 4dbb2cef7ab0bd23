// CPU driver: spherical harmonics colours, one element per iteration.
#include "common.h"

extern "C" {

LF_API int lf_sh_fwd(int degree, int M, int K, const float *dirs, const float *coeffs, const uint8_t *masks,
                     float *colors, void *stream) {
    (void)stream;
    LF_CHECK(degree >= 0 && degree <= 3, "lf_sh_fwd: degree must be 0..3");
    LF_CHECK(K >= (degree + 1) * (degree + 1), "lf_sh_fwd: K < (degree+1)^2 coefficients");
    LF_CHECK(M >= 0, "lf_sh_fwd: negative M");
    if (M == 0) return 0;
    LF_CHECK(dirs && coeffs && colors, "lf_sh_fwd: null pointer");
    lfcpu::parallel_for(M, 4096, [&](int64_t b, int64_t e, int) {
        for (int64_t m = b; m < e; ++m) {
            if (masks && !masks[m]) continue;
            lf::sh_eval(degree, K, dirs + m * 3, coeffs + m * (int64_t)K * 3, colors + m * 3);
        }
    });
    return 0;
}

LF_API int lf_sh_bwd(int degree, int M, int K, const float *dirs, const float *coeffs, const uint8_t *masks,
                     const float *v_colors, float *v_coeffs, float *v_dirs, void *stream) {
    (void)stream;
    LF_CHECK(degree >= 0 && degree <= 3, "lf_sh_bwd: degree must be 0..3");
    LF_CHECK(K >= (degree + 1) * (degree + 1), "lf_sh_bwd: K < (degree+1)^2 coefficients");
    LF_CHECK(M >= 0, "lf_sh_bwd: negative M");
    if (M == 0) return 0;
    LF_CHECK(dirs && coeffs && v_colors && v_coeffs, "lf_sh_bwd: null pointer");
    lfcpu::parallel_for(M, 4096, [&](int64_t b, int64_t e, int) {
        for (int64_t m = b; m < e; ++m) {
            if (masks && !masks[m]) continue;
            lf::sh_eval_vjp(degree, K, dirs + m * 3, coeffs + m * (int64_t)K * 3, v_colors + m * 3,
                            v_coeffs + m * (int64_t)K * 3, v_dirs ? v_dirs + m * 3 : nullptr);
        }
    });
    return 0;
}

}  // extern "C"
