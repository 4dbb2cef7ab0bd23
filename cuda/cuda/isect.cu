// Tile intersection.
//
// lf_isect_count: one thread per (camera, Gaussian) pair writes the number of
//   tiles it touches (lf::tile_bounds; 0 unless both radii > 0) into
//   cum_tiles, cub::DeviceScan::InclusiveSum turns that into the inclusive
//   prefix sum in place, and the last element is copied to the host (the only
//   synchronisation of the library: cudaMemcpyAsync + cudaStreamSynchronize
//   on the caller's stream).
// lf_isect_fill: one thread per pair writes its keys/values at
//   [cum_tiles[idx-1], cum_tiles[idx]) in generation order (camera, Gaussian,
//   then tiles ty-major, tx-minor) into temporary buffers; a stable
//   cub::DeviceRadixSort::SortPairs over the low 32 + tile_bits + camera_bits
//   bits writes isect_ids / flatten_ids, so equal keys keep generation order.
//   tile_offsets[t] is then the lower bound of t's (camera, tile) prefix in
//   the sorted keys (one thread per tile, binary search): empty tiles point
//   at the next non-empty start, trailing ones at n_isects.
//
// Key layout (as gsplat): camera << (32 + tile_bits) | tile_id << 32 |
// float bits of the depth, with tile_bits = floor(log2(tile_w*tile_h)) + 1
// and camera_bits = floor(log2(C)) + 1. Depths are > near_plane > 0 for
// every visible pair, so their IEEE bits order like the floats.
// Temporary storage comes from cudaMallocAsync / cudaFreeAsync on the stream.
#include <cub/cub.cuh>

#include "common.cuh"

namespace lfc {

namespace {

// floor(log2(x)) + 1 for x >= 1
inline int bit_width(int64_t x) {
    int b = 0;
    while (x > 0) { ++b; x >>= 1; }
    return b;
}

// Frees a cudaMallocAsync allocation on scope exit (error paths); the
// success path frees explicitly so that failures are reported.
struct AsyncBuffer {
    void *ptr = nullptr;
    cudaStream_t stream;
    explicit AsyncBuffer(cudaStream_t s) : stream(s) {}
    ~AsyncBuffer() {
        if (ptr) cudaFreeAsync(ptr, stream);
    }
    cudaError_t alloc(size_t bytes) { return cudaMallocAsync(&ptr, bytes > 0 ? bytes : 1, stream); }
    cudaError_t release() {
        cudaError_t e = cudaSuccess;
        if (ptr) e = cudaFreeAsync(ptr, stream);
        ptr = nullptr;
        return e;
    }
    AsyncBuffer(const AsyncBuffer &) = delete;
    AsyncBuffer &operator=(const AsyncBuffer &) = delete;
};

}  // namespace

__global__ void isect_count_kernel(int64_t total, const int32_t *__restrict__ radii,
                                   const float *__restrict__ means2d, int tile_size,
                                   int tile_w, int tile_h, int64_t *__restrict__ counts) {
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= total) return;
    const int32_t rx = radii[2 * idx], ry = radii[2 * idx + 1];
    int64_t n = 0;
    if (rx > 0 && ry > 0) {
        int x0, x1, y0, y1;
        lf::tile_bounds(lf::v2{means2d[2 * idx], means2d[2 * idx + 1]}, rx, ry, tile_size,
                        tile_w, tile_h, x0, x1, y0, y1);
        n = (int64_t)(x1 - x0) * (int64_t)(y1 - y0);
    }
    counts[idx] = n;
}

__global__ void isect_fill_kernel(int64_t total, int N, const int32_t *__restrict__ radii,
                                  const float *__restrict__ means2d,
                                  const float *__restrict__ depths, int tile_size,
                                  int tile_w, int tile_h, int tile_bits,
                                  const int64_t *__restrict__ cum_tiles, int64_t n_isects,
                                  uint64_t *__restrict__ keys, int32_t *__restrict__ vals) {
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= total) return;
    const int32_t rx = radii[2 * idx], ry = radii[2 * idx + 1];
    if (!(rx > 0 && ry > 0)) return;
    int x0, x1, y0, y1;
    lf::tile_bounds(lf::v2{means2d[2 * idx], means2d[2 * idx + 1]}, rx, ry, tile_size, tile_w,
                    tile_h, x0, x1, y0, y1);
    const uint64_t cam = (uint64_t)(idx / N);
    const uint64_t depth_bits = (uint64_t)__float_as_uint(depths[idx]);
    const uint64_t hi = cam << (32 + tile_bits);
    int64_t cur = idx == 0 ? 0 : cum_tiles[idx - 1];
    const int64_t stop = cum_tiles[idx] < n_isects ? cum_tiles[idx] : n_isects;
    for (int ty = y0; ty < y1; ++ty) {
        for (int tx = x0; tx < x1; ++tx) {
            if (cur >= stop) return;  // inconsistent cum_tiles / n_isects: never write out of bounds
            const uint64_t tile_id = (uint64_t)ty * tile_w + tx;
            keys[cur] = hi | (tile_id << 32) | depth_bits;
            vals[cur] = (int32_t)idx;
            ++cur;
        }
    }
}

