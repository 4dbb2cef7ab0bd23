// langfield native renderer: the C ABI shared by the CPU and the CUDA library.
//
// Both backends (liblangfield_cpu.so built by g++, liblangfield_cuda.so built by
// nvcc) export exactly these symbols. Pointers are host memory for the CPU
// library and device memory for the CUDA library. All float tensors are
// float32, row-major and contiguous. `stream` is a cudaStream_t for the CUDA
// library and ignored by the CPU one.
//
// Conventions follow gsplat 1.5.3: OpenCV camera (+z forward), viewmats are
// world-to-camera [C,4,4], Ks [C,3,3], quats wxyz (normalised inside), scales
// are activated (not log), opacities in [0,1], pixel centres at +0.5.
//
// Gradient outputs ("v_*") must be zero-initialised by the caller: every
// backward function ADDS into them.
//
// Every function returns 0 on success and a non-zero code on failure; the
// message is available from lf_last_error() (thread-local).
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define LF_API __attribute__((visibility("default")))
#define LF_ABI_VERSION 1

LF_API int lf_abi_version(void);
LF_API const char *lf_last_error(void);
// CPU: number of OpenMP threads used; CUDA: number of visible devices.
LF_API int lf_num_threads(void);

// ---------------------------------------------------------------- projection
// EWA projection of N Gaussians into C pinhole cameras. Culled pairs (behind
// near/far, degenerate 2D covariance, opacity below 1/255, outside the image)
// get radii = 0 and zeros in every other output.
LF_API int lf_project_fwd(
    int C, int N,
    const float *means,      // [N,3]
    const float *quats,      // [N,4] wxyz, need not be normalised
    const float *scales,     // [N,3] activated
    const float *opacities,  // [N] or NULL (NULL: radius uses extend 3.33)
    const float *viewmats,   // [C,4,4] world-to-camera
    const float *Ks,         // [C,3,3]
    int width, int height, float eps2d, float near_plane, float far_plane,
    float radius_clip,
    int32_t *radii,          // out [C,N,2]
    float *means2d,          // out [C,N,2]
    float *depths,           // out [C,N] camera-space z
    float *conics,           // out [C,N,3] inverse 2D covariance (a, b, c)
    float *compensations,    // out [C,N] or NULL (antialiased mode)
    void *stream);

LF_API int lf_project_bwd(
    int C, int N,
    const float *means, const float *quats, const float *scales,
    const float *viewmats, const float *Ks,
    int width, int height, float eps2d,
    const int32_t *radii,           // [C,N,2] from forward
    const float *conics,            // [C,N,3] from forward
    const float *compensations,     // [C,N] or NULL
    const float *v_means2d,         // [C,N,2]
    const float *v_depths,          // [C,N]
    const float *v_conics,          // [C,N,3]
    const float *v_compensations,   // [C,N] or NULL
    float *v_means,                 // out [N,3]
    float *v_quats,                 // out [N,4]
    float *v_scales,                // out [N,3]
    float *v_viewmats,              // out [C,4,4] or NULL
    void *stream);

// ------------------------------------------------------- spherical harmonics
// colors[m] = sum_k Y_k(normalize(dirs[m])) * coeffs[m,k]   (degree 0..3)
// Only the first (degree+1)^2 of the K coefficients are used. masks[m] == 0
// skips element m (its outputs stay untouched). No +0.5 offset and no clamp:
// that is done by the caller.
LF_API int lf_sh_fwd(int degree, int M, int K,
                     const float *dirs,     // [M,3]
                     const float *coeffs,   // [M,K,3]
                     const uint8_t *masks,  // [M] or NULL
                     float *colors,         // out [M,3]
                     void *stream);
LF_API int lf_sh_bwd(int degree, int M, int K,
                     const float *dirs, const float *coeffs,
                     const uint8_t *masks,
                     const float *v_colors,  // [M,3]
                     float *v_coeffs,        // out [M,K,3]
                     float *v_dirs,          // out [M,3] or NULL
                     void *stream);

