#include "parallel.h"

#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <unistd.h>

namespace kbit {

namespace {

const int kMaxThreads = 256;

struct Chunk {
  range_fn fn;
  void* ctx;
  int64_t begin;
  int64_t end;
};

void* run_chunk(void* arg) {
  Chunk* c = static_cast<Chunk*>(arg);
  c->fn(c->ctx, c->begin, c->end);
  return NULL;
}

}  // namespace

int cpu_thread_count() {
  const char* env = getenv("KBIT_NUM_THREADS");
  if (env != NULL && *env != '\0') {
    char* end = NULL;
    long v = strtol(env, &end, 10);
    if (end != env && *end == '\0' && v > 0) return v > kMaxThreads ? kMaxThreads : (int)v;
  }
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) {
    int c = CPU_COUNT(&set);
    if (c > 0) return c > kMaxThreads ? kMaxThreads : c;
  }
#endif
  long c = sysconf(_SC_NPROCESSORS_ONLN);
  if (c < 1) return 1;
  return c > kMaxThreads ? kMaxThreads : (int)c;
}

void parallel_for(int64_t count, int64_t grain, range_fn fn, void* ctx) {
  if (count <= 0) return;
  if (grain < 1) grain = 1;
  int64_t threads = cpu_thread_count();
  int64_t by_grain = (count + grain - 1) / grain;
  if (threads > by_grain) threads = by_grain;
  if (threads <= 1) {
    fn(ctx, 0, count);
    return;
  }
  Chunk chunks[kMaxThreads];
  pthread_t ids[kMaxThreads];
  bool started[kMaxThreads];
  int64_t per = count / threads, extra = count % threads, pos = 0;
  for (int64_t t = 0; t < threads; ++t) {
    int64_t len = per + (t < extra ? 1 : 0);
    chunks[t] = Chunk{fn, ctx, pos, pos + len};
    pos += len;
  }
  for (int64_t t = 1; t < threads; ++t) {
    started[t] = pthread_create(&ids[t], NULL, run_chunk, &chunks[t]) == 0;
    /* A thread that cannot start (resource limits) is run on the caller's thread instead. */
    if (!started[t]) run_chunk(&chunks[t]);
  }
  run_chunk(&chunks[0]);
  for (int64_t t = 1; t < threads; ++t)
    if (started[t]) pthread_join(ids[t], NULL);
}

}  // namespace kbit
