/*
 * The execution side of libkbit_cuda_emu.so: CUDA blocks as cooperative fibers, with the checks of
 * cuda_runtime.h (this folder) and the schedules tests choose with kbit_emu_configure().
 *
 * One launch at a time (a mutex): __shared__ variables are statics. Per block, every thread is a
 * fiber on its own stack (mmap'd, a guard page below it). The schedule repeatedly picks a ready
 * thread (the lowest, the highest, or a seeded random one), which runs until it reaches
 * __syncthreads() or a warp intrinsic, or exits. A warp intrinsic completes as soon as every lane
 * its mask names waits at it, so warps run ahead of each other between barriers as on a GPU (one
 * warp may finish its shuffles before another starts). When no thread is ready, the block barrier
 * completes if every thread of the block waits at the same __syncthreads(). Anything else is a
 * violation: the launch stops and fails with a message naming the kernel, the block and the
 * thread.
 */
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cinttypes>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "cuda_runtime.h"
#include "kbit.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define KBIT_EMU_ASAN 1
#else
#define KBIT_EMU_ASAN 0
#endif

namespace kbit_emu {

Coordinates g_coordinates;

namespace {

enum Schedule { kInOrder = 0, kReversed = 1, kRandom = 2 };

/* Fiber stacks: kernels keep a few KiB of locals; AddressSanitizer's frames are larger. */
const size_t kStackSize = KBIT_EMU_ASAN ? (1u << 20) : (256u << 10);
const int kMaxThreadsPerBlock = 1024;

/* ---- contexts ----
 * A context switch saves the callee-saved registers and the stack pointer; on x86-64 a few
 * instructions (switch_stacks), elsewhere ucontext (which also saves the signal mask: a system call
 * per switch, several times slower). */

#if defined(__x86_64__)
extern "C" void kbit_emu_switch_stacks(void** save_sp, void* load_sp);
asm(R"(
  .text
  .p2align 4
  .globl kbit_emu_switch_stacks
  .hidden kbit_emu_switch_stacks
  .type kbit_emu_switch_stacks, @function
kbit_emu_switch_stacks:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size kbit_emu_switch_stacks, .-kbit_emu_switch_stacks
)");

struct Context {
  void* sp = nullptr;
};

void swap_context(Context& save, Context& load) { kbit_emu_switch_stacks(&save.sp, load.sp); }

/* A stack whose first switch "returns" into entry with the stack aligned as after a call. */
void make_context(Context& c, char* stack, size_t size, void (*entry)()) {
  uintptr_t top = ((uintptr_t)(stack + size)) & ~(uintptr_t)15;
  uint64_t* sp = reinterpret_cast<uint64_t*>(top);
  *--sp = 0;                                   /* entry's return address: it never returns */
  *--sp = reinterpret_cast<uint64_t>(entry);   /* popped by ret */
  for (int r = 0; r < 6; ++r) *--sp = 0;       /* rbp rbx r12 r13 r14 r15 */
  --sp;
  uint32_t mxcsr;
  uint16_t fcw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fcw));
  memcpy(sp, &mxcsr, 4);
  memcpy(reinterpret_cast<char*>(sp) + 4, &fcw, 2);
  c.sp = sp;
}
#else
struct Context {
  ucontext_t uc;
};

void swap_context(Context& save, Context& load) { swapcontext(&save.uc, &load.uc); }

void make_context(Context& c, char* stack, size_t size, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
#endif

enum class State { kReady, kBarrier, kWarp, kDone };

struct Fiber {
  Context ctx;
  char* stack = nullptr; /* the usable part, above the guard page */
  State state = State::kDone;
  Site site = {"", 0};
  /* the pending warp intrinsic */
  WarpOp op = kSyncwarp;
  unsigned mask = 0;
  uint64_t value = 0, result = 0;
  int arg = 0, width = 32;
  uint3 tid = {0, 0, 0};
  void* fake_stack = nullptr;
};

struct Config {
  int schedule = kInOrder;
  uint64_t seed = 0;
  int64_t grid_cap = INT64_MAX;
};

struct Stats {
  int64_t launches = 0, blocks = 0, threads = 0, barriers = 0, warp_ops = 0;
};

std::mutex g_launch_mutex;
Config g_config;
Stats g_stats;
std::map<std::string, int64_t> g_kernel_launches; /* since the library was loaded */
std::string g_kernels_json;
cudaError_t g_last_error = cudaSuccess;
std::string g_failure; /* the message of the last failed launch */

/* The launch in progress. */
std::vector<Fiber> g_fibers;
int g_nthreads = 0;
Fiber* g_running = nullptr;
Context g_scheduler;
void (*g_body)(void*) = nullptr;
void* g_body_ctx = nullptr;
const char* g_kernel = "";
bool g_stacks_dirty = false; /* fibers were abandoned mid-kernel (AddressSanitizer shadow left poisoned) */
#if KBIT_EMU_ASAN
const void* g_scheduler_stack = nullptr;
size_t g_scheduler_stack_size = 0;
void* g_scheduler_fake_stack = nullptr;
#endif

/* A violation is recorded here; the scheduler then abandons the launch (the fibers left suspended
 * are reset when their stacks are next used). */
bool g_violation = false;

std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  return buf;
}

