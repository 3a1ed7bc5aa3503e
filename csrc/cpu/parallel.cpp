#include "parallel.h"

#include <dlfcn.h>
#include <link.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <atomic>

namespace kbit {

namespace {

const int kMaxThreads = 256;

/* One parallel_for call: threads take chunks of `chunk` items from `next` until none are left, so a
 * thread that starts late or is descheduled (the machine is shared) just takes fewer chunks. */
struct Task {
  range_fn fn;
  void* ctx;
  int64_t count;
  int64_t chunk;
  std::atomic<int64_t> next;
};

void run_task(Task* t) {
  for (;;) {
    int64_t begin = t->next.fetch_add(t->chunk, std::memory_order_relaxed);
    if (begin >= t->count) return;
    int64_t end = t->count - begin < t->chunk ? t->count : begin + t->chunk;
    t->fn(t->ctx, begin, end);
  }
}

/* Worker threads, started on first use and then kept, asleep on `wake` between calls (a thread
 * start costs ~30-40 us, a wake-up a few). A call publishes its Task, runs chunks itself, then
 * closes the task and waits only for the workers that joined it: a worker that wakes after the
 * close goes back to sleep without touching the (caller-owned) Task.
 * fork(): the child has none of the parent's workers; the atfork handlers reset the pool there,
 * and it restarts on the child's first call. Unload/exit: the destructor stops and joins them. */
struct Pool {
  pthread_mutex_t lock;
  pthread_cond_t wake; /* workers: a task was published, or stop */
  pthread_cond_t idle; /* the caller: the last joined worker left */
  Task* task;          /* the open task, or NULL */
  uint64_t serial;     /* bumped per published task */
  int open_slots;      /* workers that may still join the open task */
  int joined;          /* workers inside the task */
  int workers;         /* threads started */
  bool stop;
  pthread_t ids[kMaxThreads];
};

Pool g_pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER, NULL, 0, 0, 0, 0,
               false, {}};
/* One pooled call at a time; a concurrent call (another application thread) runs on its own thread. */
pthread_mutex_t g_call_lock = PTHREAD_MUTEX_INITIALIZER;
pthread_once_t g_atfork_once = PTHREAD_ONCE_INIT;

void* worker_main(void*) {
  Pool& p = g_pool;
  uint64_t seen = 0;
  pthread_mutex_lock(&p.lock);
  for (;;) {
    while (!p.stop && p.serial == seen) pthread_cond_wait(&p.wake, &p.lock);
    if (p.stop) break;
    seen = p.serial;
    if (p.task == NULL || p.open_slots <= 0) continue; /* closed already, or enough helpers */
    --p.open_slots;
    ++p.joined;
    Task* t = p.task;
    pthread_mutex_unlock(&p.lock);
    run_task(t);
    pthread_mutex_lock(&p.lock);
    if (--p.joined == 0) pthread_cond_signal(&p.idle);
  }
  pthread_mutex_unlock(&p.lock);
  return NULL;
}

void atfork_prepare() {
  pthread_mutex_lock(&g_call_lock); /* no call in flight while the address space is copied */
  pthread_mutex_lock(&g_pool.lock);
}
void atfork_parent() {
  pthread_mutex_unlock(&g_pool.lock);
  pthread_mutex_unlock(&g_call_lock);
}
void atfork_child() {
  Pool& p = g_pool;
  p.task = NULL;
  p.open_slots = p.joined = p.workers = 0;
  p.serial = 0;
  pthread_cond_init(&p.wake, NULL); /* the parent's waiters do not exist here */
  pthread_cond_init(&p.idle, NULL);
  pthread_mutex_unlock(&p.lock);
  pthread_mutex_unlock(&g_call_lock);
}
void register_atfork() { pthread_atfork(atfork_prepare, atfork_parent, atfork_child); }

__attribute__((destructor)) void stop_workers() {
  Pool& p = g_pool;
  pthread_mutex_lock(&p.lock);
  p.stop = true;
  int n = p.workers;
  pthread_cond_broadcast(&p.wake);
  pthread_mutex_unlock(&p.lock);
  for (int i = 0; i < n; ++i) pthread_join(p.ids[i], NULL);
}

/* The process's OpenMP runtime (libgomp, e.g. the one torch loads), found among the loaded objects
 * and never loaded by kbit: when there is one, parallel_for runs on its thread team, so kbit's work
 * and torch's share one set of threads instead of two sets contending for the cores (torch's OpenMP
 * threads spin for a while after each parallel region, and would take the cores from kbit's own).
 * Not used in a fork()ed child (libgomp's team does not survive a fork) or with KBIT_CPU_OPENMP=0. */
struct OpenMP {
  void (*parallel)(void (*)(void*), void*, unsigned, unsigned); /* GOMP_parallel */
  int (*max_threads)();                                         /* omp_get_max_threads */
  int (*in_parallel)();                                         /* omp_in_parallel */
};

int find_libgomp(struct dl_phdr_info* info, size_t, void* out) {
  const char* name = info->dlpi_name;
  const char* base = name != NULL ? strrchr(name, '/') : NULL;
  base = base != NULL ? base + 1 : name;
  if (base == NULL || strncmp(base, "libgomp", 7) != 0) return 0;
  void* handle = dlopen(name, RTLD_LAZY | RTLD_NOLOAD); /* already loaded: no new code is mapped */
  if (handle == NULL) return 0;
  OpenMP* omp = static_cast<OpenMP*>(out);
  *reinterpret_cast<void**>(&omp->parallel) = dlsym(handle, "GOMP_parallel");
  *reinterpret_cast<void**>(&omp->max_threads) = dlsym(handle, "omp_get_max_threads");
  *reinterpret_cast<void**>(&omp->in_parallel) = dlsym(handle, "omp_in_parallel");
  if (omp->parallel == NULL || omp->max_threads == NULL || omp->in_parallel == NULL) {
    *omp = OpenMP{NULL, NULL, NULL};
    return 0;
  }
  return 1;
}

/* The OpenMP runtime to use for this call, or NULL. Looked up once per process (pid): an OpenMP
 * runtime loaded later (torch imported after kbit's first call) is not seen. */
const OpenMP* openmp() {
  static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
  static OpenMP omp = {NULL, NULL, NULL};
  static pid_t probed_in = 0;
  const char* env = getenv("KBIT_CPU_OPENMP");
  if (env != NULL && strcmp(env, "0") == 0) return NULL;
  pid_t pid = getpid();
  pthread_mutex_lock(&lock);
  if (probed_in == 0) {
    dl_iterate_phdr(find_libgomp, &omp);
    probed_in = pid;
  }
  const OpenMP* r = probed_in == pid && omp.parallel != NULL ? &omp : NULL;
  pthread_mutex_unlock(&lock);
  if (r != NULL && r->in_parallel()) return NULL; /* called from inside a parallel region: run serially */
  return r;
}

void openmp_body(void* task) { run_task(static_cast<Task*>(task)); }

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
  const OpenMP* omp = openmp();
  if (omp != NULL && getenv("KBIT_NUM_THREADS") == NULL) {
    int t = omp->max_threads(); /* torch.set_num_threads applies to kbit too */
    threads = t < 1 ? 1 : (t > kMaxThreads ? kMaxThreads : t);
  }
  int64_t by_grain = (count + grain - 1) / grain;
  if (threads > by_grain) threads = by_grain;
  if (threads <= 1 || pthread_mutex_trylock(&g_call_lock) != 0) {
    fn(ctx, 0, count);
    return;
  }
  pthread_once(&g_atfork_once, register_atfork);
  Task task;
  task.fn = fn;
  task.ctx = ctx;
  task.count = count;
  task.chunk = grain;
  task.next.store(0, std::memory_order_relaxed);
  if (omp != NULL) {
    omp->parallel(openmp_body, &task, (unsigned)threads, 0);
    pthread_mutex_unlock(&g_call_lock);
    return;
  }
  Pool& p = g_pool;
  pthread_mutex_lock(&p.lock);
  /* A thread that cannot start (resource limits) leaves its share to the others. */
  while (p.workers < threads - 1 && pthread_create(&p.ids[p.workers], NULL, worker_main, NULL) == 0) ++p.workers;
  p.task = &task;
  ++p.serial;
  p.open_slots = (int)(threads - 1 < p.workers ? threads - 1 : p.workers);
  pthread_cond_broadcast(&p.wake);
  pthread_mutex_unlock(&p.lock);
  run_task(&task);
  pthread_mutex_lock(&p.lock);
  p.task = NULL;
  p.open_slots = 0;
  while (p.joined > 0) pthread_cond_wait(&p.idle, &p.lock);
  pthread_mutex_unlock(&p.lock);
  pthread_mutex_unlock(&g_call_lock);
}

}  // namespace kbit
