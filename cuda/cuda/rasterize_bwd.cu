// Tile rasterizer, backward: back-to-front over the same batches.
//
// Mapping as the forward (rasterize_fwd.cu): one block per (camera, tile),
// one thread per pixel, block = tile_size^2 rounded up to a multiple of 32.
// Channels run in chunks: the full chunks are W wide (grid.y = chunk), a
// second launch takes the remainder with the smallest instance CH >= rem.
// W is the widest of {32, 16, 8} whose kernel can run the block size on this
// device (registers: the 32-wide instance cannot run 1024 threads, i.e.
// tile_size >= 23, so such tiles use W = 16 or 8; shared memory likewise).
//
// Per pixel: T_final = 1 - render_alpha, bin_final = last_ids[pixel]. The
// block only walks intersections up to the largest bin_final of its pixels
// (shared atomicMax); batches of blockDim.x entries are loaded back to
// front into dynamic shared memory, structure-of-arrays
// [component][blockDim.x]: flatten id, mean2d, conic, opacity and this
// chunk's colours (4 * (7 + CH) bytes per thread; above 48 KiB the opt-in
// limit is requested).
//
// Per (pixel, Gaussian), for entries <= bin_final passing the forward's skip
// tests (sigma >= 0 and alpha >= 1/255, written so that NaNs are skipped), as
// lf_rasterize_bwd of the CPU driver (cuda/cpu/rasterize.cpp):
//   T      /= (1 - alpha)                  (T before this Gaussian)
//   v_colors_k += alpha T v_render_k
//   v_alpha = sum_k (c_k T - buf_k / (1 - alpha)) v_render_k
//           + T_final / (1 - alpha) * v_render_alpha
//           - T_final / (1 - alpha) * sum_k bg_k v_render_k   (backgrounds)
//   buf_k  += c_k alpha T                  (colour of what lies behind)
// Only the scalar S = sum_k buf_k v_render_k is needed, so with
// cv = sum_k c_k v_render_k:
//   v_alpha = cv T - S / (1 - alpha) + T_final / (1 - alpha) (v_ra - bg_dot)
//   S      += alpha T cv
// and lf::alpha_vjp maps v_alpha to v_means2d, v_conics, v_opacities (and
// |.| per pixel to v_means2d_abs). With several chunks, each chunk sums cv and
// bg_dot over its own channels and adds its share of v_alpha (the gradients
// are linear in v_alpha; the v_render_alpha term belongs to the k0 == 0
// chunk). The absolute gradient is not linear (sum |.| != |sum .|): when the
// channels span more than one chunk, the chunks skip it and one extra launch
// (ABS_ONLY) recomputes the full v_alpha from all D channels (colours and
// v_render read from global memory) and only accumulates v_means2d_abs.
//
// Reductions: for every Gaussian of a batch, each warp first checks whether
// any lane blended it (__any_sync); if so the per-Gaussian values
// (nch colours, 3 conic, 2 mean2d, 2 absgrad if requested, 1 opacity) are
// summed over the 32 lanes with shuffles (lanes that did not blend it add
// zeros) and lane 0 issues one atomicAdd per value. v_backgrounds[c, k] +=
// T_final v_render_k is reduced per warp the same way, once per block.
#include "common.cuh"

