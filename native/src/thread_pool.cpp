// Persistent thread pool (see thread_pool.h). Memory order: run() writes the job (phases_,
// ranges_, done_) before open_ and generation_ (seq_cst); a worker registers in active_ before
// it reads open_, and run() clears open_ before it waits for active_ to reach 0, so a worker
// either sees the job closed or is waited for (no worker touches a job after run() returns).
// A sleeper counts itself in sleepers_ before futex_wait, which re-checks generation_ in the
// kernel; run() bumps generation_ before it reads sleepers_, so no wake-up is lost.
#include "thread_pool.h"

#include <linux/futex.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include <immintrin.h>

namespace krasis {

namespace {

constexpr int kMaxSpinUs = 60000000;
constexpr int kPausesBeforeYield = 1 << 10;  // ~50 us, then sched_yield (oversubscribed cores)
constexpr int kPausesPerYield = 63;          // idle spin: a clock check and a yield every 64

void futex_wait(std::atomic<uint32_t>* word, uint32_t expected) {
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT_PRIVATE, expected, nullptr,
            nullptr, 0);
}

void futex_wake_all(std::atomic<uint32_t>* word) {
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr,
            nullptr, 0);
}

// Waits for done() on work that is running now: pause, then yield the core if it takes long.
template <class Done>
void spin_until(Done done) {
    for (int i = 0; !done(); ++i) {
        if (i < kPausesBeforeYield) {
            _mm_pause();
        } else {
            sched_yield();
        }
    }
}

}  // namespace

int default_threads() {
    cpu_set_t set;
    int cores = int(std::thread::hardware_concurrency());
    if (sched_getaffinity(0, sizeof(set), &set) == 0) cores = CPU_COUNT(&set);
    return cores > 1 ? cores - 1 : 1;
}

int spin_us_from_env() {
    const char* env = std::getenv("KRASIS_NATIVE_SPIN_US");
    if (env == nullptr || *env == '\0') return kDefaultSpinUs;
    char* end = nullptr;
    errno = 0;
    const long value = std::strtol(env, &end, 10);
    if (errno != 0 || end == env || *end != '\0' || value < 0 || value > kMaxSpinUs)
        throw std::invalid_argument("KRASIS_NATIVE_SPIN_US must be an integer number of "
                                    "microseconds in [0, " + std::to_string(kMaxSpinUs) +
                                    "], got '" + std::string(env) + "'");
    return int(value);
}

ThreadPool::ThreadPool(int n_threads, int spin_us)
    : ranges_(new Range[size_t(kMaxPhases) * size_t(n_threads > 1 ? n_threads : 1)]),
      spin_us_(spin_us >= 0 ? spin_us : spin_us_from_env()) {
    for (int i = 1; i < n_threads; ++i) workers_.emplace_back([this, i] { worker_loop(i); });
}

ThreadPool::~ThreadPool() {
    stop_.store(true);
    generation_.fetch_add(1);
    futex_wake_all(&generation_);
    for (auto& w : workers_) w.join();
}

// Runs what is left of phase `phase`, own range first; returns the number of tasks run.
int ThreadPool::drain_phase(int phase, int self) {
    const int n = size();
    const Phase& p = phases_[phase];
    Range* ranges = ranges_.get() + size_t(phase) * n;
    int count = 0;
    for (int j = 0; j < n; ++j) {
        Range& r = ranges[(self + j) % n];
        if (r.next.load(std::memory_order_relaxed) >= r.end) continue;
        for (int i = r.next.fetch_add(1); i < r.end; i = r.next.fetch_add(1)) {
            p.fn(p.ctx, i);
            ++count;
        }
    }
    return count;
}

void ThreadPool::work(int self) {
    int before = 0;  // tasks of the earlier phases
    for (int phase = 0; phase < n_phases_; ++phase) {
        if (phase > 0) spin_until([&] { return done_.load(std::memory_order_acquire) >= before; });
        const int count = drain_phase(phase, self);
        if (count > 0) done_.fetch_add(count, std::memory_order_acq_rel);
        before += phases_[phase].n_tasks;
    }
}

void ThreadPool::run(const Phase* phases, int n_phases) {
    int total = 0, largest = 0;
    for (int k = 0; k < n_phases; ++k) {
        total += phases[k].n_tasks;
        largest = phases[k].n_tasks > largest ? phases[k].n_tasks : largest;
    }
    if (total <= 0) return;
    if (workers_.empty() || largest == 1) {
        for (int k = 0; k < n_phases; ++k)
            for (int i = 0; i < phases[k].n_tasks; ++i) phases[k].fn(phases[k].ctx, i);
        return;
    }
    const int n = size();
    n_phases_ = n_phases;
    for (int k = 0; k < n_phases; ++k) {
        phases_[k] = phases[k];
        const int tasks = phases[k].n_tasks;
        for (int t = 0; t < n; ++t) {
            Range& r = ranges_[size_t(k) * n + t];
            r.next.store(int(int64_t(tasks) * t / n), std::memory_order_relaxed);
            r.end = int(int64_t(tasks) * (t + 1) / n);
        }
    }
    done_.store(0, std::memory_order_relaxed);
    open_.store(true);
    generation_.fetch_add(1);
    if (sleepers_.load() > 0) futex_wake_all(&generation_);
    work(0);
    spin_until([&] { return done_.load(std::memory_order_acquire) == total; });
    open_.store(false);
    spin_until([&] { return active_.load() == 0; });
}

void ThreadPool::wait_for_job(uint32_t seen) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::microseconds(spin_us_);
    for (int i = 0; spin_us_ > 0 && generation_.load(std::memory_order_acquire) == seen; ++i) {
        _mm_pause();
        if ((i & kPausesPerYield) == kPausesPerYield) {
            if (std::chrono::steady_clock::now() > deadline) break;
            sched_yield();  // polite: a runnable thread (torch's, another process's) gets the core
        }
    }
    while (generation_.load() == seen) {
        sleepers_.fetch_add(1);
        futex_wait(&generation_, seen);
        sleepers_.fetch_sub(1);
    }
}

void ThreadPool::worker_loop(int self) {
    uint32_t seen = 0;
    for (;;) {
        wait_for_job(seen);
        if (stop_.load()) return;
        active_.fetch_add(1);
        seen = generation_.load();
        if (open_.load()) work(self);
        active_.fetch_sub(1);
    }
}

}  // namespace krasis
