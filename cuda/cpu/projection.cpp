// CPU driver: EWA projection forward/backward, one (camera, Gaussian) pair per
// iteration (lf::project_one / lf::project_one_vjp do the math).
#include <vector>
#include "common.h"

extern "C" {

LF_API int lf_project_fwd(int C, int N, const float *means, const float *quats, const float *scales,
                          const float *opacities, const float *viewmats, const float *Ks, int width,
                          int height, float eps2d, float near_plane, float far_plane, float radius_clip,
                          int32_t *radii, float *means2d, float *depths, float *conics,
                          float *compensations, void *stream) {
    (void)stream;
    LF_CHECK(C >= 0 && N >= 0, "lf_project_fwd: negative C or N");
    LF_CHECK(width > 0 && height > 0, "lf_project_fwd: width and height must be positive");
    const int64_t total = (int64_t)C * N;
    if (total == 0) return 0;
    LF_CHECK(means && quats && scales && viewmats && Ks && radii && means2d && depths && conics,
             "lf_project_fwd: null pointer");
    const bool comp = compensations != nullptr;
    lfcpu::parallel_for(total, 2048, [&](int64_t b, int64_t e, int) {
    for (int64_t idx = b; idx < e; ++idx) {
        const int64_t c = idx / N, g = idx % N;
        lf::ProjOut o = lf::project_one(means + g * 3, quats + g * 4, scales + g * 3,
                                        opacities ? opacities + g : nullptr, viewmats + c * 16, Ks + c * 9,
                                        width, height, eps2d, near_plane, far_plane, radius_clip, comp);
        radii[idx * 2] = o.rx;
        radii[idx * 2 + 1] = o.ry;
        means2d[idx * 2] = o.mean2d.x;
        means2d[idx * 2 + 1] = o.mean2d.y;
        depths[idx] = o.depth;
        conics[idx * 3] = o.conic[0];
        conics[idx * 3 + 1] = o.conic[1];
        conics[idx * 3 + 2] = o.conic[2];
        if (comp) compensations[idx] = o.compensation;
    }
    });
    return 0;
}

LF_API int lf_project_bwd(int C, int N, const float *means, const float *quats, const float *scales,
                          const float *viewmats, const float *Ks, int width, int height, float eps2d,
                          const int32_t *radii, const float *conics, const float *compensations,
                          const float *v_means2d, const float *v_depths, const float *v_conics,
                          const float *v_compensations, float *v_means, float *v_quats, float *v_scales,
                          float *v_viewmats, void *stream) {
    (void)stream;
    LF_CHECK(C >= 0 && N >= 0, "lf_project_bwd: negative C or N");
    if ((int64_t)C * N == 0) return 0;
    LF_CHECK(means && quats && scales && viewmats && Ks && radii && conics && v_means2d && v_depths &&
                 v_conics && v_means && v_quats && v_scales,
             "lf_project_bwd: null pointer");
    return lfcpu::guarded("lf_project_bwd", [&]() -> int {
        // Fixed chunking over Gaussians (independent of the thread count) so the
        // per-camera sums into v_viewmats are deterministic.
        const int64_t n_chunks = N < 64 ? (N > 0 ? N : 1) : 64;
        const int64_t chunk = (N + n_chunks - 1) / n_chunks;
        std::vector<double> vm_part(v_viewmats ? (size_t)n_chunks * C * 16 : 0, 0.0);
        lfcpu::parallel_for(n_chunks, 1, [&](int64_t cb, int64_t ce, int) {
        for (int64_t ch = cb; ch < ce; ++ch) {
            const int64_t g0 = ch * chunk, g1 = g0 + chunk < N ? g0 + chunk : N;
            for (int64_t g = g0; g < g1; ++g) {
                for (int64_t c = 0; c < C; ++c) {
                    const int64_t idx = c * N + g;
                    if (radii[idx * 2] <= 0 || radii[idx * 2 + 1] <= 0) continue;
                    lf::ProjGrad gr;
                    lf::project_one_vjp(means + g * 3, quats + g * 4, scales + g * 3, viewmats + c * 16,
                                        Ks + c * 9, width, height, eps2d, conics + idx * 3,
                                        compensations ? compensations + idx : nullptr, v_means2d + idx * 2,
                                        v_depths[idx], v_conics + idx * 3,
                                        v_compensations ? v_compensations + idx : nullptr, gr,
                                        v_viewmats != nullptr);
                    for (int k = 0; k < 3; ++k) v_means[g * 3 + k] += gr.v_mean[k];
                    for (int k = 0; k < 4; ++k) v_quats[g * 4 + k] += gr.v_quat[k];
                    for (int k = 0; k < 3; ++k) v_scales[g * 3 + k] += gr.v_scale[k];
                    if (v_viewmats) {
                        double *dst = vm_part.data() + ((size_t)ch * C + c) * 16;
                        for (int k = 0; k < 12; ++k) dst[k] += gr.v_viewmat[k];
                    }
                }
            }
        }
        });
        if (v_viewmats) {
            for (int64_t c = 0; c < C; ++c)
                for (int k = 0; k < 12; ++k) {
                    double acc = 0.0;
                    for (int64_t ch = 0; ch < n_chunks; ++ch) acc += vm_part[((size_t)ch * C + c) * 16 + k];
                    v_viewmats[c * 16 + k] += (float)acc;
                }
        }
        return 0;
    });
}

}  // extern "C"