std::string where(const Fiber& f) {
  const uint3 b = g_coordinates.block_idx;
  return format("kernel %s, block (%u,%u,%u), thread (%u,%u,%u)", g_kernel, b.x, b.y, b.z, f.tid.x, f.tid.y, f.tid.z);
}

std::string site_text(Site s) { return format("%s:%d", s.file, s.line); }

const char* op_name(WarpOp op) {
  switch (op) {
    case kShflIdx: return "__shfl_sync";
    case kShflUp: return "__shfl_up_sync";
    case kShflDown: return "__shfl_down_sync";
    case kShflXor: return "__shfl_xor_sync";
    case kSyncwarp: return "__syncwarp";
    case kBallot: return "__ballot_sync";
    case kAny: return "__any_sync";
    default: return "__all_sync";
  }
}

void fail(const std::string& message) {
  if (!g_violation) {
    g_violation = true;
    g_failure = "kbit cuda emulation: " + message;
  }
}

/* ---- fibers ---- */

void switch_to_scheduler(Fiber& f, bool exiting) {
#if KBIT_EMU_ASAN
  __sanitizer_start_switch_fiber(exiting ? nullptr : &f.fake_stack, g_scheduler_stack, g_scheduler_stack_size);
#endif
  (void)exiting;
  swap_context(f.ctx, g_scheduler);
#if KBIT_EMU_ASAN
  __sanitizer_finish_switch_fiber(f.fake_stack, &g_scheduler_stack, &g_scheduler_stack_size);
#endif
}

void fiber_main() {
  Fiber& f = *g_running;
#if KBIT_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &g_scheduler_stack, &g_scheduler_stack_size);
#endif
  g_body(g_body_ctx);
  f.state = State::kDone;
  switch_to_scheduler(f, true);
  abort(); /* a finished fiber is never resumed */
}

void resume(Fiber& f) {
  g_running = &f;
  g_coordinates.thread_idx = f.tid;
#if KBIT_EMU_ASAN
  __sanitizer_start_switch_fiber(&g_scheduler_fake_stack, f.stack, kStackSize);
#endif
  swap_context(g_scheduler, f.ctx);
#if KBIT_EMU_ASAN
  __sanitizer_finish_switch_fiber(g_scheduler_fake_stack, nullptr, nullptr);
#endif
  g_running = nullptr;
}

void ensure_fibers(int n) {
  if ((int)g_fibers.size() >= n) return;
  long page = sysconf(_SC_PAGESIZE);
  size_t old = g_fibers.size();
  g_fibers.resize(n);
  for (size_t i = old; i < (size_t)n; ++i) {
    void* mem = mmap(nullptr, kStackSize + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) {
      perror("kbit cuda emulation: mmap of a fiber stack");
      abort();
    }
    mprotect(mem, page, PROT_NONE); /* a stack overflow faults instead of corrupting a neighbour */
    g_fibers[i].stack = static_cast<char*>(mem) + page;
  }
}

void start_fiber(Fiber& f) {
#if KBIT_EMU_ASAN
  if (g_stacks_dirty) __asan_unpoison_memory_region(f.stack, kStackSize);
#endif
  make_context(f.ctx, f.stack, kStackSize, fiber_main);
  f.state = State::kReady;
  f.fake_stack = nullptr;
}

/* ---- synchronization points (called on a fiber) ---- */

Fiber& current(const char* what) {
  if (g_running == nullptr) {
    fprintf(stderr, "kbit cuda emulation: %s called outside a kernel\n", what);
    abort();
  }
  return *g_running;
}

/* ---- the scheduler ---- */

/* The ready threads of the block, as a bit set: the schedule picks the lowest (in order), the
 * highest (reversed) or a uniformly random one. */
struct ReadySet {
  uint64_t words[kMaxThreadsPerBlock / 64] = {};
  int count = 0;