// ---------------------------------------------------------- tile intersection
// Step 1: number of tiles touched by every (camera, gaussian) pair, written as
// an inclusive prefix sum into cum_tiles [C*N]; the total into *n_isects
// (host memory in both backends).
LF_API int lf_isect_count(int C, int N,
                          const int32_t *radii,   // [C,N,2]
                          const float *means2d,   // [C,N,2]
                          int tile_size, int tile_width, int tile_height,
                          int64_t *cum_tiles,     // out [C*N]
                          int64_t *n_isects,      // out (host) scalar
                          void *stream);
// Step 2: fill and sort the intersections by (camera, tile, depth); ties keep
// the (camera, gaussian, tile) generation order. flatten_ids hold c*N+g.
// tile_offsets[t] is the first sorted intersection of tile t
// (t = (c*tile_height + ty)*tile_width + tx); a tile ends where the next
// begins, the last one at n_isects.
LF_API int lf_isect_fill(int C, int N,
                         const int32_t *radii, const float *means2d,
                         const float *depths,
                         int tile_size, int tile_width, int tile_height,
                         const int64_t *cum_tiles, int64_t n_isects,
                         int64_t *isect_ids,     // out [n_isects] sorted keys
                         int32_t *flatten_ids,   // out [n_isects]
                         int32_t *tile_offsets,  // out [C*tile_height*tile_width]
                         void *stream);

// ------------------------------------------------------------ rasterization
// Front-to-back alpha blending of D channels (any D >= 1, chosen at run time).
// colors [C,N,D] and opacities [C,N] are per camera (the caller expands).
// last_ids receives, per pixel, the index into the sorted intersections of
// the last Gaussian blended, or -1.
LF_API int lf_rasterize_fwd(
    int C, int N, int D, int width, int height, int tile_size,
    int tile_width, int tile_height,
    const float *means2d,       // [C,N,2]
    const float *conics,        // [C,N,3]
    const float *colors,        // [C,N,D]
    const float *opacities,     // [C,N]
    const float *backgrounds,   // [C,D] or NULL
    const int32_t *tile_offsets, const int32_t *flatten_ids, int64_t n_isects,
    float *render_colors,       // out [C,H,W,D]
    float *render_alphas,       // out [C,H,W]
    int32_t *last_ids,          // out [C,H,W]
    void *stream);

LF_API int lf_rasterize_bwd(
    int C, int N, int D, int width, int height, int tile_size,
    int tile_width, int tile_height,
    const float *means2d, const float *conics, const float *colors,
    const float *opacities, const float *backgrounds,
    const int32_t *tile_offsets, const int32_t *flatten_ids, int64_t n_isects,
    const float *render_alphas,   // [C,H,W] from forward
    const int32_t *last_ids,      // [C,H,W] from forward
    const float *v_render_colors, // [C,H,W,D]
    const float *v_render_alphas, // [C,H,W]
    float *v_means2d,             // out [C,N,2]
    float *v_means2d_abs,         // out [C,N,2] or NULL (absgrad)
    float *v_conics,              // out [C,N,3]
    float *v_colors,              // out [C,N,D]
    float *v_opacities,           // out [C,N]
    float *v_backgrounds,         // out [C,D] or NULL
    void *stream);
// CPU library: v_means2d, v_conics and v_opacities may all be NULL together
// (with v_means2d_abs NULL): only the colour (and background) gradients are
// computed, which skips most of the work (frozen geometry, e.g. training
// language features on a fixed scene). The CUDA library needs all three.

// ------------------------------------------------- sparse channels (codebook)
// Every Gaussian carries K (channel, weight) pairs into L output channels
// (sp_idx in [0, L), or -1 for an unused pair; e.g. the top-k coefficients of
// a sparse codebook, level offsets included). The blend is exactly the dense
// one of lf_rasterize_fwd with colors[c,g,:] = scatter(sp_idx, sp_w) (same
// alpha, skip and stop rules, background 0), but a (pixel, Gaussian) pair
// costs K scattered adds instead of L. sp_idx / sp_w are [C,N,K].
LF_API int lf_rasterize_sparse_fwd(
    int C, int N, int K, int L, int width, int height, int tile_size,
    int tile_width, int tile_height,
    const float *means2d,       // [C,N,2]
    const float *conics,        // [C,N,3]
    const int32_t *sp_idx,      // [C,N,K]
    const float *sp_w,          // [C,N,K]
    const float *opacities,     // [C,N]
    const int32_t *tile_offsets, const int32_t *flatten_ids, int64_t n_isects,
    float *render,              // out [C,H,W,L]
    float *render_alphas,       // out [C,H,W]
    int32_t *last_ids,          // out [C,H,W]
    void *stream);