namespace lfc {

// Launch bounds: left alone, ptxas spends registers on ILP up to its cap
// (the 32-wide instance took 149, i.e. one 256-thread block per SM). The
// 32-wide instance is bounded to 768 threads (sm_90, nvcc 13: 80 registers,
// no spills; three 256-thread blocks per SM; tiles up to 27); all others to
// 1024 (<= 64 registers), so they run any tile size. Tiles beyond an
// instance's bound use a narrower chunk (launch_rasterize_bwd).
template <int CH>
constexpr int bwd_launch_bound() {
    return CH >= 32 ? 768 : 1024;
}

// CH: channels per pass (compile time); nch <= CH of them are used, starting
// at k0 = k0_base + blockIdx.y * nch. ABS_ONLY (instantiated with CH = 1):
// all a.D channels from global memory, only v_means2d_abs is written.
template <int CH, bool ABS_ONLY>
__global__ void __launch_bounds__(bwd_launch_bound<CH>())
rasterize_bwd_kernel(RasterArgs a, int k0_base, int nch,
                                     const float *__restrict__ render_alphas,
                                     const int32_t *__restrict__ last_ids,
                                     const float *__restrict__ v_render_colors,
                                     const float *__restrict__ v_render_alphas,
                                     float *__restrict__ v_means2d,
                                     float *__restrict__ v_means2d_abs,
                                     float *__restrict__ v_conics, float *__restrict__ v_colors,
                                     float *__restrict__ v_opacities,
                                     float *__restrict__ v_backgrounds) {
    extern __shared__ float smem[];
    __shared__ int s_max_last;
    const int k0 = ABS_ONLY ? 0 : k0_base + (int)blockIdx.y * nch;
    const int bs = blockDim.x;
    int32_t *s_id = reinterpret_cast<int32_t *>(smem);
    float *s_xy = smem + bs;           // [2][bs]
    float *s_conic = s_xy + 2 * bs;    // [3][bs]
    float *s_opac = s_conic + 3 * bs;  // [bs]
    float *s_col = s_opac + bs;        // [CH][bs] (not with ABS_ONLY)

    const int ts = a.tile_size;
    const int n_tiles = a.tile_width * a.tile_height;
    const int64_t tile = blockIdx.x;
    const int c = (int)(tile / n_tiles);
    const int tile_in_cam = (int)(tile % n_tiles);
    const int ty = tile_in_cam / a.tile_width, tx = tile_in_cam % a.tile_width;
    const int tr = threadIdx.x;
    const int lane = tr & 31;

    int px = 0, py = 0;
    bool inside = false;
    if (tr < ts * ts) {
        px = tx * ts + tr % ts;
        py = ty * ts + tr / ts;
        inside = px < a.width && py < a.height;
    }
    const float cx = (float)px + 0.5f, cy = (float)py + 0.5f;

    const int64_t n_tiles_total = (int64_t)a.C * n_tiles;
    const int start = a.tile_offsets[tile];
    const int end = tile + 1 < n_tiles_total ? a.tile_offsets[tile + 1] : a.n_isects;

    if (tr == 0) s_max_last = -1;

    // v_render of this pixel: this chunk's channels in registers, or (ABS_ONLY)
    // a pointer to all D of them
    float v_rc[CH];
#pragma unroll
    for (int k = 0; k < CH; ++k) v_rc[k] = 0.f;
    const float *vr_all = nullptr;
    float T_final = 1.f, v_ra = 0.f, bg_dot = 0.f;
    int bin_final = -1;
    if (inside) {
        const int64_t pix = ((int64_t)c * a.height + py) * a.width + px;
        T_final = 1.f - render_alphas[pix];
        bin_final = last_ids[pix];
        const float *vr = v_render_colors + pix * a.D + k0;
        if (k0 == 0) v_ra = v_render_alphas[pix];
        if (ABS_ONLY) {
            vr_all = vr;
            if (a.backgrounds) {
                const float *bg = a.backgrounds + (int64_t)c * a.D;
                for (int k = 0; k < a.D; ++k) bg_dot += bg[k] * vr[k];
            }
        } else {
#pragma unroll
            for (int k = 0; k < CH; ++k)
                if (k < nch) v_rc[k] = vr[k];
            if (a.backgrounds) {
                const float *bg = a.backgrounds + (int64_t)c * a.D + k0;
#pragma unroll
                for (int k = 0; k < CH; ++k)
                    if (k < nch) bg_dot += bg[k] * v_rc[k];
            }
        }
    }

    if (!ABS_ONLY && v_backgrounds) {  // grid-uniform; threads without a pixel have v_rc = 0
        float *vb = v_backgrounds + (int64_t)c * a.D + k0;
#pragma unroll
        for (int k = 0; k < CH; ++k) {
            if (k < nch) {
                const float s = warp_sum(T_final * v_rc[k]);
                if (lane == 0) atomicAdd(vb + k, s);
            }
        }
    }

    __syncthreads();  // s_max_last initialised
    if (bin_final >= 0) atomicMax(&s_max_last, bin_final);
    __syncthreads();
    const int range_end = min(end, s_max_last + 1);
    if (range_end <= start) return;  // block-uniform

    // S = sum_k buf_k v_render_k over this pass's channels, buf_k = colour k
    // accumulated behind the current Gaussian
    float S = 0.f;
    float T = T_final;

    const int n_batches = (range_end - start + bs - 1) / bs;
    for (int b = 0; b < n_batches; ++b) {
        // entries batch_end, batch_end - 1, ..., batch_end - batch_size + 1
        const int batch_end = range_end - 1 - b * bs;
        const int batch_size = min(bs, batch_end + 1 - start);
        __syncthreads();  // previous batch fully consumed
        if (tr < batch_size) {
            const int32_t g = a.flatten_ids[batch_end - tr];
            s_id[tr] = g;
            s_xy[tr] = a.means2d[2 * (int64_t)g + 0];
            s_xy[bs + tr] = a.means2d[2 * (int64_t)g + 1];
            s_conic[tr] = a.conics[3 * (int64_t)g + 0];
            s_conic[bs + tr] = a.conics[3 * (int64_t)g + 1];
            s_conic[2 * bs + tr] = a.conics[3 * (int64_t)g + 2];
            s_opac[tr] = a.opacities[g];
            if (!ABS_ONLY) {
                const float *col = a.colors + (int64_t)g * a.D + k0;
#pragma unroll
                for (int k = 0; k < CH; ++k)
                    if (k < nch) s_col[k * bs + tr] = col[k];
            }
        }
        __syncthreads();

        for (int j = 0; j < batch_size; ++j) {
            const float conic[3] = {s_conic[j], s_conic[bs + j], s_conic[2 * bs + j]};
            const float op = s_opac[j];
            const float dx = s_xy[j] - cx;
            const float dy = s_xy[bs + j] - cy;
            bool valid = inside && (batch_end - j) <= bin_final;
            float vis = 0.f, alpha = 0.f;
            if (valid) {
                const float sigma = lf::gauss_sigma(conic, dx, dy);
                vis = expf(-sigma);
                alpha = lf::lf_min(lf::ALPHA_MAX, op * vis);
                // the forward's skip tests; false for NaN sigma / alpha
                valid = sigma >= 0.f && alpha >= lf::ALPHA_THRESHOLD;
            }
            if (!__any_sync(kFullMask, valid)) continue;

            float fac = 0.f;
            float v_xy[2] = {0.f, 0.f}, v_xy_abs[2] = {0.f, 0.f};
            float v_cn[3] = {0.f, 0.f, 0.f};
            float v_op = 0.f;
            if (valid) {
                const float ra = 1.f / (1.f - alpha);
                T *= ra;
                fac = alpha * T;
                float cv = 0.f;  // sum_k c_k v_render_k over this pass's channels
                if (ABS_ONLY) {
                    const float *col = a.colors + (int64_t)s_id[j] * a.D;
                    for (int k = 0; k < a.D; ++k) cv += col[k] * vr_all[k];
                } else {
#pragma unroll
                    for (int k = 0; k < CH; ++k)
                        if (k < nch) cv += s_col[k * bs + j] * v_rc[k];
                }
                const float v_alpha = cv * T - S * ra + T_final * ra * (v_ra - bg_dot);
                S += fac * cv;
                lf::alpha_vjp(conic, op, vis, dx, dy, v_alpha, v_xy,
                              v_means2d_abs ? v_xy_abs : nullptr, v_cn, v_op);
            }

            const int64_t g = s_id[j];
            if (ABS_ONLY) {  // v_means2d_abs != nullptr
                const float s_ax = warp_sum(v_xy_abs[0]);
                const float s_ay = warp_sum(v_xy_abs[1]);
                if (lane == 0) {
                    atomicAdd(v_means2d_abs + 2 * g + 0, s_ax);
                    atomicAdd(v_means2d_abs + 2 * g + 1, s_ay);
                }
                continue;
            }
            float *vc = v_colors + g * a.D + k0;
#pragma unroll
            for (int k = 0; k < CH; ++k) {
                if (k < nch) {
                    const float s = warp_sum(fac * v_rc[k]);
                    if (lane == 0) atomicAdd(vc + k, s);
                }
            }
            const float s_cx = warp_sum(v_cn[0]);
            const float s_cy = warp_sum(v_cn[1]);
            const float s_cz = warp_sum(v_cn[2]);
            const float s_mx = warp_sum(v_xy[0]);
            const float s_my = warp_sum(v_xy[1]);
            const float s_op = warp_sum(v_op);
            float s_ax = 0.f, s_ay = 0.f;
            if (v_means2d_abs) {  // grid-uniform
                s_ax = warp_sum(v_xy_abs[0]);
                s_ay = warp_sum(v_xy_abs[1]);
            }
            if (lane == 0) {
                atomicAdd(v_conics + 3 * g + 0, s_cx);
                atomicAdd(v_conics + 3 * g + 1, s_cy);
                atomicAdd(v_conics + 3 * g + 2, s_cz);
                atomicAdd(v_means2d + 2 * g + 0, s_mx);
                atomicAdd(v_means2d + 2 * g + 1, s_my);
                atomicAdd(v_opacities + g, s_op);
                if (v_means2d_abs) {
                    atomicAdd(v_means2d_abs + 2 * g + 0, s_ax);
                    atomicAdd(v_means2d_abs + 2 * g + 1, s_ay);
                }
            }
        }
    }
}

namespace {

// Inputs and outputs of one backward call (everything but RasterArgs).
struct BwdBuffers {
    const float *render_alphas;
    const int32_t *last_ids;
    const float *v_render_colors, *v_render_alphas;
    float *v_means2d, *v_means2d_abs, *v_conics, *v_colors, *v_opacities, *v_backgrounds;
};

template <int CH, bool ABS_ONLY>
constexpr size_t bwd_smem_bytes(int threads) {
    return (size_t)threads * (sizeof(int32_t) + (6 + (ABS_ONLY ? 0 : CH)) * sizeof(float));
}

// fits = the instance can run blocks of `threads` threads on the current
// device: registers (maxThreadsPerBlock) and dynamic shared memory (opt-in
// limit `smem_optin`).
template <int CH, bool ABS_ONLY>
int bwd_fits(int threads, int smem_optin, bool &fits) {
    cudaFuncAttributes attr;
    LFC_CHECK(cudaFuncGetAttributes(&attr, rasterize_bwd_kernel<CH, ABS_ONLY>));
    fits = threads <= attr.maxThreadsPerBlock &&
           bwd_smem_bytes<CH, ABS_ONLY>(threads) + attr.sharedSizeBytes <= (size_t)smem_optin;
    return LF_OK;
}

// n_chunks passes of nch channels each, the first at channel k0; v_abs is
// the absgrad output for this launch (nullptr: none).
template <int CH, bool ABS_ONLY>
int launch_bwd(const RasterArgs &a, const BwdBuffers &b, int k0, int n_chunks, int nch,
               float *v_abs, cudaStream_t stream) {
    const int threads = raster_block_threads(a.tile_size);
    const size_t smem = bwd_smem_bytes<CH, ABS_ONLY>(threads);
    if (smem > 48 * 1024)
        LFC_CHECK(cudaFuncSetAttribute(rasterize_bwd_kernel<CH, ABS_ONLY>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    const unsigned n_blocks = (unsigned)((int64_t)a.C * a.tile_width * a.tile_height);
    // grid.y = channel chunk: chunk y handles channels [k0 + y*nch, k0 + (y+1)*nch);
    // at most 65535 chunks per launch
    constexpr int kMaxGridY = 65535;
    for (int y0 = 0; y0 < n_chunks; y0 += kMaxGridY) {
        const int ny = n_chunks - y0 < kMaxGridY ? n_chunks - y0 : kMaxGridY;
        dim3 grid(n_blocks, (unsigned)ny, 1);
        rasterize_bwd_kernel<CH, ABS_ONLY><<<grid, threads, smem, stream>>>(
            a, k0 + y0 * nch, nch, b.render_alphas, b.last_ids, b.v_render_colors,
            b.v_render_alphas, b.v_means2d, v_abs, b.v_conics, b.v_colors, b.v_opacities,
            b.v_backgrounds);
        LFC_CHECK_LAUNCH("rasterize_bwd_kernel", stream);
    }
    return LF_OK;
}

// The channel instances, narrowest first.
constexpr int kInstances[] = {1, 2, 3, 4, 8, 16, 32};

#define LFC_BWD_SWITCH(inst, CALL)                                                        \
    switch (inst) {                                                                       \
        case 1: return CALL(1);                                                           \
        case 2: return CALL(2);                                                           \
        case 3: return CALL(3);                                                           \
        case 4: return CALL(4);                                                           \
        case 8: return CALL(8);                                                           \
        case 16: return CALL(16);                                                         \
        case 32: return CALL(32);                                                         \
        default: return set_error(LF_ERR_ARG, "lf_rasterize_bwd: internal: no %d-channel " \
                                              "instance", inst);                          \
    }

int bwd_instance_fits(int inst, int threads, int smem_optin, bool &fits) {
#define LFC_FITS(N_) bwd_fits<N_, false>(threads, smem_optin, fits)
    LFC_BWD_SWITCH(inst, LFC_FITS)
#undef LFC_FITS
}

int launch_bwd_instance(int inst, const RasterArgs &a, const BwdBuffers &b, int k0, int n_chunks,
                        int nch, float *v_abs, cudaStream_t stream) {
#define LFC_LAUNCH(N_) launch_bwd<N_, false>(a, b, k0, n_chunks, nch, v_abs, stream)
    LFC_BWD_SWITCH(inst, LFC_LAUNCH)
#undef LFC_LAUNCH
}

#undef LFC_BWD_SWITCH

}  // namespace

int launch_rasterize_bwd(const RasterArgs &a, const float *render_alphas,
                         const int32_t *last_ids,
                         const float *v_render_colors,
                         const float *v_render_alphas, float *v_means2d,
                         float *v_means2d_abs, float *v_conics,
                         float *v_colors, float *v_opacities,
                         float *v_backgrounds, cudaStream_t stream) {
    const int64_t n_blocks = (int64_t)a.C * a.tile_width * a.tile_height;
    if (n_blocks == 0 || (int64_t)a.width * a.height == 0) return LF_OK;
    if (int rc = check_raster_grid("lf_rasterize_bwd", n_blocks)) return rc;
    const BwdBuffers b{render_alphas, last_ids,      v_render_colors, v_render_alphas, v_means2d,
                       v_means2d_abs, v_conics,      v_colors,        v_opacities,     v_backgrounds};
    const int threads = raster_block_threads(a.tile_size);
    int dev = 0, smem_optin = 0;
    LFC_CHECK(cudaGetDevice(&dev));
    LFC_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));

