// Tile rasterizer, backward: back-to-front over the same batches.
//
// Mapping as the forward (rasterize_fwd.cu): one block per (camera, tile),
// one thread per pixel, block = tile_size^2 rounded up to a multiple of 32,
// channels in chunks of CH in {1,2,3,4,8,16,32} (grid.y = chunk for the full
// 32-wide chunks, a second launch for the remainder).
//
// Per pixel: T_final = 1 - render_alpha, bin_final = last_ids[pixel]. The
// block only walks intersections up to the largest bin_final of its pixels
// (shared atomicMax); batches of blockDim.x entries are loaded back to
// front into dynamic shared memory, structure-of-arrays
// [component][blockDim.x]: flatten id, mean2d, conic, opacity and this
// chunk's colours (4 * (7 + CH) bytes per thread; > 48 KiB only for
// tile_size > 17 with CH = 32, then the opt-in limit is requested).
//
// Per (pixel, Gaussian), for entries <= bin_final passing the forward's skip
// tests (sigma < 0, alpha < 1/255):
//   T      /= (1 - alpha)                  (T before this Gaussian)
//   v_colors_k += alpha T v_render_k
//   v_alpha = sum_k (c_k T - buf_k / (1 - alpha)) v_render_k
//           + T_final / (1 - alpha) * v_render_alpha
//           - T_final / (1 - alpha) * sum_k bg_k v_render_k   (backgrounds)
//   buf_k  += c_k alpha T
// and lf::alpha_vjp maps v_alpha to v_means2d (+ absgrad), v_conics,
// v_opacities. With several channel chunks, each chunk adds its share of
// v_alpha (v_alpha and alpha_vjp are linear in v_render; the
// v_render_alpha term belongs to the k0 == 0 chunk).
//
// Reductions: for every Gaussian of a batch, each warp first checks whether
// any lane blended it (__any_sync); if so the per-Gaussian values
// (nch colours, 3 conic, 2 mean2d, 2 absgrad if requested, 1 opacity) are
// summed over the 32 lanes with shuffles (lanes that did not blend it add
// zeros) and lane 0 issues one atomicAdd per value. v_backgrounds[c, k] +=
// T_final v_render_k is reduced per warp the same way, once per block.
#include "common.cuh"

