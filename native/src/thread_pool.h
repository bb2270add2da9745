// A persistent thread pool: n_threads - 1 workers plus the calling thread.
//
// Spin policy: after a job, idle workers spin (pause, with a sched_yield every 64 pauses so a
// runnable thread of torch or of another process gets the core) for spin_us microseconds,
// then sleep on a futex. The default (2000 us) covers the gap between two MoE layers of a
// decode step (~100-200 us of GPU attention in hybrid decode), so a call finds its workers
// awake; an idle runner stops burning CPU once the spin has run out. KRASIS_NATIVE_SPIN_US
// sets it (0 = sleep at once); a value that is not an integer in [0, 60000000] is a
// std::invalid_argument (ValueError in Python).
//
// Jobs: run() takes up to kMaxPhases phases of tasks; every task of a phase finishes before any
// task of the next starts (a spin barrier inside one job, so an M=1 MoE call wakes the pool
// once). Each phase's tasks are split into one contiguous range per thread; a thread drains its
// own range (one uncontended atomic per task, neighbouring rows in memory), then takes what is
// left of the others' ranges, so a late or descheduled thread does not hold the phase up.
// run() returns when every task is done and no worker is still inside the job.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

namespace krasis {

constexpr int kDefaultSpinUs = 2000;

class ThreadPool {
  public:
    using TaskFn = void (*)(void* ctx, int task);
    struct Phase {
        TaskFn fn;
        void* ctx;
        int n_tasks;
    };
    static constexpr int kMaxPhases = 2;

    // spin_us < 0: KRASIS_NATIVE_SPIN_US, else kDefaultSpinUs.
    explicit ThreadPool(int n_threads, int spin_us = -1);
    ~ThreadPool();
    ThreadPool(const ThreadPool&) = delete;
    ThreadPool& operator=(const ThreadPool&) = delete;

    int size() const { return int(workers_.size()) + 1; }
    int spin_us() const { return spin_us_; }
    void run(const Phase* phases, int n_phases);

    // fn(int task) for task in [0, n_tasks), no allocation (fn is passed by pointer).
    template <class F>
    void parallel_for(int n_tasks, F& fn) {
        const Phase phase{&call<F>, &fn, n_tasks};
        run(&phase, 1);
    }

    // f1(i) for i in [0, n1), then (all done) f2(j) for j in [0, n2), in one job.
    template <class F1, class F2>
    void parallel_for2(int n1, F1& f1, int n2, F2& f2) {
        const Phase phases[2] = {{&call<F1>, &f1, n1}, {&call<F2>, &f2, n2}};
        run(phases, 2);
    }

  private:
    struct alignas(64) Range {  // one thread's share of a phase: tasks [next, end)
        std::atomic<int> next{0};
        int end = 0;
    };

    template <class F>
    static void call(void* ctx, int i) {
        (*static_cast<F*>(ctx))(i);
    }

    void worker_loop(int self);
    void wait_for_job(uint32_t seen);
    void work(int self);
    int drain_phase(int phase, int self);

    std::vector<std::thread> workers_;
    std::unique_ptr<Range[]> ranges_;  // [kMaxPhases * size()]
    Phase phases_[kMaxPhases] = {};
    int n_phases_ = 0;
    int spin_us_ = kDefaultSpinUs;
    alignas(64) std::atomic<uint32_t> generation_{0};  // futex word: bumped per job
    alignas(64) std::atomic<int> done_{0};             // tasks finished in the current job
    alignas(64) std::atomic<int> active_{0};           // workers inside the current job
    std::atomic<int> sleepers_{0};                     // workers asleep on the futex
    std::atomic<bool> open_{false};                    // a job is being run
    std::atomic<bool> stop_{false};
};

int default_threads();  // usable cores minus one (at least 1)
int spin_us_from_env();  // KRASIS_NATIVE_SPIN_US, or kDefaultSpinUs when unset or empty

}  // namespace krasis
