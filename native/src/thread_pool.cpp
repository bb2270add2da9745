// Persistent thread pool (see thread_pool.h).
#include "thread_pool.h"

#include <sched.h>

#include <chrono>

#include <immintrin.h>

namespace krasis {

namespace {

constexpr auto kSpin = std::chrono::microseconds(20);  // then sleep on the condition variable

// Spins (with pause) until done() or kSpin has passed; returns done().
template <class Done>
bool spin_briefly(Done done) {
    const auto deadline = std::chrono::steady_clock::now() + kSpin;
    for (int i = 0;; ++i) {
        if (done()) return true;
        _mm_pause();
        if ((i & 63) == 63 && std::chrono::steady_clock::now() > deadline) return done();
    }
}

}  // namespace

int default_threads() {
    cpu_set_t set;
    int cores = int(std::thread::hardware_concurrency());
    if (sched_getaffinity(0, sizeof(set), &set) == 0) cores = CPU_COUNT(&set);
    return cores > 1 ? cores - 1 : 1;
}

ThreadPool::ThreadPool(int n_threads) {
    for (int i = 1; i < n_threads; ++i) workers_.emplace_back([this] { worker_loop(); });
}

ThreadPool::~ThreadPool() {
    {
        std::lock_guard<std::mutex> lock(mu_);
        stop_ = true;
        generation_.fetch_add(1);
    }
    cv_work_.notify_all();
    for (auto& w : workers_) w.join();
}

void ThreadPool::drain() {
    const int n = n_tasks_;
    for (int i = next_task_.fetch_add(1); i < n; i = next_task_.fetch_add(1)) fn_(ctx_, i);
}

void ThreadPool::run(int n_tasks, TaskFn fn, void* ctx) {
    if (n_tasks <= 0) return;
    if (workers_.empty() || n_tasks == 1) {
        for (int i = 0; i < n_tasks; ++i) fn(ctx, i);
        return;
    }
    {
        std::lock_guard<std::mutex> lock(mu_);
        fn_ = fn;
        ctx_ = ctx;
        n_tasks_ = n_tasks;
        next_task_.store(0);
        pending_workers_.store(int(workers_.size()));
        generation_.fetch_add(1);
    }
    cv_work_.notify_all();
    drain();
    if (!spin_briefly([this] { return pending_workers_.load() == 0; })) {
        std::unique_lock<std::mutex> lock(mu_);
        cv_done_.wait(lock, [this] { return pending_workers_.load() == 0; });
    }
}

void ThreadPool::worker_loop() {
    uint64_t seen = 0;
    for (;;) {
        spin_briefly([&] { return generation_.load() != seen; });
        {
            std::unique_lock<std::mutex> lock(mu_);
            cv_work_.wait(lock, [&] { return generation_.load() != seen; });
            seen = generation_.load();
            if (stop_) return;
        }
        drain();
        if (pending_workers_.fetch_sub(1) == 1) {
            std::lock_guard<std::mutex> lock(mu_);
            cv_done_.notify_one();
        }
    }
}

}  // namespace krasis
