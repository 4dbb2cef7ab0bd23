// A small persistent thread pool for the CPU driver.
//
// Not OpenMP on purpose: torch ships its own OpenMP runtime, and two OpenMP
// runtimes in one process spin-wait against each other after every parallel
// region (a 50x slowdown of small torch ops on a 2-core machine was measured).
// Idle workers here sleep on a condition variable.
//
// LANGFIELD_NUM_THREADS sets the number of threads (default: the CPUs this
// process may run on). Calls from several host threads at once are
// serialised; a call from inside a parallel region runs inline.
#pragma once
#include <stdint.h>
#include <functional>

namespace lfcpu {

int num_threads();

// Calls fn(begin, end, tid) over [0, n) in chunks of `grain` items, handed out
// dynamically; tid < num_threads() identifies the calling thread (for scratch
// buffers).
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t, int)> &fn);

}  // namespace lfcpu
