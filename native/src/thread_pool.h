// A persistent thread pool: n_threads - 1 workers plus the calling thread. Idle workers spin
// for 20 microseconds (so back-to-back phases of one MoE call start fast), then sleep on a
// condition variable. run() hands out task indices through an atomic counter and returns when
// every worker has checked in, so no worker touches a job after run() returns.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

namespace krasis {

class ThreadPool {
  public:
    using TaskFn = void (*)(void* ctx, int task);

    explicit ThreadPool(int n_threads);
    ~ThreadPool();
    ThreadPool(const ThreadPool&) = delete;
    ThreadPool& operator=(const ThreadPool&) = delete;

    int size() const { return int(workers_.size()) + 1; }
    void run(int n_tasks, TaskFn fn, void* ctx);

    // fn(int task) for task in [0, n_tasks), no allocation (fn is passed by pointer).
    template <class F>
    void parallel_for(int n_tasks, F& fn) {
        run(n_tasks, [](void* c, int i) { (*static_cast<F*>(c))(i); }, &fn);
    }

  private:
    void worker_loop();
    void drain();

    std::vector<std::thread> workers_;
    std::mutex mu_;
    std::condition_variable cv_work_;
    std::condition_variable cv_done_;
    std::atomic<uint64_t> generation_{0};
    std::atomic<int> next_task_{0};
    std::atomic<int> pending_workers_{0};
    bool stop_ = false;
    TaskFn fn_ = nullptr;
    void* ctx_ = nullptr;
    int n_tasks_ = 0;
};

int default_threads();  // usable cores minus one (at least 1)

}  // namespace krasis
