// EWA projection, forward and backward: one thread per (camera, Gaussian)
// pair, idx = c*N + n, 256 threads per block. The math is lf::project_one /
// lf::project_one_vjp (lf_math.h).
//
// Backward reductions: v_means / v_quats / v_scales are per Gaussian (shared
// by the C cameras) and are added with one atomicAdd per thread and value.
// v_viewmats is per camera and shared by up to N threads, so the 12
// non-zero entries (rows 0..2) are first summed over the warp with shuffles
// and lane 0 issues one atomicAdd per entry; a warp that straddles two
// cameras (only at camera boundaries) falls back to per-thread atomics.
#include "common.cuh"

namespace lfc {

__global__ void project_fwd_kernel(int C, int N, const float *__restrict__ means,
                                   const float *__restrict__ quats,
                                   const float *__restrict__ scales,
                                   const float *__restrict__ opacities,
                                   const float *__restrict__ viewmats,
                                   const float *__restrict__ Ks, int width, int height,
                                   float eps2d, float near_plane, float far_plane,
                                   float radius_clip, int32_t *__restrict__ radii,
                                   float *__restrict__ means2d, float *__restrict__ depths,
                                   float *__restrict__ conics,
                                   float *__restrict__ compensations) {
    const int64_t total = (int64_t)C * N;
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= total) return;
    const int c = (int)(idx / N), n = (int)(idx % N);
    lf::ProjOut o = lf::project_one(means + 3 * (int64_t)n, quats + 4 * (int64_t)n,
                                    scales + 3 * (int64_t)n,
                                    opacities ? opacities + n : nullptr,
                                    viewmats + 16 * (int64_t)c, Ks + 9 * (int64_t)c, width,
                                    height, eps2d, near_plane, far_plane, radius_clip,
                                    compensations != nullptr);
    radii[2 * idx + 0] = o.rx;
    radii[2 * idx + 1] = o.ry;
    means2d[2 * idx + 0] = o.mean2d.x;
    means2d[2 * idx + 1] = o.mean2d.y;
    depths[idx] = o.depth;
    conics[3 * idx + 0] = o.conic[0];
    conics[3 * idx + 1] = o.conic[1];
    conics[3 * idx + 2] = o.conic[2];
    if (compensations) compensations[idx] = o.compensation;
}

__global__ void project_bwd_kernel(
    int C, int N, const float *__restrict__ means, const float *__restrict__ quats,
    const float *__restrict__ scales, const float *__restrict__ viewmats,
    const float *__restrict__ Ks, int width, int height, float eps2d,
    const int32_t *__restrict__ radii, const float *__restrict__ conics,
    const float *__restrict__ compensations, const float *__restrict__ v_means2d,
    const float *__restrict__ v_depths, const float *__restrict__ v_conics,
    const float *__restrict__ v_compensations, float *__restrict__ v_means,
    float *__restrict__ v_quats, float *__restrict__ v_scales,
    float *__restrict__ v_viewmats) {
    const int64_t total = (int64_t)C * N;
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    // No early return: every lane takes part in the warp reduction below.
    const bool in_range = idx < total;
    const int64_t cidx = in_range ? idx : total - 1;
    const int c = (int)(cidx / N), n = (int)(cidx % N);
    // Culled pairs have radii (0, 0); like the tile intersection we only
    // treat pairs with both radii > 0 as visible.
    const bool valid = in_range && radii[2 * idx] > 0 && radii[2 * idx + 1] > 0;

    float vv[12];
#pragma unroll
    for (int k = 0; k < 12; ++k) vv[k] = 0.f;

    if (valid) {
        lf::ProjGrad g;
        lf::project_one_vjp(means + 3 * (int64_t)n, quats + 4 * (int64_t)n,
                            scales + 3 * (int64_t)n, viewmats + 16 * (int64_t)c,
                            Ks + 9 * (int64_t)c, width, height, eps2d, conics + 3 * idx,
                            compensations ? compensations + idx : nullptr,
                            v_means2d + 2 * idx, v_depths[idx], v_conics + 3 * idx,
                            v_compensations ? v_compensations + idx : nullptr, g,
                            v_viewmats != nullptr);
        float *vm = v_means + 3 * (int64_t)n;
        float *vq = v_quats + 4 * (int64_t)n;
        float *vs = v_scales + 3 * (int64_t)n;
        atomicAdd(vm + 0, g.v_mean[0]);
        atomicAdd(vm + 1, g.v_mean[1]);
        atomicAdd(vm + 2, g.v_mean[2]);
        atomicAdd(vq + 0, g.v_quat[0]);
        atomicAdd(vq + 1, g.v_quat[1]);
        atomicAdd(vq + 2, g.v_quat[2]);
        atomicAdd(vq + 3, g.v_quat[3]);
        atomicAdd(vs + 0, g.v_scale[0]);
        atomicAdd(vs + 1, g.v_scale[1]);
        atomicAdd(vs + 2, g.v_scale[2]);
        if (v_viewmats != nullptr) {
#pragma unroll
            for (int k = 0; k < 12; ++k) vv[k] = g.v_viewmat[k];  // rows 0..2
        }
    }

    if (v_viewmats == nullptr) return;  // grid-uniform
    const int c0 = __shfl_sync(kFullMask, c, 0);
    if (__all_sync(kFullMask, c == c0)) {
        if (!__any_sync(kFullMask, valid)) return;
#pragma unroll
        for (int k = 0; k < 12; ++k) {
            float s = warp_sum(vv[k]);
            if ((threadIdx.x & 31) == 0) atomicAdd(v_viewmats + 16 * (int64_t)c0 + k, s);
        }
    } else if (valid) {
#pragma unroll
        for (int k = 0; k < 12; ++k) atomicAdd(v_viewmats + 16 * (int64_t)c + k, vv[k]);
    }
}

int launch_project_fwd(int C, int N, const float *means, const float *quats,
                       const float *scales, const float *opacities,
                       const float *viewmats, const float *Ks, int width,
                       int height, float eps2d, float near_plane,
                       float far_plane, float radius_clip, int32_t *radii,
                       float *means2d, float *depths, float *conics,
                       float *compensations, cudaStream_t stream) {
    const int64_t total = (int64_t)C * N;
    if (total == 0) return LF_OK;
    project_fwd_kernel<<<grid_for(total, kBlock), kBlock, 0, stream>>>(
        C, N, means, quats, scales, opacities, viewmats, Ks, width, height, eps2d,
        near_plane, far_plane, radius_clip, radii, means2d, depths, conics, compensations);
    LFC_CHECK_LAUNCH("project_fwd_kernel", stream);
    return LF_OK;
}

int launch_project_bwd(int C, int N, const float *means, const float *quats,
                       const float *scales, const float *viewmats,
                       const float *Ks, int width, int height, float eps2d,
                       const int32_t *radii, const float *conics,
                       const float *compensations, const float *v_means2d,
                       const float *v_depths, const float *v_conics,
                       const float *v_compensations, float *v_means,
                       float *v_quats, float *v_scales, float *v_viewmats,
                       cudaStream_t stream) {
    const int64_t total = (int64_t)C * N;
    if (total == 0) return LF_OK;
    project_bwd_kernel<<<grid_for(total, kBlock), kBlock, 0, stream>>>(
        C, N, means, quats, scales, viewmats, Ks, width, height, eps2d, radii, conics,
        compensations, v_means2d, v_depths, v_conics, v_compensations, v_means, v_quats,
        v_scales, v_viewmats);
    LFC_CHECK_LAUNCH("project_bwd_kernel", stream);
    return LF_OK;
}

}  // namespace lfc
