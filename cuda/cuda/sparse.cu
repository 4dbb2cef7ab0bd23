// Sparse channels (lf_rasterize_sparse_fwd / _bwd, langfield_abi.h): every
// Gaussian carries K (channel, weight) pairs into L output channels (a sparse
// codebook's top-k coefficients).
//
// Mapping as rasterize_fwd.cu: one block per (camera, tile), one thread per
// pixel, the tile's sorted intersections loaded in batches of blockDim.x into
// shared memory (flatten id, mean2d, conic, opacity). The alpha, skip and stop
// rules are the dense kernel's, instruction for instruction, so the blended
// Gaussians and their weights alpha*T agree with a dense render of the
// scattered weights. The channel update differs: a pixel's L outputs live in
// global memory (the thread zeroes its own row first; no other thread touches
// it), and each blended Gaussian adds w * weight_j to K scattered channels, so
// a (pixel, Gaussian) pair costs K read-modify-writes instead of L.
//
// Backward (weights only): each pixel thread re-runs the same front-to-back
// recurrence (no division by 1 - alpha) up to its last blended Gaussian
// (last_ids) and adds alpha T v_render[pixel, idx_j] into v_sp_w with
// atomicAdd (float atomics: the sum order, hence the last bits, may vary
// between runs, as in the dense backward).
#include "common.cuh"