  void add(int t) {
    uint64_t bit = 1ull << (t & 63);
    if (!(words[t >> 6] & bit)) {
      words[t >> 6] |= bit;
      ++count;
    }
  }
  int take(int schedule, std::mt19937_64& rng) {
    const int nwords = kMaxThreadsPerBlock / 64;
    int w = 0, b = 0;
    if (schedule == kReversed) {
      for (w = nwords - 1; words[w] == 0; --w) {
      }
      b = 63 - __builtin_clzll(words[w]);
    } else if (schedule == kRandom) {
      int k = (int)(rng() % (uint64_t)count);
      for (w = 0; __builtin_popcountll(words[w]) <= k; ++w) k -= __builtin_popcountll(words[w]);
      uint64_t x = words[w];
      for (; k > 0; --k) x &= x - 1;
      b = __builtin_ctzll(x);
    } else {
      for (w = 0; words[w] == 0; ++w) {
      }
      b = __builtin_ctzll(words[w]);
    }
    words[w] &= ~(1ull << b);
    --count;
    return 64 * w + b;
  }
};

/* The lanes (bit k: thread 32 * warp + k) that exist in a warp of the block. */
unsigned existing_lanes(int warp) {
  const int lanes = std::min(32, g_nthreads - 32 * warp);
  return lanes >= 32 ? 0xffffffffu : ((1u << lanes) - 1u);
}

std::string call_text(const Fiber& f) {
  return format("%s(mask 0x%08x) at %s", op_name(f.op), f.mask, site_text(f.site).c_str());
}

/* Checks a warp intrinsic as its thread reaches it: its own lane in the mask, only existing lanes,
 * a valid width. */
void check_warp_call(int t) {
  const Fiber& f = g_fibers[t];
  const int lane = t & 31;
  if (!((f.mask >> lane) & 1u))
    fail(where(f) + ": " + call_text(f) + format(" does not name the calling lane %d", lane));
  else if (f.mask & ~existing_lanes(t >> 5))
    fail(where(f) + ": " + call_text(f) +
         format(" names lanes that do not exist (blockDim has %d threads)", g_nthreads));
  else if (f.width < 1 || f.width > 32 || (f.width & (f.width - 1)) != 0)
    fail(where(f) + ": " + call_text(f) + format(" with width %d (needs a power of two up to 32)", f.width));
}

/* The source lane of lane k's shuffle (k itself where CUDA returns the caller's own value). */
int shuffle_source(const Fiber& o, int k) {
  const int width = o.width, seg = k & ~(width - 1);
  switch (o.op) {
    case kShflIdx: return seg + (o.arg & (width - 1));
    case kShflUp: return (k - seg) >= o.arg ? k - o.arg : k;
    case kShflDown: return (k - seg) + o.arg < width ? k + o.arg : k;
    case kShflXor: {
      const int x = k ^ o.arg;
      return (x >= 0 && x < seg + width) ? x : k;
    }
    default: return k;
  }
}

/* Once thread t waits at a warp intrinsic: if every lane its mask names waits at the same
 * intrinsic with the same mask and width, exchange the values and make them all ready. */
void try_complete_warp_op(int t, ReadySet& ready) {
  const Fiber& f = g_fibers[t];
  const int first = t & ~31;
  const unsigned mask = f.mask;
  for (int k = 0; k < 32; ++k) {
    if (!((mask >> k) & 1u)) continue;
    const Fiber& o = g_fibers[first + k];
    if (o.state != State::kWarp || o.op != f.op || o.mask != mask || o.width != f.width) return;
  }
  unsigned ballot = 0;
  for (int k = 0; k < 32; ++k)
    if (((mask >> k) & 1u) && g_fibers[first + k].value != 0) ballot |= 1u << k;
  for (int k = 0; k < 32 && !g_violation; ++k) {
    if (!((mask >> k) & 1u)) continue;
    Fiber& o = g_fibers[first + k];
    switch (o.op) {
      case kBallot: o.result = ballot; break;
      case kAny: o.result = ballot != 0; break;
      case kAll: o.result = ballot == mask; break;
      case kSyncwarp: o.result = 0; break;
      default: {
        const int src = shuffle_source(o, k);
        if (!((mask >> src) & 1u)) {
          fail(where(o) + ": " + call_text(o) + format(" reads lane %d, which the mask does not name", src));
          return;
        }
        o.result = g_fibers[first + src].value;
      }
    }
  }
  for (int k = 0; k < 32; ++k)
    if ((mask >> k) & 1u) {
      g_fibers[first + k].state = State::kReady;
      ready.add(first + k);
    }
  ++g_stats.warp_ops;
}

