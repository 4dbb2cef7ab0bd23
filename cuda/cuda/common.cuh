// langfield CUDA backend: helpers shared by every translation unit.
//
// Layout of the backend:
//   abi.cu            extern "C" entry points of langfield_abi.h: argument
//                     validation, device selection, error reporting
//   projection.cu     EWA projection forward / backward
//   sh.cu             spherical harmonics forward / backward
//   isect.cu          tile intersection: count + scan, fill + radix sort,
//                     tile offsets
//   rasterize_fwd.cu  tile rasterizer, front to back
//   rasterize_bwd.cu  tile rasterizer backward, back to front
//   filter.cu         box filter of relevancy maps (lf_box_filter)
//
// Everything except the ABI symbols lives in namespace lfc and is hidden
// (the library is built with -fvisibility=hidden). The per-pair and
// per-pixel math comes from lf_math.h, shared with the CPU driver.
//
// Debugging: LANGFIELD_CUDA_SYNC
//   With the environment variable LANGFIELD_CUDA_SYNC set to anything but ""
//   or "0" when the library is loaded, every kernel launch (LFC_CHECK_LAUNCH)
//   is followed by cudaStreamSynchronize(stream) and an error check, so that
//   a fault inside a kernel is reported (lf_last_error) by the ABI call that
//   launched it instead of by some later call. Off by default: it serialises
//   the host with the GPU and breaks CUDA graph capture. The variable is read
//   once, at load time; lf_cuda_set_sync() (below; exported by the CUDA
//   library only, not part of langfield_abi.h) switches it at run time, e.g.
//   scripts/gpu_check.py turns it on for its parity checks and off for its
//   timings via ctypes.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#include "langfield_abi.h"
#include "lf_math.h"