namespace lfc {
namespace {

struct SparseArgs {
    int C, N, K, L, width, height, tile_size, tile_width, tile_height;
    const float *means2d, *conics, *opacities, *sp_w;
    const int32_t *sp_idx, *tile_offsets, *flatten_ids;
    int32_t n_isects;
};

// BACKWARD = false: forward (render, alphas, last_ids); true: v_sp_w.
template <bool BACKWARD>
__global__ void sparse_kernel(SparseArgs a, float *__restrict__ render, float *__restrict__ render_alphas,
                              int32_t *__restrict__ last_ids, const int32_t *__restrict__ last_in,
                              const float *__restrict__ v_render, float *__restrict__ v_sp_w) {
    extern __shared__ float smem[];
    const int bs = blockDim.x;
    int32_t *s_id = reinterpret_cast<int32_t *>(smem);
    float *s_xy = smem + bs;         // [2][bs]
    float *s_conic = s_xy + 2 * bs;  // [3][bs]
    float *s_opac = s_conic + 3 * bs;

    const int ts = a.tile_size;
    const int n_tiles = a.tile_width * a.tile_height;
    const int64_t tile = blockIdx.x;
    const int c = (int)(tile / n_tiles);
    const int tile_in_cam = (int)(tile % n_tiles);
    const int ty = tile_in_cam / a.tile_width, tx = tile_in_cam % a.tile_width;
    const int tr = threadIdx.x;

    int px = 0, py = 0;
    bool inside = false;
    if (tr < ts * ts) {
        px = tx * ts + tr % ts;
        py = ty * ts + tr / ts;
        inside = px < a.width && py < a.height;
    }
    const float cx = (float)px + 0.5f, cy = (float)py + 0.5f;
    const int64_t pix = ((int64_t)c * a.height + py) * a.width + px;

    const int64_t n_tiles_total = (int64_t)a.C * n_tiles;
    const int start = a.tile_offsets[tile];
    const int end = tile + 1 < n_tiles_total ? a.tile_offsets[tile + 1] : a.n_isects;

    float *out = nullptr;
    const float *vr = nullptr;
    int stop_at = end;  // backward: past the pixel's last blended intersection nothing blends
    if (inside) {
        if (BACKWARD) {
            vr = v_render + pix * a.L;
            stop_at = last_in[pix] + 1;
        } else {
            out = render + pix * a.L;
            for (int k = 0; k < a.L; ++k) out[k] = 0.f;
        }
    }
    float T = 1.f;
    int cur_idx = -1;
    bool done = !inside;

    const int n_batches = end > start ? (end - start + bs - 1) / bs : 0;
    for (int b = 0; b < n_batches; ++b) {
        if (__syncthreads_count(done) == bs) break;
        const int batch_start = start + b * bs;
        const int idx = batch_start + tr;
        if (idx < end) {
            const int32_t g = a.flatten_ids[idx];
            s_id[tr] = g;
            s_xy[tr] = a.means2d[2 * (int64_t)g + 0];
            s_xy[bs + tr] = a.means2d[2 * (int64_t)g + 1];
            s_conic[tr] = a.conics[3 * (int64_t)g + 0];
            s_conic[bs + tr] = a.conics[3 * (int64_t)g + 1];
            s_conic[2 * bs + tr] = a.conics[3 * (int64_t)g + 2];
            s_opac[tr] = a.opacities[g];
        }
        __syncthreads();
        const int batch_size = min(bs, end - batch_start);
        for (int j = 0; j < batch_size && !done; ++j) {
            if (BACKWARD && batch_start + j >= stop_at) {
                done = true;
                break;
            }
            const float conic[3] = {s_conic[j], s_conic[bs + j], s_conic[2 * bs + j]};
            const float dx = s_xy[j] - cx;
            const float dy = s_xy[bs + j] - cy;
            const float sigma = lf::gauss_sigma(conic, dx, dy);
            if (!(sigma >= 0.f)) continue;
            const float alpha = lf::lf_min(lf::ALPHA_MAX, s_opac[j] * expf(-sigma));
            if (!(alpha >= lf::ALPHA_THRESHOLD)) continue;
            const float next_T = T * (1.f - alpha);
            if (next_T <= lf::T_MIN) {
                done = true;
                break;
            }
            const float w = alpha * T;
            const int64_t base = (int64_t)s_id[j] * a.K;
            for (int q = 0; q < a.K; ++q) {
                const int32_t d = a.sp_idx[base + q];
                if (d < 0 || d >= a.L) continue;
                if (BACKWARD) {
                    const float v = w * vr[d];
                    if (v != 0.f) atomicAdd(v_sp_w + base + q, v);
                } else {
                    out[d] += w * a.sp_w[base + q];
                }
            }
            cur_idx = batch_start + j;
            T = next_T;
        }
    }
    if (!BACKWARD && inside) {
        render_alphas[pix] = 1.f - T;
        last_ids[pix] = cur_idx;
    }
}

int launch_sparse(const SparseArgs &a, bool backward, float *render, float *render_alphas, int32_t *last_ids,
                  const int32_t *last_in, const float *v_render, float *v_sp_w, cudaStream_t stream) {
    const int64_t n_blocks = (int64_t)a.C * a.tile_width * a.tile_height;
    if (n_blocks == 0 || (int64_t)a.width * a.height == 0) return LF_OK;
    const char *fn = backward ? "lf_rasterize_sparse_bwd" : "lf_rasterize_sparse_fwd";
    if (int rc = check_raster_grid(fn, n_blocks)) return rc;
    const int threads = raster_block_threads(a.tile_size);
    const size_t smem = (size_t)threads * (sizeof(int32_t) + 6 * sizeof(float));
    if (backward) {
        sparse_kernel<true><<<(unsigned)n_blocks, threads, smem, stream>>>(a, nullptr, nullptr, nullptr, last_in,
                                                                           v_render, v_sp_w);
        LFC_CHECK_LAUNCH("sparse_kernel<backward>", stream);
    } else {
        sparse_kernel<false><<<(unsigned)n_blocks, threads, smem, stream>>>(a, render, render_alphas, last_ids,
                                                                            nullptr, nullptr, nullptr);
        LFC_CHECK_LAUNCH("sparse_kernel<forward>", stream);
    }
    return LF_OK;
}

// Makes the device owning `ptr` current for one call (as abi.cu's guard) and
// rejects host memory.
class SparseDeviceGuard {
  public:
    SparseDeviceGuard() = default;
    ~SparseDeviceGuard() {
        if (prev_ >= 0) cudaSetDevice(prev_);
    }
    SparseDeviceGuard(const SparseDeviceGuard &) = delete;
    SparseDeviceGuard &operator=(const SparseDeviceGuard &) = delete;
    int enter(const char *fn, const void *ptr) {
        if (ptr == nullptr) return LF_OK;
        cudaPointerAttributes attr;
        LFC_CHECK(cudaPointerGetAttributes(&attr, ptr));
        if (attr.type == cudaMemoryTypeUnregistered)
            return set_error(LF_ERR_ARG, "%s: got a host pointer; the CUDA backend expects device memory", fn);
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

int check_sparse(const char *fn, int C, int N, int K, int L, int width, int height, int tile_size, int tile_width,
                 int tile_height, int64_t n_isects) {
    const int64_t i32 = 2147483647;
    if (C < 0 || N < 0 || (int64_t)C * N > i32) return set_error(LF_ERR_ARG, "%s: bad C=%d N=%d", fn, C, N);
    if (K < 1 || L < 1) return set_error(LF_ERR_ARG, "%s: K and L must be >= 1, got K=%d L=%d", fn, K, L);
    if (tile_size < 1 || tile_size > 32)
        return set_error(LF_ERR_ARG, "%s: tile_size must be in 1..32, got %d", fn, tile_size);
    if (width < 0 || height < 0) return set_error(LF_ERR_ARG, "%s: negative image size %dx%d", fn, width, height);
    if (tile_width != (width + tile_size - 1) / tile_size || tile_height != (height + tile_size - 1) / tile_size)
        return set_error(LF_ERR_ARG, "%s: tile grid %dx%d does not match image %dx%d with tile_size %d", fn,
                         tile_width, tile_height, width, height, tile_size);
    if (n_isects < 0 || n_isects > i32) return set_error(LF_ERR_ARG, "%s: bad n_isects %lld", fn, (long long)n_isects);
    return LF_OK;
}


// ---------------------------------------------------------------- relevancy
// lf_rasterize_sparse_relevancy_fwd: one block per (camera, tile, level), one
// thread per pixel. The walk is sparse_kernel's (the same alpha, skip and stop
// rules); the thread keeps its pixel's L coefficients of the block's level in a
// private array (every thread of a warp blends the same Gaussian at a time, so
// the indexed accesses are uniform across the warp) and marks the entries it
// touched in a tile-wide bit set. Then every thread scores its pixel over the
// entries the tile used: z (C e_m) and z G z (upper triangle, off-diagonal
// doubled), and writes the LERF relevancy of the Q queries. The level-0 block
// also blends the optional dense channels and writes alphas and last ids.
constexpr int kRelMaxL = 256;

struct RelArgs {
    SparseArgs s;
    int n_levels, M, Q, D;
    const float *A, *G, *colors, *backgrounds;
    float temperature, min_alpha;
};

__global__ void sparse_relevancy_kernel(RelArgs r, float *__restrict__ render, float *__restrict__ relevancy,
                                        float *__restrict__ render_alphas, int32_t *__restrict__ last_ids) {
    extern __shared__ float smem[];
    const SparseArgs &a = r.s;
    const int bs = blockDim.x;
    int32_t *s_id = reinterpret_cast<int32_t *>(smem);
    float *s_xy = smem + bs;
    float *s_conic = s_xy + 2 * bs;
    float *s_opac = s_conic + 3 * bs;
    __shared__ unsigned s_used[kRelMaxL / 32];
    __shared__ int s_act[kRelMaxL];
    __shared__ int s_n;

    const int L = a.L;  // per level
    const int level = blockIdx.y;
    const int ts = a.tile_size;
    const int n_tiles = a.tile_width * a.tile_height;
    const int64_t tile = blockIdx.x;
    const int c = (int)(tile / n_tiles);
    const int tile_in_cam = (int)(tile % n_tiles);
    const int ty = tile_in_cam / a.tile_width, tx = tile_in_cam % a.tile_width;
    const int tr = threadIdx.x;
    for (int i = tr; i < kRelMaxL / 32; i += bs) s_used[i] = 0u;

    int px = 0, py = 0;
    bool inside = false;
    if (tr < ts * ts) {
        px = tx * ts + tr % ts;
        py = ty * ts + tr / ts;
        inside = px < a.width && py < a.height;
    }
    const float cx = (float)px + 0.5f, cy = (float)py + 0.5f;
    const int64_t pix = ((int64_t)c * a.height + py) * a.width + px;
    const int64_t n_tiles_total = (int64_t)a.C * n_tiles;
    const int start = a.tile_offsets[tile];
    const int end = tile + 1 < n_tiles_total ? a.tile_offsets[tile + 1] : a.n_isects;
    const bool dense = level == 0 && r.D > 0;

    float z[kRelMaxL];
    for (int i = 0; i < L; ++i) z[i] = 0.f;
    float dacc[8];
    for (int k = 0; k < 8; ++k) dacc[k] = 0.f;
    float T = 1.f;
    int cur_idx = -1;
    bool done = !inside;
    const int lo = level * L, hi = lo + L;
    __syncthreads();

    const int n_batches = end > start ? (end - start + bs - 1) / bs : 0;
    for (int b = 0; b < n_batches; ++b) {
        if (__syncthreads_count(done) == bs) break;
        const int batch_start = start + b * bs;
        const int idx = batch_start + tr;
        if (idx < end) {
            const int32_t g = a.flatten_ids[idx];
            s_id[tr] = g;
            s_xy[tr] = a.means2d[2 * (int64_t)g + 0];
            s_xy[bs + tr] = a.means2d[2 * (int64_t)g + 1];
            s_conic[tr] = a.conics[3 * (int64_t)g + 0];
            s_conic[bs + tr] = a.conics[3 * (int64_t)g + 1];
            s_conic[2 * bs + tr] = a.conics[3 * (int64_t)g + 2];
            s_opac[tr] = a.opacities[g];
        }
        __syncthreads();
        const int batch_size = min(bs, end - batch_start);
        for (int j = 0; j < batch_size && !done; ++j) {
            const float conic[3] = {s_conic[j], s_conic[bs + j], s_conic[2 * bs + j]};
            const float dx = s_xy[j] - cx;
            const float dy = s_xy[bs + j] - cy;
            const float sigma = lf::gauss_sigma(conic, dx, dy);
            if (!(sigma >= 0.f)) continue;
            const float alpha = lf::lf_min(lf::ALPHA_MAX, s_opac[j] * expf(-sigma));
            if (!(alpha >= lf::ALPHA_THRESHOLD)) continue;
            const float next_T = T * (1.f - alpha);
            if (next_T <= lf::T_MIN) {
                done = true;
                break;
            }
            const float w = alpha * T;
            const int64_t base = (int64_t)s_id[j] * a.K;
            for (int q = 0; q < a.K; ++q) {
                const int32_t d = a.sp_idx[base + q];
                if (d < lo || d >= hi) continue;
                const float wt = a.sp_w[base + q];
                if (wt == 0.f) continue;
                z[d - lo] += w * wt;
                const unsigned bit = 1u << ((d - lo) & 31);
                if (!(s_used[(d - lo) >> 5] & bit)) atomicOr(&s_used[(d - lo) >> 5], bit);
            }
            if (dense) {
                const float *col = r.colors + (int64_t)s_id[j] * r.D;
                for (int k = 0; k < r.D; ++k) dacc[k] += w * col[k];
            }
            cur_idx = batch_start + j;
            T = next_T;
        }
    }
    __syncthreads();
    if (tr == 0) {
        int n = 0;
        for (int i = 0; i < L; ++i)
            if (s_used[i >> 5] & (1u << (i & 31))) s_act[n++] = i;
        s_n = n;
    }
    __syncthreads();
    if (!inside) return;
    if (level == 0) {
        render_alphas[pix] = 1.f - T;
        if (last_ids) last_ids[pix] = cur_idx;
        if (dense) {
            const float *bg = r.backgrounds ? r.backgrounds + (int64_t)c * r.D : nullptr;
            for (int k = 0; k < r.D; ++k) render[pix * r.D + k] = dacc[k] + (bg ? T * bg[k] : 0.f);
        }
    }
    const int64_t HW = (int64_t)a.height * a.width;
    const int64_t ppix = (int64_t)py * a.width + px;
    if (!(1.f - T > r.min_alpha)) {
        for (int q = 0; q < r.Q; ++q) relevancy[(((int64_t)c * r.Q + q) * r.n_levels + level) * HW + ppix] = 0.f;
        return;
    }
    const int n = s_n;
    float nrm = 0.f;
    for (int i = 0; i < n; ++i) {
        const int ai = s_act[i];
        const float za = z[ai];
        if (za == 0.f) continue;
        const float *Ga = r.G + (int64_t)ai * L;
        float off = 0.f;
        for (int k = i + 1; k < n; ++k) off += Ga[s_act[k]] * z[s_act[k]];
        nrm += za * (Ga[ai] * za + 2.f * off);
    }
    const float nz = fmaxf(sqrtf(fmaxf(nrm, 0.f)), 1e-12f);
    float worst = -INFINITY;
    for (int m = r.Q; m < r.M; ++m) {
        float d = 0.f;
        for (int i = 0; i < n; ++i) d += z[s_act[i]] * r.A[(int64_t)s_act[i] * r.M + m];
        worst = fmaxf(worst, d / nz);
    }
    for (int q = 0; q < r.Q; ++q) {
        float d = 0.f;
        for (int i = 0; i < n; ++i) d += z[s_act[i]] * r.A[(int64_t)s_act[i] * r.M + q];
        const float x = r.temperature * (d / nz - worst);
        relevancy[(((int64_t)c * r.Q + q) * r.n_levels + level) * HW + ppix] = 1.f / (1.f + expf(-x));
    }
}

}  // namespace
}  // namespace lfc

using namespace lfc;

extern "C" {

int lf_rasterize_sparse_fwd(int C, int N, int K, int L, int width, int height, int tile_size, int tile_width,
                            int tile_height, const float *means2d, const float *conics, const int32_t *sp_idx,
                            const float *sp_w, const float *opacities, const int32_t *tile_offsets,
                            const int32_t *flatten_ids, int64_t n_isects, float *render, float *render_alphas,
                            int32_t *last_ids, void *stream) {
    const char *fn = "lf_rasterize_sparse_fwd";
    if (int rc = check_sparse(fn, C, N, K, L, width, height, tile_size, tile_width, tile_height, n_isects)) return rc;
    if ((int64_t)C * width * height == 0) return LF_OK;
    if (!tile_offsets || !render || !render_alphas || !last_ids)
        return set_error(LF_ERR_ARG, "%s: a required output or tile_offsets is NULL", fn);
    if (n_isects > 0 && !(means2d && conics && sp_idx && sp_w && opacities && flatten_ids))
        return set_error(LF_ERR_ARG, "%s: a required input is NULL", fn);
    SparseDeviceGuard guard;
    if (int rc = guard.enter(fn, render)) return rc;
    SparseArgs a{C, N, K, L, width, height, tile_size, tile_width, tile_height, means2d, conics, opacities, sp_w,
                 sp_idx, tile_offsets, flatten_ids, (int32_t)n_isects};
    return launch_sparse(a, false, render, render_alphas, last_ids, nullptr, nullptr, nullptr,
                         static_cast<cudaStream_t>(stream));
}

int lf_rasterize_sparse_bwd(int C, int N, int K, int L, int width, int height, int tile_size, int tile_width,
                            int tile_height, const float *means2d, const float *conics, const int32_t *sp_idx,
                            const float *opacities, const int32_t *tile_offsets, const int32_t *flatten_ids,
                            int64_t n_isects, const int32_t *last_ids, const float *v_render, float *v_sp_w,
                            void *stream) {
    const char *fn = "lf_rasterize_sparse_bwd";
    if (int rc = check_sparse(fn, C, N, K, L, width, height, tile_size, tile_width, tile_height, n_isects)) return rc;
    if ((int64_t)C * width * height == 0) return LF_OK;
    if (!tile_offsets || !last_ids || !v_render || !v_sp_w)
        return set_error(LF_ERR_ARG, "%s: a required input or v_sp_w is NULL", fn);
    if (n_isects > 0 && !(means2d && conics && sp_idx && opacities && flatten_ids))
        return set_error(LF_ERR_ARG, "%s: a required input is NULL", fn);
    SparseDeviceGuard guard;
    if (int rc = guard.enter(fn, v_sp_w)) return rc;
    SparseArgs a{C, N, K, L, width, height, tile_size, tile_width, tile_height, means2d, conics, opacities, nullptr,
                 sp_idx, tile_offsets, flatten_ids, (int32_t)n_isects};
    return launch_sparse(a, true, nullptr, nullptr, nullptr, last_ids, v_render, v_sp_w,
                         static_cast<cudaStream_t>(stream));
}


int lf_rasterize_sparse_relevancy_fwd(int C, int N, int K, int n_levels, int L, int M, int Q, int D, int width,
                                      int height, int tile_size, int tile_width, int tile_height,
                                      const float *means2d, const float *conics, const int32_t *sp_idx,
                                      const float *sp_w, const float *opacities, const float *colors,
                                      const float *backgrounds, const int32_t *tile_offsets,
                                      const int32_t *flatten_ids, int64_t n_isects, const float *A, const float *G,
                                      float temperature, float min_alpha, float *render, float *relevancy,
                                      float *render_alphas, int32_t *last_ids, void *stream) {
    const char *fn = "lf_rasterize_sparse_relevancy_fwd";
    if (int rc = check_sparse(fn, C, N, K, n_levels * L, width, height, tile_size, tile_width, tile_height,
                              n_isects))
        return rc;
    if (n_levels < 1 || L < 1 || L > kRelMaxL)
        return set_error(LF_ERR_ARG, "%s: need 1 <= L <= %d per level and n_levels >= 1, got L=%d n_levels=%d", fn,
                         kRelMaxL, L, n_levels);
    if (Q < 1 || M <= Q) return set_error(LF_ERR_ARG, "%s: need Q >= 1 and M > Q, got Q=%d M=%d", fn, Q, M);
    if (D < 0 || D > 8) return set_error(LF_ERR_ARG, "%s: at most 8 dense channels, got %d", fn, D);
    if ((int64_t)C * width * height == 0) return LF_OK;
    if (!tile_offsets || !relevancy || !render_alphas || !A || !G || (D > 0 && !render))  // last_ids: optional
        return set_error(LF_ERR_ARG, "%s: a required output, A, G or tile_offsets is NULL", fn);
    if (n_isects > 0 && !(means2d && conics && sp_idx && sp_w && opacities && flatten_ids && (D == 0 || colors)))
        return set_error(LF_ERR_ARG, "%s: a required input is NULL", fn);
    SparseDeviceGuard guard;
    if (int rc = guard.enter(fn, relevancy)) return rc;
    SparseArgs sa{C, N, K, n_levels * L, width, height, tile_size, tile_width, tile_height, means2d, conics,
                  opacities, sp_w, sp_idx, tile_offsets, flatten_ids, (int32_t)n_isects};
    sa.L = L;  // the kernel reads the per-level size
    RelArgs ra{sa, n_levels, M, Q, D, A, G, colors, backgrounds, temperature, min_alpha};
    const int64_t n_blocks = (int64_t)C * tile_width * tile_height;
    if (int rc = check_raster_grid(fn, n_blocks)) return rc;
    const int threads = raster_block_threads(tile_size);
    const size_t smem = (size_t)threads * (sizeof(int32_t) + 6 * sizeof(float));
    cudaStream_t strm = static_cast<cudaStream_t>(stream);
    dim3 grid((unsigned)n_blocks, (unsigned)n_levels);
    sparse_relevancy_kernel<<<grid, threads, smem, strm>>>(ra, render, relevancy, render_alphas, last_ids);
    LFC_CHECK_LAUNCH("sparse_relevancy_kernel", strm);
    return LF_OK;
}

}  // extern "C"
