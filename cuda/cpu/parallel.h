// Threads for the CPU driver.
//
// Built with -fopenmp (the default when the process's OpenMP runtime is GNU
// libgomp, as in pip's torch), parallel_for runs on that runtime's team: torch
// loads libgomp.so.1 first and our library binds to the same copy, so our
// regions and torch's ops share one set of threads. Two separate thread sets
// would spin-wait against each other after every parallel region (measured on
// 2 cores: 17 ms instead of 13 ms for one backward pass with our own pool
// competing with torch's spinning OpenMP workers, and a 50x slowdown of small
// torch ops with a second OpenMP runtime).
//
// Without -fopenmp (another runtime is loaded, LANGFIELD_OPENMP=0, or the
// compiler lacks OpenMP) a small persistent pool of our own is used; its idle
// workers sleep on a condition variable. Calls from several host threads at once
// are serialised there; a call from inside a parallel region runs inline.
//
// LANGFIELD_NUM_THREADS sets the number of threads, read once (default: the calling
// thread's OpenMP maximum, which torch.set_num_threads sets for the thread that calls
// it; with our own pool, the CPUs this process may run on). Calls from several host
// threads at once each get their own OpenMP team.
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