namespace lfc {

// Return codes of the ABI functions.
enum : int { LF_OK = 0, LF_ERR_ARG = 1, LF_ERR_CUDA = 2 };

// Sets the thread-local message returned by lf_last_error(); returns `code`.
int set_error(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
// Records a failed CUDA call and returns LF_ERR_CUDA.
int cuda_fail(cudaError_t err, const char *what, const char *file, int line);
// Whether LFC_CHECK_LAUNCH synchronises (LANGFIELD_CUDA_SYNC / lf_cuda_set_sync).
bool sync_after_launch();

#define LFC_CHECK(call)                                                         \
    do {                                                                        \
        cudaError_t lfc_err_ = (call);                                          \
        if (lfc_err_ != cudaSuccess)                                            \
            return ::lfc::cuda_fail(lfc_err_, #call, __FILE__, __LINE__);       \
    } while (0)

// After every kernel launch: launch-configuration errors (and any sticky
// error of earlier asynchronous work) surface here. With LANGFIELD_CUDA_SYNC
// the stream is also synchronised, so that faults of this kernel surface here.
#define LFC_CHECK_LAUNCH(name, strm)                                            \
    do {                                                                        \
        cudaError_t lfc_err_ = cudaGetLastError();                              \
        if (lfc_err_ != cudaSuccess)                                            \
            return ::lfc::cuda_fail(lfc_err_, "launch of " name, __FILE__,      \
                                    __LINE__);                                  \
        if (::lfc::sync_after_launch()) {                                       \
            lfc_err_ = cudaStreamSynchronize(strm);                             \
            if (lfc_err_ == cudaSuccess) lfc_err_ = cudaGetLastError();         \
            if (lfc_err_ != cudaSuccess)                                        \
                return ::lfc::cuda_fail(lfc_err_,                               \
                                        "execution of " name                    \
                                        " (LANGFIELD_CUDA_SYNC)",               \
                                        __FILE__, __LINE__);                    \
        }                                                                       \
    } while (0)

// The blocks of a rasterizer launch (C * tile_width * tile_height, grid.x)
// must fit the int32 range and the device's grid x limit.
int check_raster_grid(const char *fn, int64_t n_blocks);

constexpr int kBlock = 256;  // 1D kernels (projection, SH, isect)
constexpr unsigned kFullMask = 0xffffffffu;

inline unsigned grid_for(int64_t n, int block) {
    return (unsigned)((n + block - 1) / block);
}

// Sum over the 32 lanes of a warp; the total ends up in lane 0. Every lane
// of the warp must call it (all our warps are full: block sizes are
// multiples of 32).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(kFullMask, v, o);
    return v;
}

// ------------------------------------------------------------- launchers
// Called by abi.cu after validation, with C*N > 0 etc. (see each file).
int launch_project_fwd(int C, int N, const float *means, const float *quats,
                       const float *scales, const float *opacities,
                       const float *viewmats, const float *Ks, int width,
                       int height, float eps2d, float near_plane,
                       float far_plane, float radius_clip, int32_t *radii,
                       float *means2d, float *depths, float *conics,
                       float *compensations, cudaStream_t stream);

int launch_project_bwd(int C, int N, const float *means, const float *quats,
                       const float *scales, const float *viewmats,
                       const float *Ks, int width, int height, float eps2d,
                       const int32_t *radii, const float *conics,
                       const float *compensations, const float *v_means2d,
                       const float *v_depths, const float *v_conics,
                       const float *v_compensations, float *v_means,
                       float *v_quats, float *v_scales, float *v_viewmats,
                       cudaStream_t stream);

int launch_sh_fwd(int degree, int M, int K, const float *dirs,
                  const float *coeffs, const uint8_t *masks, float *colors,
                  cudaStream_t stream);
int launch_sh_bwd(int degree, int M, int K, const float *dirs,
                  const float *coeffs, const uint8_t *masks,
                  const float *v_colors, float *v_coeffs, float *v_dirs,
                  cudaStream_t stream);

int launch_isect_count(int C, int N, const int32_t *radii,
                       const float *means2d, int tile_size, int tile_width,
                       int tile_height, int64_t *cum_tiles, int64_t *n_isects,
                       cudaStream_t stream);
int launch_isect_fill(int C, int N, const int32_t *radii, const float *means2d,
                      const float *depths, int tile_size, int tile_width,
                      int tile_height, const int64_t *cum_tiles,
                      int64_t n_isects, int64_t *isect_ids,
                      int32_t *flatten_ids, int32_t *tile_offsets,
                      cudaStream_t stream);

struct RasterArgs {
    int C, N, D, width, height, tile_size, tile_width, tile_height;
    const float *means2d, *conics, *colors, *opacities, *backgrounds;
    const int32_t *tile_offsets, *flatten_ids;
    int32_t n_isects;
};

int launch_rasterize_fwd(const RasterArgs &a, float *render_colors,
                         float *render_alphas, int32_t *last_ids,
                         cudaStream_t stream);
int launch_rasterize_bwd(const RasterArgs &a, const float *render_alphas,
                         const int32_t *last_ids,
                         const float *v_render_colors,
                         const float *v_render_alphas, float *v_means2d,
                         float *v_means2d_abs, float *v_conics,
                         float *v_colors, float *v_opacities,
                         float *v_backgrounds, cudaStream_t stream);

// box filter (filter.cu): rows' window sums into work, then the columns'
int launch_box_filter(int n_maps, int height, int width, int size, const float *in, double *work, float *out,
                      cudaStream_t stream);

// ------------------------------------------------ rasterizer block layout
// One block per tile, one thread per pixel; the block is rounded up to a
// multiple of 32 threads so that every warp is full (extra threads own no
// pixel but still help load batches and take part in warp reductions).
inline int raster_block_threads(int tile_size) {
    int px = tile_size * tile_size;
    return (px + 31) / 32 * 32;
}

// Channels are processed in chunks of at most kMaxChunk per launch; a chunk
// of n channels uses the kernel instantiated for the smallest CH >= n in
// {1, 2, 3, 4, 8, 16, 32}. (The backward narrows its chunk to 16 or 8 when
// the 32-wide kernel's registers do not allow the block size; see
// rasterize_bwd.cu.)
constexpr int kMaxChunk = 32;
inline int chunk_instance(int n) {
    return n <= 1 ? 1 : n <= 2 ? 2 : n <= 3 ? 3 : n <= 4 ? 4 : n <= 8 ? 8 : n <= 16 ? 16 : 32;
}

}  // namespace lfc

// Debug switch of the CUDA library only (not in langfield_abi.h; the CPU
// library has no such symbol, so callers look it up optionally, e.g. with
// ctypes: getattr(lib, "lf_cuda_set_sync", None)). on > 0: synchronise and
// check after every kernel launch; on == 0: don't; on < 0: leave as is.
// Returns the previous setting (0 or 1). The initial setting comes from
// LANGFIELD_CUDA_SYNC (see the top of this file). Process-wide.
extern "C" __attribute__((visibility("default"))) int lf_cuda_set_sync(int on);
