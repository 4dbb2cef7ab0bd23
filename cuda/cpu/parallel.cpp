// Threads for the CPU driver (see parallel.h): the process's OpenMP runtime when
// built with -fopenmp, else a persistent pool of our own.
#include "parallel.h"

#include <atomic>
#include <condition_variable>
#include <exception>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>
#ifdef __linux__
#include <sched.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

namespace lfcpu {

#ifndef _OPENMP
namespace {

thread_local bool t_in_pool = false;

int detect_threads() {
    if (const char *env = std::getenv("LANGFIELD_NUM_THREADS")) {
        int n = std::atoi(env);
        if (n > 0) return n;
    }
#ifdef __linux__
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) {
        int n = CPU_COUNT(&set);
        if (n > 0) return n;
    }
#endif
    unsigned n = std::thread::hardware_concurrency();
    return n > 0 ? (int)n : 1;
}

class Pool {
  public:
    explicit Pool(int n) : n_threads_(n) {
        for (int i = 1; i < n_threads_; ++i) std::thread([this, i] { worker(i); }).detach();
    }
    int size() const { return n_threads_; }

    void run(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t, int)> &fn) {
        std::lock_guard<std::mutex> call_lock(call_mutex_);  // one job at a time
        {
            std::lock_guard<std::mutex> lk(m_);
            fn_ = &fn;
            n_ = n;
            grain_ = grain;
            next_.store(0);
            active_ = n_threads_ - 1;
            ++generation_;
        }
        cv_work_.notify_all();
        t_in_pool = true;
        work(0);
        t_in_pool = false;
        std::exception_ptr err;
        {
            std::unique_lock<std::mutex> lk(m_);
            cv_done_.wait(lk, [this] { return active_ == 0; });
            fn_ = nullptr;
            err = error_;
            error_ = nullptr;
        }
        if (err) std::rethrow_exception(err);  // e.g. std::bad_alloc in a worker: reported by the caller
    }

  private:
    void work(int tid) {
        for (;;) {
            int64_t b = next_.fetch_add(grain_);
            if (b >= n_) break;
            int64_t e = b + grain_ < n_ ? b + grain_ : n_;
            try {
                (*fn_)(b, e, tid);
            } catch (...) {
                std::lock_guard<std::mutex> lk(m_);
                if (!error_) error_ = std::current_exception();
                next_.store(n_);  // stop handing out work
            }
        }
    }
    void worker(int tid) {
        t_in_pool = true;
        uint64_t seen = 0;
        for (;;) {
            {
                std::unique_lock<std::mutex> lk(m_);
                cv_work_.wait(lk, [&] { return generation_ != seen; });
                seen = generation_;
            }
            work(tid);
            {
                std::lock_guard<std::mutex> lk(m_);
                if (--active_ == 0) cv_done_.notify_one();
            }
        }
    }

    const int n_threads_;
    std::mutex call_mutex_, m_;
    std::condition_variable cv_work_, cv_done_;
    const std::function<void(int64_t, int64_t, int)> *fn_ = nullptr;
    int64_t n_ = 0, grain_ = 1;
    std::atomic<int64_t> next_{0};
    int active_ = 0;
    uint64_t generation_ = 0;
    std::exception_ptr error_;
};

Pool &pool() {
    static Pool *p = new Pool(detect_threads());  // leaked on purpose: workers are detached
    return *p;
}

}  // namespace
#endif

#ifdef _OPENMP
// OpenMP build: the team is the host process's OpenMP runtime. Inside torch this is
// torch's own libgomp (same soname, loaded once), so our parallel regions and
// torch's ops share one set of threads instead of spinning against each other.
int num_threads() {
    // LANGFIELD_NUM_THREADS is read once: scratch buffers sized by one call and the team
    // started by another must agree. Otherwise the calling thread's OpenMP thread count
    // (torch.set_num_threads sets it for the thread that calls it).
    static const int fixed = [] {
        const char *env = std::getenv("LANGFIELD_NUM_THREADS");
        return env ? std::atoi(env) : 0;
    }();
    if (fixed > 0) return fixed;
    int n = omp_get_max_threads();
    return n > 0 ? n : 1;
}

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t, int)> &fn) {
    if (n <= 0) return;
    if (grain < 1) grain = 1;
    const int nt = num_threads();
    if (omp_in_parallel() || n <= grain || nt == 1) {
        fn(0, n, 0);
        return;
    }
    std::atomic<int64_t> next{0};
    std::exception_ptr error;
    std::mutex m;
#pragma omp parallel num_threads(nt)
    {
        const int tid = omp_get_thread_num();
        for (;;) {
            int64_t b = next.fetch_add(grain);
            if (b >= n) break;
            int64_t e = b + grain < n ? b + grain : n;
            try {
                fn(b, e, tid);
            } catch (...) {
                std::lock_guard<std::mutex> lk(m);
                if (!error) error = std::current_exception();
                next.store(n);
            }
        }
    }
    if (error) std::rethrow_exception(error);
}
#else
int num_threads() { return pool().size(); }

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t, int)> &fn) {
    if (n <= 0) return;
    if (grain < 1) grain = 1;
    if (t_in_pool || n <= grain || pool().size() == 1) {
        fn(0, n, 0);
        return;
    }
    pool().run(n, grain, fn);
}
#endif

}  // namespace lfcpu