/* Nothing is ready: every thread has exited or waits. A warp intrinsic still waiting can never
 * complete (a lane of its mask has exited, waits at __syncthreads or at another intrinsic); the
 * barrier completes if every thread of the block waits at the same __syncthreads(). Returns false
 * when the block is finished or failed. */
bool release_barrier(ReadySet& ready) {
  int done = -1, waiting = -1;
  for (int t = 0; t < g_nthreads && !g_violation; ++t) {
    const Fiber& f = g_fibers[t];
    if (f.state == State::kDone) {
      if (done < 0) done = t;
    } else if (f.state == State::kBarrier) {
      if (waiting < 0) waiting = t;
    } else if (f.state == State::kWarp) {
      const int first = t & ~31;
      for (int k = 0; k < 32; ++k) {
        if (!((f.mask >> k) & 1u)) continue;
        const Fiber& o = g_fibers[first + k];
        std::string why;
        if (o.state == State::kDone) why = "has exited";
        else if (o.state == State::kBarrier) why = "waits at __syncthreads() at " + site_text(o.site);
        else if (o.op != f.op || o.mask != f.mask || o.width != f.width) why = "waits at " + call_text(o);
        if (!why.empty()) {
          fail(where(f) + ": " + call_text(f) + format(", but lane %d it names ", k) + why);
          break;
        }
      }
      if (!g_violation) fail(where(f) + ": " + call_text(f) + " never completes");
    }
  }
  if (g_violation || waiting < 0) return false;
  const Fiber& w = g_fibers[waiting];
  if (done >= 0) {
    const Fiber& d = g_fibers[done];
    fail(where(w) + ": __syncthreads() at " + site_text(w.site) + " is not reached by every thread of the block: " +
         format("thread (%u,%u,%u) has exited", d.tid.x, d.tid.y, d.tid.z));
    return false;
  }
  for (int t = 0; t < g_nthreads; ++t) {
    const Fiber& f = g_fibers[t];
    if (f.site.line != w.site.line || strcmp(f.site.file, w.site.file) != 0) {
      fail(where(w) + ": __syncthreads() at " + site_text(w.site) +
           format(", but thread (%u,%u,%u) waits at __syncthreads() at ", f.tid.x, f.tid.y, f.tid.z) +
           site_text(f.site) + " (a barrier in divergent code)");
      return false;
    }
  }
  for (int t = 0; t < g_nthreads; ++t) {
    g_fibers[t].state = State::kReady;
    ready.add(t);
  }
  ++g_stats.barriers;
  return true;
}

/* One block: the schedule picks a ready thread, which runs to its next synchronization point. */
void run_block(std::mt19937_64& rng) {
  ReadySet ready;
  for (int t = 0; t < g_nthreads; ++t) {
    start_fiber(g_fibers[t]);
    ready.add(t);
  }
  for (;;) {
    while (ready.count > 0) {
      const int t = ready.take(g_config.schedule, rng);
      resume(g_fibers[t]);
      if (!g_violation && g_fibers[t].state == State::kWarp) {
        check_warp_call(t);
        if (!g_violation) try_complete_warp_op(t, ready);
      }
      if (g_violation) return;
    }
    if (!release_barrier(ready)) return;
  }
}

}  // namespace

/* ---- called from kernels ---- */

void syncthreads(Site site) {
  Fiber& f = current("__syncthreads");
  f.state = State::kBarrier;
  f.site = site;
  switch_to_scheduler(f, false);
}

uint64_t warp_op(WarpOp op, unsigned mask, uint64_t value, int arg, int width, Site site) {
  Fiber& f = current(op_name(op));
  f.state = State::kWarp;
  f.op = op;
  f.mask = mask;
  f.value = value;
  f.arg = arg;
  f.width = width;
  f.site = site;
  switch_to_scheduler(f, false);
  return f.result;
}

const char* kernel_name(const char* pretty_function) {
  /* GCC: "... launch(...) [with auto Kernel = kbit::{anonymous}::gemv4_kernel<0, true>; Args = {...}]" */
  static thread_local std::string name;
  const char* p = strstr(pretty_function, "Kernel = ");
  if (p == nullptr) return pretty_function;
  p += strlen("Kernel = ");
  const char* end = p;
  int depth = 0;
  while (*end && !(depth == 0 && (*end == ';' || *end == ']'))) {
    depth += (*end == '<') - (*end == '>');
    ++end;
  }
  name.assign(p, end);
  return name.c_str();
}

int64_t grid_cap(void) { return g_config.grid_cap; }

