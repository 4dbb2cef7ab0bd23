// langfield CUDA backend: the extern "C" entry points of langfield_abi.h.
//
// Each entry point validates its arguments (sizes, tile size, required
// pointers), makes the device that owns the data current for the duration
// of the call (the caller's torch tensors may live on any visible device),
// and calls the launcher of the corresponding .cu file. Every CUDA call and
// kernel launch is checked; failures return non-zero with a message for
// lf_last_error(). All work is queued on the caller's stream; only
// lf_isect_count synchronises it (its total is a host value).
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <atomic>
#include <string>

#include "common.cuh"

namespace lfc {

namespace {
thread_local std::string g_last_error;
}  // namespace

int set_error(int code, const char *fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    g_last_error.assign(buf);
    return code;
}

int cuda_fail(cudaError_t err, const char *what, const char *file, int line) {
    // clear a non-sticky error so that later calls do not report it again
    (void)cudaGetLastError();
    const char *base = strrchr(file, '/');
    return set_error(LF_ERR_CUDA, "CUDA error %d (%s: %s) in %s at %s:%d", (int)err,
                     cudaGetErrorName(err), cudaGetErrorString(err), what,
                     base ? base + 1 : file, line);
}

namespace {

constexpr int64_t kInt32Max = 2147483647;

// LANGFIELD_CUDA_SYNC, read once when the library is loaded (static
// initialisation); lf_cuda_set_sync() changes it later.
int sync_from_env() {
    const char *v = getenv("LANGFIELD_CUDA_SYNC");
    return (v != nullptr && v[0] != '\0' && strcmp(v, "0") != 0) ? 1 : 0;
}
std::atomic<int> g_sync{sync_from_env()};

}  // namespace

bool sync_after_launch() { return g_sync.load(std::memory_order_relaxed) != 0; }

int check_raster_grid(const char *fn, int64_t n_blocks) {
    if (n_blocks > kInt32Max)
        return set_error(LF_ERR_ARG,
                         "%s: C * tile_width * tile_height = %lld blocks exceeds the int32 range "
                         "(use fewer cameras per call or a larger tile_size)",
                         fn, (long long)n_blocks);
    int dev = 0, max_x = 0;
    LFC_CHECK(cudaGetDevice(&dev));
    LFC_CHECK(cudaDeviceGetAttribute(&max_x, cudaDevAttrMaxGridDimX, dev));
    if (n_blocks > (int64_t)max_x)
        return set_error(LF_ERR_ARG,
                         "%s: C * tile_width * tile_height = %lld blocks exceeds the device's "
                         "grid x limit %d (use fewer cameras per call or a larger tile_size)",
                         fn, (long long)n_blocks, max_x);
    return LF_OK;
}

namespace {

// Makes the device that owns `ptr` current for the scope of an ABI call and
// restores the previous one afterwards. Rejects pageable host memory.
class DeviceGuard {
  public:
    DeviceGuard() = default;
    ~DeviceGuard() {
        if (prev_ >= 0) cudaSetDevice(prev_);
    }
    DeviceGuard(const DeviceGuard &) = delete;
    DeviceGuard &operator=(const DeviceGuard &) = delete;

    int enter(const char *fn, const void *ptr) {
        if (ptr == nullptr) return LF_OK;
        cudaPointerAttributes attr;
        LFC_CHECK(cudaPointerGetAttributes(&attr, ptr));
        if (attr.type == cudaMemoryTypeUnregistered)
            return set_error(LF_ERR_ARG,
                             "%s: got a host pointer; the CUDA backend expects device memory", fn);
        if (attr.device < 0) return LF_OK;
        int cur = -1;
        LFC_CHECK(cudaGetDevice(&cur));
        if (cur != attr.device) {
            LFC_CHECK(cudaSetDevice(attr.device));
            prev_ = cur;
        }
        return LF_OK;
    }

