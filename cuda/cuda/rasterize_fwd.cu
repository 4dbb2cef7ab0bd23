// Tile rasterizer, forward: front-to-back alpha blending.
//
// Mapping: one block per (camera, tile) (grid.x = C*tile_h*tile_w, tile
// t = (c*tile_h + ty)*tile_w + tx), one thread per pixel. The block has
// tile_size^2 threads rounded up to a multiple of 32 (every warp full);
// thread r < tile_size^2 owns pixel (ty*ts + r/ts, tx*ts + r%ts). Threads
// without a pixel (padding or outside a partial border tile) never blend or
// write but still help load batches.
//
// Shared memory: the tile's sorted intersections are processed in batches
// of blockDim.x; per batch every thread loads one (flatten id, mean2d,
// conic, opacity) = 28 bytes into dynamic shared memory. Colours are read
// from global memory only for Gaussians a pixel actually blends.
//
// Channels (any D at run time): a pixel accumulates its colours in
// registers, float acc[CH], with CH a compile-time instance in
// {1,2,3,4,8,16,32}. D <= 32 is one launch with the smallest CH >= D. For
// D > 32 the channels are split into chunks of 32 (plus a remainder chunk
// with its own smaller instance); each full chunk is a grid.y slice and the
// remainder a second launch. Every chunk re-runs the (cheap, deterministic) alpha
// recurrence and blends only its channels [k0, k0 + nch). All chunks run the
// identical instruction sequence for T / alpha, so they agree on which
// Gaussians are blended; the k0 == 0 chunk writes render_alphas / last_ids.
// This keeps the common cases (RGB, RGB+depth, 16/32-dim features) fully in
// registers and costs one extra pass of alpha evaluation per 32 channels for
// wide features, where the colour reads dominate anyway.
//
// Per (pixel, Gaussian), exactly as the CPU driver / ABI: d = mean2d -
// (pixel + 0.5), sigma = lf::gauss_sigma; skip unless sigma >= 0; alpha =
// min(0.999, opacity * exp(-sigma)); skip unless alpha >= 1/255 (so NaNs are
// skipped, as by the CPU driver); stop (without
// blending it) at a Gaussian with T * (1 - alpha) <= 1e-4. The block exits
// early once every pixel is done (__syncthreads_count).
#include "common.cuh"

namespace lfc {

template <int CH>
__global__ void rasterize_fwd_kernel(RasterArgs a, int k0_base, int nch,
                                     float *__restrict__ render_colors,
                                     float *__restrict__ render_alphas,
                                     int32_t *__restrict__ last_ids) {
    extern __shared__ float smem[];
    const int k0 = k0_base + (int)blockIdx.y * nch;  // this chunk's first channel
    const int bs = blockDim.x;
    int32_t *s_id = reinterpret_cast<int32_t *>(smem);
    // structure-of-arrays, [component][bs]: conflict-free stores, broadcast reads
    float *s_xy = smem + bs;            // [2][bs]
    float *s_conic = s_xy + 2 * bs;     // [3][bs]
    float *s_opac = s_conic + 3 * bs;   // [bs]

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

    const int64_t n_tiles_total = (int64_t)a.C * n_tiles;
    const int start = a.tile_offsets[tile];
    const int end = tile + 1 < n_tiles_total ? a.tile_offsets[tile + 1] : a.n_isects;

    float acc[CH];
#pragma unroll
    for (int k = 0; k < CH; ++k) acc[k] = 0.f;
    float T = 1.f;
    int cur_idx = -1;
    bool done = !inside;

    const int n_batches = end > start ? (end - start + bs - 1) / bs : 0;
    for (int b = 0; b < n_batches; ++b) {
        // barrier: also guarantees the previous batch is no longer read
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
            // negated >= tests: a NaN sigma / alpha is skipped, as by the CPU driver
            if (!(sigma >= 0.f)) continue;
            const float alpha = lf::lf_min(lf::ALPHA_MAX, s_opac[j] * expf(-sigma));
            if (!(alpha >= lf::ALPHA_THRESHOLD)) continue;
            const float next_T = T * (1.f - alpha);
            if (next_T <= lf::T_MIN) {
                done = true;
                break;
            }
            const float w = alpha * T;
            const float *col = a.colors + (int64_t)s_id[j] * a.D + k0;
#pragma unroll
            for (int k = 0; k < CH; ++k)
                if (k < nch) acc[k] += col[k] * w;
            cur_idx = batch_start + j;
            T = next_T;
        }
    }