// Gradient of the weights only (geometry and opacities are constants here):
// v_sp_w[c,g,j] += sum_pixels alpha T v_render[pixel, sp_idx[c,g,j]].
LF_API int lf_rasterize_sparse_bwd(
    int C, int N, int K, int L, int width, int height, int tile_size,
    int tile_width, int tile_height,
    const float *means2d, const float *conics, const int32_t *sp_idx,
    const float *opacities,
    const int32_t *tile_offsets, const int32_t *flatten_ids, int64_t n_isects,
    const int32_t *last_ids,      // [C,H,W] from forward
    const float *v_render,        // [C,H,W,L]
    float *v_sp_w,                // out [C,N,K]
    void *stream);

// Relevancy without the coefficient maps (a sparse codebook's text query, fused):
// blends the K (channel, weight) pairs of every Gaussian into per-pixel
// coefficients z (channels [0, n_levels * L): level l owns [l L, (l+1) L)),
// as lf_rasterize_sparse_fwd does, but keeps them in the tile and writes, per
// level and pixel, the LERF relevancy of Q queries:
//   s_m = (z A[:, m]) / max(sqrt(z G z), 1e-12)       (cosines of normalize(z C))
//   rel_q = sigmoid(temperature * (s_q - max_{m >= Q} s_m))
// with A = C E^T [L, M] (codebook-to-embedding cosines: Q queries, then M - Q
// canonical phrases) and G = C C^T [L, L]; 0 where the pixel's alpha is not
// above min_alpha. Only the codebook entries a tile uses enter its quadratic
// form. Optionally (D > 0) D dense channels colors [C,N,D] are blended in the
// same pass (with backgrounds [C,D] or NULL), exactly as lf_rasterize_fwd
// renders them. No gradients.
LF_API int lf_rasterize_sparse_relevancy_fwd(
    int C, int N, int K, int n_levels, int L, int M, int Q, int D, int width, int height, int tile_size,
    int tile_width, int tile_height,
    const float *means2d, const float *conics, const int32_t *sp_idx, const float *sp_w,
    const float *opacities,
    const float *colors,          // [C,N,D] or NULL when D == 0
    const float *backgrounds,     // [C,D] or NULL
    const int32_t *tile_offsets, const int32_t *flatten_ids, int64_t n_isects,
    const float *A,               // [L,M]
    const float *G,               // [L,L]
    float temperature, float min_alpha,
    float *render,                // out [C,H,W,D] or NULL when D == 0
    float *relevancy,             // out [C,Q,n_levels,H,W]
    float *render_alphas,         // out [C,H,W]
    int32_t *last_ids,            // out [C,H,W], or NULL: not tracked (cheaper)
    void *stream);

// ------------------------------------------------------------------ box filter
// The mean over size x size windows of n_maps maps [n_maps,H,W] (lf_math.h's
// box_border: reflect-101 borders; replicated when an axis is not longer than
// the half-window), as the relevancy maps' smoothing uses it: window sums run along
// the rows, then down the columns, in double (work: [n_maps,H,W] doubles), so
// the result is the exact window mean rounded to float, whatever the size.
LF_API int lf_box_filter(int n_maps, int height, int width, int size,
                         const float *in,   // [n_maps,H,W]
                         double *work,      // [n_maps,H,W] scratch (CUDA; the CPU driver: may be NULL)
                         float *out,        // [n_maps,H,W] (may not alias in)
                         void *stream);

#ifdef __cplusplus
}
#endif