// tile_offsets[t] = first i with (keys[i] >> 32) >= (c << tile_bits | tile_id)
__global__ void tile_offsets_kernel(int64_t n_tiles_total, int n_tiles, int tile_bits,
                                    const uint64_t *__restrict__ keys, int64_t n_isects,
                                    int32_t *__restrict__ offsets) {
    const int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n_tiles_total) return;
    const uint64_t c = (uint64_t)(t / n_tiles), tile_id = (uint64_t)(t % n_tiles);
    const uint64_t target = (c << tile_bits) | tile_id;
    int64_t lo = 0, hi = n_isects;
    while (lo < hi) {
        const int64_t mid = lo + ((hi - lo) >> 1);
        if ((keys[mid] >> 32) < target) lo = mid + 1;
        else hi = mid;
    }
    offsets[t] = (int32_t)lo;
}

int launch_isect_count(int C, int N, const int32_t *radii,
                       const float *means2d, int tile_size, int tile_width,
                       int tile_height, int64_t *cum_tiles, int64_t *n_isects,
                       cudaStream_t stream) {
    const int64_t total = (int64_t)C * N;
    *n_isects = 0;
    if (total == 0) return LF_OK;
    isect_count_kernel<<<grid_for(total, kBlock), kBlock, 0, stream>>>(
        total, radii, means2d, tile_size, tile_width, tile_height, cum_tiles);
    LFC_CHECK_LAUNCH("isect_count_kernel", stream);

    size_t temp_bytes = 0;
    LFC_CHECK(cub::DeviceScan::InclusiveSum(nullptr, temp_bytes, cum_tiles, (int)total, stream));
    AsyncBuffer temp(stream);
    LFC_CHECK(temp.alloc(temp_bytes));
    LFC_CHECK(cub::DeviceScan::InclusiveSum(temp.ptr, temp_bytes, cum_tiles, (int)total, stream));
    LFC_CHECK_LAUNCH("cub::DeviceScan::InclusiveSum", stream);
    LFC_CHECK(temp.release());

    int64_t n = 0;
    LFC_CHECK(cudaMemcpyAsync(&n, cum_tiles + (total - 1), sizeof(int64_t),
                              cudaMemcpyDeviceToHost, stream));
    LFC_CHECK(cudaStreamSynchronize(stream));
    *n_isects = n;
    return LF_OK;
}

int launch_isect_fill(int C, int N, const int32_t *radii, const float *means2d,
                      const float *depths, int tile_size, int tile_width,
                      int tile_height, const int64_t *cum_tiles,
                      int64_t n_isects, int64_t *isect_ids,
                      int32_t *flatten_ids, int32_t *tile_offsets,
                      cudaStream_t stream) {
    const int64_t total = (int64_t)C * N;
    const int n_tiles = tile_width * tile_height;
    const int64_t n_tiles_total = (int64_t)C * n_tiles;
    const int tile_bits = bit_width(n_tiles);
    const int cam_bits = bit_width(C);
    if (32 + tile_bits + cam_bits > 64)
        return set_error(LF_ERR_ARG,
                         "lf_isect_fill: %d cameras x %d tiles do not fit the 64-bit sort key",
                         C, n_tiles);

    if (n_isects == 0 || total == 0) {
        if (n_tiles_total > 0)
            LFC_CHECK(cudaMemsetAsync(tile_offsets, 0, n_tiles_total * sizeof(int32_t), stream));
        return LF_OK;
    }

    AsyncBuffer keys_tmp(stream), vals_tmp(stream), temp(stream);
    LFC_CHECK(keys_tmp.alloc(n_isects * sizeof(uint64_t)));
    LFC_CHECK(vals_tmp.alloc(n_isects * sizeof(int32_t)));
    uint64_t *keys_in = static_cast<uint64_t *>(keys_tmp.ptr);
    int32_t *vals_in = static_cast<int32_t *>(vals_tmp.ptr);
    uint64_t *keys_out = reinterpret_cast<uint64_t *>(isect_ids);

    isect_fill_kernel<<<grid_for(total, kBlock), kBlock, 0, stream>>>(
        total, N, radii, means2d, depths, tile_size, tile_width, tile_height, tile_bits,
        cum_tiles, n_isects, keys_in, vals_in);
    LFC_CHECK_LAUNCH("isect_fill_kernel", stream);

    const int end_bit = 32 + tile_bits + cam_bits;
    const int n = (int)n_isects;
    size_t temp_bytes = 0;
    LFC_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, keys_in, keys_out, vals_in,
                                              flatten_ids, n, 0, end_bit, stream));
    LFC_CHECK(temp.alloc(temp_bytes));
    LFC_CHECK(cub::DeviceRadixSort::SortPairs(temp.ptr, temp_bytes, keys_in, keys_out, vals_in,
                                              flatten_ids, n, 0, end_bit, stream));
    LFC_CHECK_LAUNCH("cub::DeviceRadixSort::SortPairs", stream);
    LFC_CHECK(temp.release());
    LFC_CHECK(vals_tmp.release());
    LFC_CHECK(keys_tmp.release());

    if (n_tiles_total > 0) {
        tile_offsets_kernel<<<grid_for(n_tiles_total, kBlock), kBlock, 0, stream>>>(
            n_tiles_total, n_tiles, tile_bits, keys_out, n_isects, tile_offsets);
        LFC_CHECK_LAUNCH("tile_offsets_kernel", stream);
    }
    return LF_OK;
}

}  // namespace lfc
