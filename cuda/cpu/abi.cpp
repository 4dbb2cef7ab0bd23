// CPU driver: version and error reporting.
#include <cmath>
#include "common.h"

namespace lfcpu {
static thread_local std::string g_error;
void set_error(const std::string &msg) { g_error = msg; }
}  // namespace lfcpu

extern "C" {
LF_API int lf_abi_version(void) { return LF_ABI_VERSION; }
LF_API const char *lf_last_error(void) { return lfcpu::g_error.c_str(); }
LF_API int lf_num_threads(void) { return lfcpu::max_threads(); }
}

// CPU-only helper (not part of the shared ABI): number of NaN/Inf values in a
// float32 array. Single-threaded on purpose: it is called on small parameter
// tensors where a thread hand-off costs more than the scan.
extern "C" LF_API int64_t lf_cpu_count_nonfinite(const float *x, int64_t n) {
    int64_t bad = 0;
    for (int64_t i = 0; i < n; ++i) bad += !std::isfinite(x[i]);
    return bad;
}

// CPU-only helper: 1 when threads come from the process's OpenMP runtime, 0 for
// langfield's own pool (see parallel.h).
extern "C" LF_API int lf_cpu_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