  private:
    int prev_ = -1;
};

#define LFC_REQUIRE(cond, ...)                                                 \
    do {                                                                       \
        if (!(cond)) return ::lfc::set_error(::lfc::LF_ERR_ARG, __VA_ARGS__);  \
    } while (0)

#define LFC_NONNULL(fn, ptr)                                                   \
    LFC_REQUIRE((ptr) != nullptr, "%s: required pointer '%s' is NULL", fn, #ptr)

#define LFC_ENTER(fn, ptr)                                                     \
    DeviceGuard lfc_guard_;                                                    \
    do {                                                                       \
        int lfc_rc_ = lfc_guard_.enter(fn, ptr);                               \
        if (lfc_rc_) return lfc_rc_;                                           \
    } while (0)

int check_pairs(const char *fn, int C, int N) {
    LFC_REQUIRE(C >= 0 && N >= 0, "%s: negative size C=%d N=%d", fn, C, N);
    LFC_REQUIRE((int64_t)C * N <= kInt32Max,
                "%s: C*N = %lld exceeds the int32 range of flatten ids", fn,
                (long long)C * N);
    return LF_OK;
}

int check_tiles(const char *fn, int tile_size, int tile_width, int tile_height) {
    LFC_REQUIRE(tile_size >= 1 && tile_size <= 32,
                "%s: tile_size must be in 1..32 (one thread per pixel), got %d", fn,
                tile_size);
    LFC_REQUIRE(tile_width >= 0 && tile_height >= 0, "%s: negative tile grid %dx%d", fn,
                tile_width, tile_height);
    LFC_REQUIRE((int64_t)tile_width * tile_height <= kInt32Max, "%s: tile grid too large",
                fn);
    return LF_OK;
}

#define LFC_TRY(expr)                                                          \
    do {                                                                       \
        int lfc_rc_ = (expr);                                                  \
        if (lfc_rc_) return lfc_rc_;                                           \
    } while (0)

int check_raster(const char *fn, int C, int N, int D, int width, int height, int tile_size,
                 int tile_width, int tile_height, int64_t n_isects) {
    LFC_TRY(check_pairs(fn, C, N));
    LFC_TRY(check_tiles(fn, tile_size, tile_width, tile_height));
    LFC_REQUIRE(D >= 1, "%s: D must be >= 1, got %d", fn, D);
    LFC_REQUIRE(D / kMaxChunk <= 65535, "%s: D = %d channels is too many", fn, D);
    LFC_REQUIRE(width >= 0 && height >= 0, "%s: negative image size %dx%d", fn, width,
                height);
    LFC_REQUIRE(tile_width == (width + tile_size - 1) / tile_size &&
                    tile_height == (height + tile_size - 1) / tile_size,
                "%s: tile grid %dx%d does not match image %dx%d with tile_size %d", fn,
                tile_width, tile_height, width, height, tile_size);
    LFC_REQUIRE(n_isects >= 0 && n_isects <= kInt32Max,
                "%s: n_isects = %lld out of range [0, 2^31)", fn, (long long)n_isects);
    return LF_OK;
}

}  // namespace
}  // namespace lfc

using namespace lfc;

extern "C" {

int lf_abi_version(void) { return LF_ABI_VERSION; }

// Not part of langfield_abi.h: declared (and exported) in common.cuh.
int lf_cuda_set_sync(int on) {
    if (on < 0) return g_sync.load();
    return g_sync.exchange(on ? 1 : 0);
}

const char *lf_last_error(void) { return g_last_error.c_str(); }

int lf_num_threads(void) {
    int n = 0;
    cudaError_t err = cudaGetDeviceCount(&n);
    if (err != cudaSuccess) {
        cuda_fail(err, "cudaGetDeviceCount", __FILE__, __LINE__);
        return 0;
    }
    return n;
}

int lf_project_fwd(int C, int N, const float *means, const float *quats, const float *scales,
                   const float *opacities, const float *viewmats, const float *Ks, int width,
                   int height, float eps2d, float near_plane, float far_plane,
                   float radius_clip, int32_t *radii, float *means2d, float *depths,
                   float *conics, float *compensations, void *stream) {
    const char *fn = "lf_project_fwd";
    LFC_TRY(check_pairs(fn, C, N));
    LFC_REQUIRE(width >= 0 && height >= 0, "%s: negative image size %dx%d", fn, width, height);
    if ((int64_t)C * N == 0) return LF_OK;
    LFC_NONNULL(fn, means);
    LFC_NONNULL(fn, quats);
    LFC_NONNULL(fn, scales);
    LFC_NONNULL(fn, viewmats);
    LFC_NONNULL(fn, Ks);
    LFC_NONNULL(fn, radii);
    LFC_NONNULL(fn, means2d);
    LFC_NONNULL(fn, depths);
    LFC_NONNULL(fn, conics);
    LFC_ENTER(fn, means);
    return launch_project_fwd(C, N, means, quats, scales, opacities, viewmats, Ks, width, height,
                              eps2d, near_plane, far_plane, radius_clip, radii, means2d, depths,
                              conics, compensations, static_cast<cudaStream_t>(stream));
}

int lf_project_bwd(int C, int N, const float *means, const float *quats, const float *scales,
                   const float *viewmats, const float *Ks, int width, int height, float eps2d,
                   const int32_t *radii, const float *conics, const float *compensations,
                   const float *v_means2d, const float *v_depths, const float *v_conics,
                   const float *v_compensations, float *v_means, float *v_quats,
                   float *v_scales, float *v_viewmats, void *stream) {
    const char *fn = "lf_project_bwd";
    LFC_TRY(check_pairs(fn, C, N));
    LFC_REQUIRE(width >= 0 && height >= 0, "%s: negative image size %dx%d", fn, width, height);
    if ((int64_t)C * N == 0) return LF_OK;
    LFC_NONNULL(fn, means);
    LFC_NONNULL(fn, quats);
    LFC_NONNULL(fn, scales);
    LFC_NONNULL(fn, viewmats);
    LFC_NONNULL(fn, Ks);
    LFC_NONNULL(fn, radii);
    LFC_NONNULL(fn, conics);
    LFC_NONNULL(fn, v_means2d);
    LFC_NONNULL(fn, v_depths);
    LFC_NONNULL(fn, v_conics);
    LFC_NONNULL(fn, v_means);
    LFC_NONNULL(fn, v_quats);
    LFC_NONNULL(fn, v_scales);
    LFC_ENTER(fn, means);
    return launch_project_bwd(C, N, means, quats, scales, viewmats, Ks, width, height, eps2d,
                              radii, conics, compensations, v_means2d, v_depths, v_conics,
                              v_compensations, v_means, v_quats, v_scales, v_viewmats,
                              static_cast<cudaStream_t>(stream));
}

int lf_box_filter(int n_maps, int height, int width, int size, const float *in, double *work, float *out,
                  void *stream) {
    const char *fn = "lf_box_filter";
    LFC_REQUIRE(n_maps >= 0 && height >= 0 && width >= 0 && size >= 1,
                "%s: bad n_maps=%d, H=%d, W=%d or size=%d", fn, n_maps, height, width, size);
    if ((int64_t)n_maps * height * width == 0) return LF_OK;
    LFC_REQUIRE((int64_t)n_maps * height * width <= kInt32Max, "%s: too many pixels", fn);
    LFC_NONNULL(fn, in);
    LFC_NONNULL(fn, work);
    LFC_NONNULL(fn, out);
    LFC_REQUIRE(in != out, "%s: out may not alias in", fn);
    LFC_ENTER(fn, out);
    return launch_box_filter(n_maps, height, width, size, in, work, out, static_cast<cudaStream_t>(stream));
}

int lf_sh_fwd(int degree, int M, int K, const float *dirs, const float *coeffs,
              const uint8_t *masks, float *colors, void *stream) {
    const char *fn = "lf_sh_fwd";
    LFC_REQUIRE(degree >= 0 && degree <= 3, "%s: degree must be 0..3, got %d", fn, degree);
    LFC_REQUIRE(M >= 0, "%s: negative M=%d", fn, M);
    LFC_REQUIRE(K >= (degree + 1) * (degree + 1), "%s: K=%d < (degree+1)^2 for degree %d", fn,
                K, degree);
    if (M == 0) return LF_OK;
    LFC_NONNULL(fn, dirs);
    LFC_NONNULL(fn, coeffs);
    LFC_NONNULL(fn, colors);
    LFC_ENTER(fn, coeffs);
    return launch_sh_fwd(degree, M, K, dirs, coeffs, masks, colors,
                         static_cast<cudaStream_t>(stream));
}

int lf_sh_bwd(int degree, int M, int K, const float *dirs, const float *coeffs,
              const uint8_t *masks, const float *v_colors, float *v_coeffs, float *v_dirs,
              void *stream) {
    const char *fn = "lf_sh_bwd";
    LFC_REQUIRE(degree >= 0 && degree <= 3, "%s: degree must be 0..3, got %d", fn, degree);
    LFC_REQUIRE(M >= 0, "%s: negative M=%d", fn, M);
    LFC_REQUIRE(K >= (degree + 1) * (degree + 1), "%s: K=%d < (degree+1)^2 for degree %d", fn,
                K, degree);
    if (M == 0) return LF_OK;
    LFC_NONNULL(fn, dirs);
    LFC_NONNULL(fn, coeffs);
    LFC_NONNULL(fn, v_colors);
    LFC_NONNULL(fn, v_coeffs);
    LFC_ENTER(fn, coeffs);
    return launch_sh_bwd(degree, M, K, dirs, coeffs, masks, v_colors, v_coeffs, v_dirs,
                         static_cast<cudaStream_t>(stream));
}

int lf_isect_count(int C, int N, const int32_t *radii, const float *means2d, int tile_size,
                   int tile_width, int tile_height, int64_t *cum_tiles, int64_t *n_isects,
                   void *stream) {
    const char *fn = "lf_isect_count";
    LFC_NONNULL(fn, n_isects);
    *n_isects = 0;
    LFC_TRY(check_pairs(fn, C, N));
    LFC_TRY(check_tiles(fn, tile_size, tile_width, tile_height));
    if ((int64_t)C * N == 0) return LF_OK;
    LFC_NONNULL(fn, radii);
    LFC_NONNULL(fn, means2d);
    LFC_NONNULL(fn, cum_tiles);
    LFC_ENTER(fn, radii);
    return launch_isect_count(C, N, radii, means2d, tile_size, tile_width, tile_height,
                              cum_tiles, n_isects, static_cast<cudaStream_t>(stream));
}

int lf_isect_fill(int C, int N, const int32_t *radii, const float *means2d,
                  const float *depths, int tile_size, int tile_width, int tile_height,
                  const int64_t *cum_tiles, int64_t n_isects, int64_t *isect_ids,
                  int32_t *flatten_ids, int32_t *tile_offsets, void *stream) {
    const char *fn = "lf_isect_fill";
    LFC_TRY(check_pairs(fn, C, N));
    LFC_TRY(check_tiles(fn, tile_size, tile_width, tile_height));
    LFC_REQUIRE(n_isects >= 0 && n_isects <= kInt32Max,
                "%s: n_isects = %lld out of range [0, 2^31)", fn, (long long)n_isects);
    const int64_t n_tiles_total = (int64_t)C * tile_width * tile_height;
    if (n_tiles_total == 0 && n_isects == 0) return LF_OK;
    if (n_tiles_total > 0) LFC_NONNULL(fn, tile_offsets);
    if (n_isects > 0) {
        LFC_REQUIRE((int64_t)C * N > 0, "%s: n_isects = %lld but C*N = 0", fn,
                    (long long)n_isects);
        LFC_NONNULL(fn, radii);
        LFC_NONNULL(fn, means2d);
        LFC_NONNULL(fn, depths);
        LFC_NONNULL(fn, cum_tiles);
        LFC_NONNULL(fn, isect_ids);
        LFC_NONNULL(fn, flatten_ids);
    }
    LFC_ENTER(fn, n_tiles_total > 0 ? (const void *)tile_offsets : (const void *)isect_ids);
    return launch_isect_fill(C, N, radii, means2d, depths, tile_size, tile_width, tile_height,
                             cum_tiles, n_isects, isect_ids, flatten_ids, tile_offsets,
                             static_cast<cudaStream_t>(stream));
}

int lf_rasterize_fwd(int C, int N, int D, int width, int height, int tile_size,
                     int tile_width, int tile_height, const float *means2d,
                     const float *conics, const float *colors, const float *opacities,
                     const float *backgrounds, const int32_t *tile_offsets,
                     const int32_t *flatten_ids, int64_t n_isects, float *render_colors,
                     float *render_alphas, int32_t *last_ids, void *stream) {
    const char *fn = "lf_rasterize_fwd";
    LFC_TRY(check_raster(fn, C, N, D, width, height, tile_size, tile_width, tile_height,
                         n_isects));
    if ((int64_t)C * width * height == 0) return LF_OK;
    LFC_NONNULL(fn, tile_offsets);
    LFC_NONNULL(fn, render_colors);
    LFC_NONNULL(fn, render_alphas);
    LFC_NONNULL(fn, last_ids);
    if (n_isects > 0) {
        LFC_NONNULL(fn, means2d);
        LFC_NONNULL(fn, conics);
        LFC_NONNULL(fn, colors);
        LFC_NONNULL(fn, opacities);
        LFC_NONNULL(fn, flatten_ids);
    }
    LFC_ENTER(fn, render_colors);
    RasterArgs a{C,       N,      D,      width,       height,      tile_size,
                 tile_width, tile_height, means2d, conics, colors, opacities,
                 backgrounds, tile_offsets, flatten_ids, (int32_t)n_isects};
    return launch_rasterize_fwd(a, render_colors, render_alphas, last_ids,
                                static_cast<cudaStream_t>(stream));
}

int lf_rasterize_bwd(int C, int N, int D, int width, int height, int tile_size,
                     int tile_width, int tile_height, const float *means2d,
                     const float *conics, const float *colors, const float *opacities,
                     const float *backgrounds, const int32_t *tile_offsets,
                     const int32_t *flatten_ids, int64_t n_isects, const float *render_alphas,
                     const int32_t *last_ids, const float *v_render_colors,
                     const float *v_render_alphas, float *v_means2d, float *v_means2d_abs,
                     float *v_conics, float *v_colors, float *v_opacities,
                     float *v_backgrounds, void *stream) {
    const char *fn = "lf_rasterize_bwd";
    LFC_TRY(check_raster(fn, C, N, D, width, height, tile_size, tile_width, tile_height,
                         n_isects));
    if ((int64_t)C * width * height == 0) return LF_OK;
    LFC_NONNULL(fn, tile_offsets);
    LFC_NONNULL(fn, render_alphas);
    LFC_NONNULL(fn, last_ids);
    LFC_NONNULL(fn, v_render_colors);
    LFC_NONNULL(fn, v_render_alphas);
    if (n_isects > 0) {
        LFC_NONNULL(fn, means2d);
        LFC_NONNULL(fn, conics);
        LFC_NONNULL(fn, colors);
        LFC_NONNULL(fn, opacities);
        LFC_NONNULL(fn, flatten_ids);
        LFC_NONNULL(fn, v_means2d);
        LFC_NONNULL(fn, v_conics);
        LFC_NONNULL(fn, v_colors);
        LFC_NONNULL(fn, v_opacities);
    }
    LFC_ENTER(fn, v_render_colors);
    RasterArgs a{C,       N,      D,      width,       height,      tile_size,
                 tile_width, tile_height, means2d, conics, colors, opacities,
                 backgrounds, tile_offsets, flatten_ids, (int32_t)n_isects};
    return launch_rasterize_bwd(a, render_alphas, last_ids, v_render_colors, v_render_alphas,
                                v_means2d, v_means2d_abs, v_conics, v_colors, v_opacities,
                                v_backgrounds, static_cast<cudaStream_t>(stream));
}

}  // extern "C"
