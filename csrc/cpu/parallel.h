/*
 * A small pthread-based parallel-for for the CPU library (no OpenMP: a host libgomp would tie the
 * wheel to this host's toolchain). Worker threads start on the first parallel call and then sleep
 * between calls (parallel.cpp: reset in a fork()ed child, stopped and joined at unload); the work
 * is handed out in chunks from a shared counter, so a thread that is late or descheduled takes
 * fewer chunks instead of holding up the call.
 */
#ifndef KBIT_CPU_PARALLEL_H_
#define KBIT_CPU_PARALLEL_H_

#include <stdint.h>

namespace kbit {

/* Threads to use: KBIT_NUM_THREADS if set to a positive integer, else the CPUs this process may
 * run on (affinity mask), else 1. Read on every call: cheap, and tests can change it. */
int cpu_thread_count();

/* Calls fn(ctx, begin, end) over [0, count) split into contiguous chunks of `grain` items (the
 * last one shorter), on up to cpu_thread_count() threads (the caller's thread included), in any
 * order and possibly several chunks per thread; returns when all have run. A call made while
 * another thread's call is in flight runs on its caller's thread alone. */
typedef void (*range_fn)(void* ctx, int64_t begin, int64_t end);
void parallel_for(int64_t count, int64_t grain, range_fn fn, void* ctx);

}  // namespace kbit

#endif /* KBIT_CPU_PARALLEL_H_ */
