// Spherical harmonics, forward and backward: one thread per element m, 256
// threads per block. Each thread owns colors[m], v_coeffs[m] and v_dirs[m],
// so no atomics are needed (lf::sh_eval_vjp adds into them).
#include "common.cuh"

namespace lfc {

__global__ void sh_fwd_kernel(int degree, int M, int K, const float *__restrict__ dirs,
                              const float *__restrict__ coeffs,
                              const uint8_t *__restrict__ masks,
                              float *__restrict__ colors) {
    const int64_t m = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (m >= M) return;
    if (masks && masks[m] == 0) return;
    lf::sh_eval(degree, K, dirs + 3 * m, coeffs + m * K * 3, colors + 3 * m);
}

__global__ void sh_bwd_kernel(int degree, int M, int K, const float *__restrict__ dirs,
                              const float *__restrict__ coeffs,
                              const uint8_t *__restrict__ masks,
                              const float *__restrict__ v_colors,
                              float *__restrict__ v_coeffs, float *__restrict__ v_dirs) {
    const int64_t m = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (m >= M) return;
    if (masks && masks[m] == 0) return;
    lf::sh_eval_vjp(degree, K, dirs + 3 * m, coeffs + m * K * 3, v_colors + 3 * m,
                    v_coeffs + m * K * 3, v_dirs ? v_dirs + 3 * m : nullptr);
}

int launch_sh_fwd(int degree, int M, int K, const float *dirs,
                  const float *coeffs, const uint8_t *masks, float *colors,
                  cudaStream_t stream) {
    if (M == 0) return LF_OK;
    sh_fwd_kernel<<<grid_for(M, kBlock), kBlock, 0, stream>>>(degree, M, K, dirs, coeffs,
                                                              masks, colors);
    LFC_CHECK_LAUNCH("sh_fwd_kernel", stream);
    return LF_OK;
}

int launch_sh_bwd(int degree, int M, int K, const float *dirs,
                  const float *coeffs, const uint8_t *masks,
                  const float *v_colors, float *v_coeffs, float *v_dirs,
                  cudaStream_t stream) {
    if (M == 0) return LF_OK;
    sh_bwd_kernel<<<grid_for(M, kBlock), kBlock, 0, stream>>>(degree, M, K, dirs, coeffs,
                                                              masks, v_colors, v_coeffs,
                                                              v_dirs);
    LFC_CHECK_LAUNCH("sh_bwd_kernel", stream);
    return LF_OK;
}

}  // namespace lfc
