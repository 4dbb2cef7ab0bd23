// CPU driver: version and error reporting.
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