namespace lfc {

template <int CH>
__global__ void rasterize_bwd_kernel(RasterArgs a, int k0_base, int nch,
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
    const int k0 = k0_base + (int)blockIdx.y * nch;
    const int bs = blockDim.x;
    int32_t *s_id = reinterpret_cast<int32_t *>(smem);
    float *s_xy = smem + bs;           // [2][bs]
    float *s_conic = s_xy + 2 * bs;    // [3][bs]
    float *s_opac = s_conic + 3 * bs;  // [bs]
    float *s_col = s_opac + bs;        // [CH][bs]

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

    float v_rc[CH];
#pragma unroll
    for (int k = 0; k < CH; ++k) v_rc[k] = 0.f;
    float T_final = 1.f, v_ra = 0.f, bg_dot = 0.f;
    int bin_final = -1;
    if (inside) {
        const int64_t pix = ((int64_t)c * a.height + py) * a.width + px;
        T_final = 1.f - render_alphas[pix];
        bin_final = last_ids[pix];
        const float *vr = v_render_colors + pix * a.D + k0;
#pragma unroll
        for (int k = 0; k < CH; ++k)
            if (k < nch) v_rc[k] = vr[k];
        if (k0 == 0) v_ra = v_render_alphas[pix];
        if (a.backgrounds) {
            const float *bg = a.backgrounds + (int64_t)c * a.D + k0;
#pragma unroll
            for (int k = 0; k < CH; ++k)
                if (k < nch) bg_dot += bg[k] * v_rc[k];
        }
    }

    if (v_backgrounds) {  // grid-uniform; pixels without a pixel have v_rc = 0
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

    float buf[CH];
#pragma unroll
    for (int k = 0; k < CH; ++k) buf[k] = 0.f;
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
            const float *col = a.colors + (int64_t)g * a.D + k0;
#pragma unroll
            for (int k = 0; k < CH; ++k)
                if (k < nch) s_col[k * bs + tr] = col[k];
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
                if (sigma < 0.f || alpha < lf::ALPHA_THRESHOLD) valid = false;
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
                float v_alpha = 0.f;
#pragma unroll
                for (int k = 0; k < CH; ++k)
                    if (k < nch) v_alpha += (s_col[k * bs + j] * T - buf[k] * ra) * v_rc[k];
                v_alpha += T_final * ra * (v_ra - bg_dot);
                lf::alpha_vjp(conic, op, vis, dx, dy, v_alpha, v_xy, v_xy_abs, v_cn, v_op);
#pragma unroll
                for (int k = 0; k < CH; ++k)
                    if (k < nch) buf[k] += s_col[k * bs + j] * fac;
            }

            const int64_t g = s_id[j];
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

template <int CH>
int launch_bwd_chunks(const RasterArgs &a, int k0, int n_chunks, int nch,
                      const float *render_alphas, const int32_t *last_ids,
                      const float *v_render_colors, const float *v_render_alphas,
                      float *v_means2d, float *v_means2d_abs, float *v_conics, float *v_colors,
                      float *v_opacities, float *v_backgrounds, cudaStream_t stream) {
    const int threads = raster_block_threads(a.tile_size);
    cudaFuncAttributes attr;
    LFC_CHECK(cudaFuncGetAttributes(&attr, rasterize_bwd_kernel<CH>));
    if (threads > attr.maxThreadsPerBlock)
        return set_error(LF_ERR_ARG,
                         "lf_rasterize_bwd: tile_size %d needs %d threads per block, the kernel "
                         "(%d channels per pass) allows %d on this device",
                         a.tile_size, threads, CH, attr.maxThreadsPerBlock);
    const size_t smem = (size_t)threads * (sizeof(int32_t) + (6 + CH) * sizeof(float));
    if (smem > 48 * 1024)
        LFC_CHECK(cudaFuncSetAttribute(rasterize_bwd_kernel<CH>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    // grid.y = channel chunk: chunk y handles channels [k0 + y*nch, k0 + (y+1)*nch)
    dim3 grid((unsigned)((int64_t)a.C * a.tile_width * a.tile_height), (unsigned)n_chunks, 1);
    rasterize_bwd_kernel<CH><<<grid, threads, smem, stream>>>(
        a, k0, nch, render_alphas, last_ids, v_render_colors, v_render_alphas, v_means2d,
        v_means2d_abs, v_conics, v_colors, v_opacities, v_backgrounds);
    LFC_CHECK_LAUNCH("rasterize_bwd_kernel");
    return LF_OK;
}

int launch_bwd_instance(const RasterArgs &a, int k0, int n_chunks, int nch,
                        const float *render_alphas, const int32_t *last_ids,
                        const float *v_render_colors, const float *v_render_alphas,
                        float *v_means2d, float *v_means2d_abs, float *v_conics, float *v_colors,
                        float *v_opacities, float *v_backgrounds, cudaStream_t stream) {
#define LFC_BWD_CASE(N_)                                                                   \
    case N_:                                                                               \
        return launch_bwd_chunks<N_>(a, k0, n_chunks, nch, render_alphas, last_ids,        \
                                     v_render_colors, v_render_alphas, v_means2d,          \
                                     v_means2d_abs, v_conics, v_colors, v_opacities,       \
                                     v_backgrounds, stream);
    switch (chunk_instance(nch)) {
        LFC_BWD_CASE(1)
        LFC_BWD_CASE(2)
        LFC_BWD_CASE(3)
        LFC_BWD_CASE(4)
        LFC_BWD_CASE(8)
        LFC_BWD_CASE(16)
        default: LFC_BWD_CASE(32)
    }
#undef LFC_BWD_CASE
}

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
    const int full = a.D / kMaxChunk, rem = a.D % kMaxChunk;
    if (full > 0) {
        int rc = launch_bwd_instance(a, 0, full, kMaxChunk, render_alphas, last_ids,
                                     v_render_colors, v_render_alphas, v_means2d, v_means2d_abs,
                                     v_conics, v_colors, v_opacities, v_backgrounds, stream);
        if (rc) return rc;
    }
    if (rem > 0)
        return launch_bwd_instance(a, full * kMaxChunk, 1, rem, render_alphas, last_ids,
                                   v_render_colors, v_render_alphas, v_means2d, v_means2d_abs,
                                   v_conics, v_colors, v_opacities, v_backgrounds, stream);
    return LF_OK;
}

}  // namespace lfc