    if (!inside) return;
    const int64_t pix = ((int64_t)c * a.height + py) * a.width + px;
    float *out = render_colors + pix * a.D + k0;
    const float *bg = a.backgrounds ? a.backgrounds + (int64_t)c * a.D + k0 : nullptr;
#pragma unroll
    for (int k = 0; k < CH; ++k)
        if (k < nch) out[k] = acc[k] + (bg ? T * bg[k] : 0.f);
    if (k0 == 0) {
        render_alphas[pix] = 1.f - T;
        last_ids[pix] = cur_idx;
    }
}

namespace {

template <int CH>
int launch_fwd_chunks(const RasterArgs &a, int k0, int n_chunks, int nch, float *render_colors,
                      float *render_alphas, int32_t *last_ids, cudaStream_t stream) {
    const int threads = raster_block_threads(a.tile_size);
    cudaFuncAttributes attr;
    LFC_CHECK(cudaFuncGetAttributes(&attr, rasterize_fwd_kernel<CH>));
    if (threads > attr.maxThreadsPerBlock)
        return set_error(LF_ERR_ARG,
                         "lf_rasterize_fwd: tile_size %d needs %d threads per block, the kernel "
                         "allows %d on this device",
                         a.tile_size, threads, attr.maxThreadsPerBlock);
    const size_t smem = (size_t)threads * (sizeof(int32_t) + 6 * sizeof(float));
    // grid.y = channel chunk: chunk y blends channels [k0 + y*nch, k0 + (y+1)*nch)
    dim3 grid((unsigned)((int64_t)a.C * a.tile_width * a.tile_height), (unsigned)n_chunks, 1);
    rasterize_fwd_kernel<CH><<<grid, threads, smem, stream>>>(a, k0, nch, render_colors,
                                                            render_alphas, last_ids);
    LFC_CHECK_LAUNCH("rasterize_fwd_kernel", stream);
    return LF_OK;
}

int launch_fwd_instance(const RasterArgs &a, int k0, int n_chunks, int nch,
                        float *render_colors, float *render_alphas, int32_t *last_ids,
                        cudaStream_t stream) {
    switch (chunk_instance(nch)) {
    case 1: return launch_fwd_chunks<1>(a, k0, n_chunks, nch, render_colors, render_alphas, last_ids, stream);
    case 2: return launch_fwd_chunks<2>(a, k0, n_chunks, nch, render_colors, render_alphas, last_ids, stream);
    case 3: return launch_fwd_chunks<3>(a, k0, n_chunks, nch, render_colors, render_alphas, last_ids, stream);
    case 4: return launch_fwd_chunks<4>(a, k0, n_chunks, nch, render_colors, render_alphas, last_ids, stream);
    case 8: return launch_fwd_chunks<8>(a, k0, n_chunks, nch, render_colors, render_alphas, last_ids, stream);
    case 16: return launch_fwd_chunks<16>(a, k0, n_chunks, nch, render_colors, render_alphas, last_ids, stream);
    default: return launch_fwd_chunks<32>(a, k0, n_chunks, nch, render_colors, render_alphas, last_ids, stream);
    }
}

}  // namespace

int launch_rasterize_fwd(const RasterArgs &a, float *render_colors,
                         float *render_alphas, int32_t *last_ids,
                         cudaStream_t stream) {
    const int64_t n_blocks = (int64_t)a.C * a.tile_width * a.tile_height;
    if (n_blocks == 0 || (int64_t)a.width * a.height == 0) return LF_OK;
    if (int rc = check_raster_grid("lf_rasterize_fwd", n_blocks)) return rc;
    const int full = a.D / kMaxChunk, rem = a.D % kMaxChunk;
    if (full > 0) {
        int rc = launch_fwd_instance(a, 0, full, kMaxChunk, render_colors, render_alphas,
                                     last_ids, stream);
        if (rc) return rc;
    }
    if (rem > 0)
        return launch_fwd_instance(a, full * kMaxChunk, 1, rem, render_colors, render_alphas,
                                   last_ids, stream);
    return LF_OK;
}

}  // namespace lfc