    // chunk width of the full chunks: the widest instance that fits the block
    int chunk = 0;
    for (int w : {32, 16, 8}) {
        bool fits = false;
        if (int rc = bwd_instance_fits(w, threads, smem_optin, fits)) return rc;
        if (fits) {
            chunk = w;
            break;
        }
    }
    if (chunk == 0)
        return set_error(LF_ERR_ARG,
                         "lf_rasterize_bwd: tile_size %d needs %d threads per block; not even "
                         "the 8-channel backward kernel can run blocks that large on this device",
                         a.tile_size, threads);
    const int full = a.D / chunk, rem = a.D % chunk;
    // remainder: the narrowest instance >= rem that fits (the chunk width does)
    int rem_inst = chunk;
    if (rem > 0) {
        for (int inst : kInstances) {
            if (inst < rem || inst >= chunk) continue;
            bool fits = false;
            if (int rc = bwd_instance_fits(inst, threads, smem_optin, fits)) return rc;
            if (fits) {
                rem_inst = inst;
                break;
            }
        }
    }
    // absgrad is not linear in the channels: with a single pass the chunk
    // kernel computes it, otherwise one extra ABS_ONLY pass over all channels
    const bool one_pass = a.D <= chunk;
    float *v_abs_chunks = one_pass ? v_means2d_abs : nullptr;
    if (full > 0)
        if (int rc = launch_bwd_instance(chunk, a, b, 0, full, chunk, v_abs_chunks, stream))
            return rc;
    if (rem > 0)
        if (int rc = launch_bwd_instance(rem_inst, a, b, full * chunk, 1, rem, v_abs_chunks,
                                         stream))
            return rc;
    if (v_means2d_abs && !one_pass) {
        bool fits = false;
        if (int rc = bwd_fits<1, true>(threads, smem_optin, fits)) return rc;
        if (!fits)
            return set_error(LF_ERR_ARG,
                             "lf_rasterize_bwd: tile_size %d needs %d threads per block; the "
                             "absgrad kernel cannot run blocks that large on this device",
                             a.tile_size, threads);
        if (int rc = launch_bwd<1, true>(a, b, 0, 1, a.D, v_means2d_abs, stream)) return rc;
    }
    return LF_OK;
}

}  // namespace lfc
