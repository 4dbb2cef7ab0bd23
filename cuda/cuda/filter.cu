// Box filter of relevancy maps (lf_box_filter, langfield_abi.h) on lf_math.h's
// box_running_sums: one thread per (map, row, strip of BOX_STRIP columns) runs
// the strip's window sums into the double work buffer, then one thread per
// (map, column) runs down the column (adjacent threads read adjacent columns:
// coalesced) and writes the mean. The same sums in the same order as the CPU
// driver, so the two agree bit for bit.
#include "common.cuh"

namespace lfc {
namespace {

__global__ void box_rows_kernel(int rows, int width, int size, bool reflect, const float *__restrict__ in,
                                double *__restrict__ work) {
    const int strips = (width + lf::BOX_STRIP - 1) / lf::BOX_STRIP;
    const int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (int64_t)rows * strips) return;
    const int64_t r = t / strips;
    const int x0 = (int)(t % strips) * lf::BOX_STRIP, nx = min(lf::BOX_STRIP, width - x0);
    lf::box_running_sums(in + r * width, 1, width, size, reflect, x0, nx, work + r * width + x0, 1);
}

__global__ void box_cols_kernel(int n_maps, int height, int width, int size, bool reflect,
                                const double *__restrict__ work, float *__restrict__ out) {
    const int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (int64_t)n_maps * width) return;
    const int m = (int)(t / width), x = (int)(t % width);
    const double *h = work + (int64_t)m * height * width + x;
    float *o = out + (int64_t)m * height * width + x;
    const int a = (size - 1) / 2, b = size / 2;
    const double inv = 1.0 / ((double)size * size);
    double acc = 0.0;
    for (int k = -b; k <= a; ++k) acc += h[(int64_t)lf::box_border(k, height, reflect) * width];
    o[0] = (float)(acc * inv);
    for (int y = 1; y < height; ++y) {
        acc += h[(int64_t)lf::box_border(y + a, height, reflect) * width] -
               h[(int64_t)lf::box_border(y - 1 - b, height, reflect) * width];
        o[(int64_t)y * width] = (float)(acc * inv);
    }
}

}  // namespace

int launch_box_filter(int n_maps, int height, int width, int size, const float *in, double *work, float *out,
                      cudaStream_t stream) {
    const bool refl = lf::box_reflects(width, size) && lf::box_reflects(height, size);
    const int rows = n_maps * height;
    const int64_t row_tasks = (int64_t)rows * ((width + lf::BOX_STRIP - 1) / lf::BOX_STRIP);
    box_rows_kernel<<<(unsigned)((row_tasks + kBlock - 1) / kBlock), kBlock, 0, stream>>>(rows, width, size, refl, in,
                                                                                          work);
    LFC_CHECK_LAUNCH("box_rows_kernel", stream);
    const int64_t cols = (int64_t)n_maps * width;
    box_cols_kernel<<<(unsigned)((cols + kBlock - 1) / kBlock), kBlock, 0, stream>>>(n_maps, height, width, size,
                                                                                     refl, work, out);
    LFC_CHECK_LAUNCH("box_cols_kernel", stream);
    return LF_OK;
}

}  // namespace lfc
