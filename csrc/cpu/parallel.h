/*
 * A small pthread-based parallel-for for the CPU library (no OpenMP: a host libgomp would tie the
 * wheel to this host's toolchain). Threads are created per call and joined before returning, so
 * there is no global state to break across fork() and nothing to shut down at unload; callers only
 * go parallel when the work is large enough to amortize the thread start (~tens of microseconds).
 */
#ifndef KBIT_CPU_PARALLEL_H_
#define KBIT_CPU_PARALLEL_H_

#include <stdint.h>

namespace kbit {

/* Threads to use: KBIT_NUM_THREADS if set to a positive integer, else the CPUs this process may
 * run on (affinity mask), else 1. Read on every call: cheap, and tests can change it. */
int cpu_thread_count();

/* Calls fn(ctx, begin, end) over [0, count) split into contiguous chunks of at least `grain`
 * items, on up to cpu_thread_count() threads (the caller's thread included). */
typedef void (*range_fn)(void* ctx, int64_t begin, int64_t end);
void parallel_for(int64_t count, int64_t grain, range_fn fn, void* ctx);

}  // namespace kbit

#endif /* KBIT_CPU_PARALLEL_H_ */
