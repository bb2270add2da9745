// One dispatch point: the kernel table chosen from the CPU's features at first use, overridable
// by KRASIS_NATIVE_ISA=scalar|avx2|avx512 or select_isa().
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "kernels.h"

namespace krasis {

namespace {

const KernelTable* best_table() {
    if (const KernelTable* t = kernels_avx512()) return t;
    if (const KernelTable* t = kernels_avx2()) return t;
    return &kernels_scalar();
}

const KernelTable* table_by_name(const char* name) {
    if (std::strcmp(name, "auto") == 0) return best_table();
    if (std::strcmp(name, "scalar") == 0) return &kernels_scalar();
    if (std::strcmp(name, "avx2") == 0) return kernels_avx2();
    if (std::strcmp(name, "avx512") == 0) return kernels_avx512();
    return nullptr;
}

const KernelTable* initial_table() {
    const char* env = std::getenv("KRASIS_NATIVE_ISA");
    if (env != nullptr && *env != '\0') {
        if (const KernelTable* t = table_by_name(env)) return t;
    }
    return best_table();
}

std::atomic<const KernelTable*>& active_slot() {
    static std::atomic<const KernelTable*> slot{initial_table()};
    return slot;
}

}  // namespace

const KernelTable& active_kernels() { return *active_slot().load(std::memory_order_acquire); }

bool select_isa(const char* name) {
    const KernelTable* t = table_by_name(name);
    if (t == nullptr) return false;
    active_slot().store(t, std::memory_order_release);
    return true;
}

}  // namespace krasis