void run_grid(const char* kernel, dim3 grid, dim3 block, void (*body)(void*), void* ctx) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  const int64_t nthreads = (int64_t)block.x * block.y * block.z;
  if (nthreads < 1 || nthreads > kMaxThreadsPerBlock || block.z > 64 || grid.x < 1 || grid.x > 0x7fffffffu ||
      grid.y < 1 || grid.y > 65535 || grid.z < 1 || grid.z > 65535) {
    g_last_error = cudaErrorInvalidConfiguration;
    return;
  }
  ++g_stats.launches;
  ++g_kernel_launches[kernel];
  ensure_fibers((int)nthreads);
  g_nthreads = (int)nthreads;
  g_body = body;
  g_body_ctx = ctx;
  g_kernel = kernel;
  g_violation = false;
  g_coordinates.block_dim = block;
  g_coordinates.grid_dim = grid;
  for (int t = 0; t < g_nthreads; ++t)
    g_fibers[t].tid = uint3{(unsigned)(t % block.x), (unsigned)(t / block.x % block.y),
                            (unsigned)(t / block.x / block.y)};
  /* The blocks' order: forwards, backwards or shuffled, as the threads'. */
  const int64_t nblocks = (int64_t)grid.x * grid.y * grid.z;
  std::mt19937_64 rng(g_config.seed * 0x9e3779b97f4a7c15ull + (uint64_t)g_stats.launches);
  std::vector<int64_t> blocks;
  const bool permute = g_config.schedule != kInOrder && nblocks <= (1 << 20);
  if (permute) {
    blocks.resize(nblocks);
    for (int64_t b = 0; b < nblocks; ++b) blocks[b] = b;
    if (g_config.schedule == kReversed) std::reverse(blocks.begin(), blocks.end());
    else std::shuffle(blocks.begin(), blocks.end(), rng);
  }
  for (int64_t i = 0; i < nblocks && !g_violation; ++i) {
    const int64_t b = permute ? blocks[i] : i;
    g_coordinates.block_idx = uint3{(unsigned)(b % grid.x), (unsigned)(b / grid.x % grid.y),
                                    (unsigned)(b / grid.x / grid.y)};
    run_block(rng);
    ++g_stats.blocks;
    g_stats.threads += g_nthreads;
  }
  if (g_violation) {
    g_stacks_dirty = true;
    g_last_error = cudaErrorLaunchFailure;
    fprintf(stderr, "%s\n", g_failure.c_str());
  }
}

}  // namespace kbit_emu

using namespace kbit_emu;

cudaError_t cudaGetLastError(void) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  cudaError_t e = g_last_error;
  g_last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError(void) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  return g_last_error;
}

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return g_failure.empty() ? "unspecified launch failure" : g_failure.c_str();
    default: return "unknown error";
  }
}

extern "C" {

/* The schedule of the following launches (0 in order, 1 reversed, 2 random with `seed`) and the grid
 * cap cuda_util::grid_for applies (<= 0: no lower cap than the library's own). Clears the last error
 * message and the statistics. */
KBIT_API void kbit_emu_configure(int schedule, uint64_t seed, int64_t grid_cap) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  g_config.schedule = schedule == kReversed || schedule == kRandom ? schedule : kInOrder;
  g_config.seed = seed;
  g_config.grid_cap = grid_cap > 0 ? grid_cap : INT64_MAX;
  g_failure.clear();
  g_stats = Stats();
}

/* The message of the last failed launch since kbit_emu_configure ("" if none). */
KBIT_API const char* kbit_emu_last_failure(void) { return g_failure.c_str(); }

/* Counters since kbit_emu_configure: launches, blocks, threads run, barriers and warp intrinsics
 * completed (out: 5 values). */
KBIT_API void kbit_emu_stats(int64_t* out) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  out[0] = g_stats.launches;
  out[1] = g_stats.blocks;
  out[2] = g_stats.threads;
  out[3] = g_stats.barriers;
  out[4] = g_stats.warp_ops;
}

/* Every kernel launched since the library was loaded, with its number of launches, as a JSON object
 * ({"kbit::{anonymous}::gemv4_kernel<0, true>": 3, ...}). */
KBIT_API const char* kbit_emu_kernels(void) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  g_kernels_json = "{";
  for (const auto& kv : g_kernel_launches) {
    if (g_kernels_json.size() > 1) g_kernels_json += ",";
    g_kernels_json += "\"" + kv.first + "\":" + std::to_string(kv.second);
  }
  g_kernels_json += "}";
  return g_kernels_json.c_str();
}

}  // extern "C"
