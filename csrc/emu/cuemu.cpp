// cuemu runtime: fibers, the block scheduler, barriers, shuffles, shared memory, launch
// checks, guarded global buffers and the fault handler. See cuemu.h and
// docs/cuda_emulator.md.
#include "cuemu.h"

#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "cuemu_internal.h"

// ---- context switch ---------------------------------------------------------------------
// cuemu_switch_ctx(save, load): pushes the callee-saved registers (and MXCSR / x87 control
// word) on the current stack, stores the stack pointer in *save, and resumes the context
// whose stack pointer is `load`. A new fiber's stack is laid out so that the switch
// "returns" into cuemu_fiber_entry.
#if defined(__x86_64__)
asm(R"(
  .text
  .p2align 4
  .globl cuemu_switch_ctx
  .hidden cuemu_switch_ctx
  .type cuemu_switch_ctx, @function
cuemu_switch_ctx:
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
  .size cuemu_switch_ctx, .-cuemu_switch_ctx

  .p2align 4
  .globl cuemu_fiber_entry
  .hidden cuemu_fiber_entry
  .type cuemu_fiber_entry, @function
cuemu_fiber_entry:
  call cuemu_fiber_main
  ud2
  .size cuemu_fiber_entry, .-cuemu_fiber_entry
)");
extern "C" void cuemu_switch_ctx(void** save, void* load);
extern "C" void cuemu_fiber_entry();
#define CUEMU_ASM_SWITCH 1
#endif
extern "C" __attribute__((visibility("hidden"), used)) void cuemu_fiber_main();
extern "C" __attribute__((visibility("hidden"), used)) void cuemu_fault_recover();

namespace cuemu {

Thread* g_thread = nullptr;
uint3 g_block_idx{0, 0, 0};
dim3 g_block_dim, g_grid_dim;

namespace {

constexpr int kMaxThreads = 1024;
constexpr size_t kStackBytes = 128 * 1024;
constexpr size_t kStaticArenaBytes = 256 * 1024;
constexpr size_t kDefaultSmem = 48 * 1024;        // without the opt-in
constexpr size_t kMaxSmemPerBlock = 166912;       // A100 opt-in maximum (the strictest target)
constexpr uint64_t kMaxGridX = 2147483647ull, kMaxGridYZ = 65535;

size_t page_size() {
  static const size_t p = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return p;
}
size_t round_up(size_t n, size_t a) { return (n + a - 1) / a * a; }

std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
std::string fmt(const char* f, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, f);
  vsnprintf(buf, sizeof buf, f, ap);
  va_end(ap);
  return buf;
}

const char* base_name(const char* path) {
  const char* s = std::strrchr(path, '/');
  return s ? s + 1 : path;
}

// ---- fibers --------------------------------------------------------------------------------
enum class St : uint8_t { Runnable, Barrier, Shuffle, Warpsync, Collective, Exited };

// One cp.async of 16 bytes: the source is read at issue (so a bad source address faults at
// the issuing line) and written to shared memory when a cp_async_wait retires its group.
struct AsyncCopy {
  char* dst;
  long chunk;          // the destination's 16-byte chunk (smem_chunk)
  uint32_t group;      // 0: not committed yet; else the thread's commit-group number
  const char* file;
  int line;
  unsigned char data[16];
};

struct Fiber {
  Thread t{};
  void* sp = nullptr;
  char* map = nullptr;  // its stack mapping; the lowest page is a guard
#if !defined(CUEMU_ASM_SWITCH)
  ucontext_t uc{};
#endif
  St st = St::Exited;
  const char* file = "";
  int line = 0;
  // shuffle / syncwarp operands
  ShflKind kind = kShflIdx;
  unsigned mask = 0;
  int arg = 0, width = 32;
  uint64_t val = 0, result = 0;
  // warp-collective operands
  const char* coll_name = "";
  WarpOp coll_op = nullptr;
  void* frag = nullptr;
  // cp.async: copies in flight, groups committed, chunks landed but not yet made visible
  std::vector<AsyncCopy> async;
  uint32_t async_groups = 0;
  std::vector<long> landed;
};

struct Rng {
  uint64_t s = 0;
  uint64_t next() {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  uint32_t below(uint32_t n) { return static_cast<uint32_t>(next() % n); }
  double uniform() { return (next() >> 11) * (1.0 / 9007199254740992.0); }
};

// How the scheduler picks the next fiber (drawn per block from the seed).
struct Policy {
  double p_switch = 0;      // chance to leave the current warp at each pick (0: run it until it blocks)
  bool random_warps = false, random_lanes = false, reverse = false;
};

struct KernelInfo {
  long max_dynamic = -1;  // cudaFuncAttributeMaxDynamicSharedMemorySize; -1: default
  size_t static_bytes = 0;
  bool static_known = false;
};

struct BlockState {
  int nthreads = 0, nwarps = 0;
  uint32_t present[32]{}, runnable[32]{}, at_shfl[32]{}, at_wsync[32]{}, at_coll[32]{}, exited[32]{};
  uint32_t warps_runnable = 0;
  int live = 0, at_barrier = 0, n_exited = 0, focus = -1;
  int first_exited = -1;
  bool failed = false;
  Policy pol;
};

struct LaunchState {
  const void* kernel = nullptr;
  Thunk thunk = nullptr;
  const void* args = nullptr;
  const char* file = "";
  int line = 0;
  dim3 grid, block;
  size_t smem = 0;
};

// Everything below is used by one launch at a time (g_launch_mutex).
std::recursive_mutex g_launch_mutex;
std::unique_ptr<Fiber[]> g_fibers;
void* g_sched_sp = nullptr;
#if !defined(CUEMU_ASM_SWITCH)
ucontext_t g_sched_uc;
#endif
Fiber* g_cur = nullptr;
BlockState g_blk;
LaunchState g_launch;
Rng g_rng;
Config g_config;
std::unordered_map<const void*, KernelInfo> g_kernels;
Stats g_stats;
std::unordered_map<std::string, Stats> g_site_stats;  // by the launch site's file name
std::string g_fail_message;
cudaError_t g_fail_code = cudaErrorLaunchFailure;
char g_fault_text[768];  // the fault handler's report, for cuemu_fault_recover

// shared memory
char* g_static_arena = nullptr;
size_t g_static_used = 0;
uint64_t g_block_stamp = 0;
size_t g_block_static_bytes = 0;
char* g_dyn_map = nullptr;
size_t g_dyn_map_len = 0;
char* g_dyn_ptr = nullptr;  // dynamic shared memory of the running launch, ends at a guard page
uint32_t g_fill = 0x7fc00000u;

// cp.async bookkeeping: one entry per 16-byte chunk of shared memory (the static arena's
// chunks, then the running launch's dynamic ones), 0 when no cp.async is in flight to it or
// landed there unseen, else kChunk* | (the issuing thread's linear index + 1).
constexpr uint32_t kChunkPending = 1u << 16;  // in flight: no cp_async_wait has retired it
constexpr uint32_t kChunkLanded = 2u << 16;   // retired; visible to the issuing thread only
constexpr uint32_t kChunkWarp = 3u << 16;     // and to its warp (a __syncwarp since)
constexpr size_t kStaticChunks = kStaticArenaBytes / 16;
std::vector<uint32_t> g_chunks;
bool g_chunks_dirty = false;

thread_local cudaError_t t_last_error = cudaSuccess;
thread_local std::string t_message;

// ---- guard regions (read by the SIGSEGV handler) ---------------------------------------------
struct Region {
  const char* name;
  char* map;
  size_t map_len;
  char* data;
  size_t bytes;
  bool used;
};
constexpr int kMaxRegions = 256;
Region g_regions[kMaxRegions];
std::mutex g_region_mutex;

void fill_pattern(void* p, size_t bytes) {
  char* c = static_cast<char*>(p);
  size_t i = 0;
  for (; i + 4 <= bytes; i += 4) std::memcpy(c + i, &g_fill, 4);
  for (; i < bytes; ++i) c[i] = static_cast<char>(0xff);
}

char* map_guarded(size_t data_bytes, size_t* map_len) {
  const size_t pg = page_size();
  const size_t body = round_up(std::max<size_t>(data_bytes, 1), pg);
  *map_len = body + 2 * pg;
  void* m = mmap(nullptr, *map_len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) return nullptr;
  char* c = static_cast<char*>(m);
  if (mprotect(c + pg, body, PROT_READ | PROT_WRITE) != 0) {
    munmap(m, *map_len);
    return nullptr;
  }
  return c;
}

// ---- failure reporting ---------------------------------------------------------------------
std::string thread_name(const Fiber& f) {
  return fmt("thread (%u,%u,%u) [warp %d lane %d]", f.t.idx.x, f.t.idx.y, f.t.idx.z, f.t.warp, f.t.lane);
}

std::string where() {
  return fmt("kernel launched at %s:%d, block (%u,%u,%u)", base_name(g_launch.file), g_launch.line,
             g_block_idx.x, g_block_idx.y, g_block_idx.z);
}

const char* state_name(St s) {
  switch (s) {
    case St::Runnable: return "runnable";
    case St::Barrier: return "at __syncthreads";
    case St::Shuffle: return "in a warp shuffle";
    case St::Warpsync: return "at __syncwarp";
    case St::Collective: return "in a warp-collective instruction";
    case St::Exited: return "exited";
  }
  return "?";
}

// "threads 0-63 at __syncthreads (f:l); threads 64-95 ..." (runs of equal state and site).
std::string describe_threads() {
  std::string out;
  int start = 0;
  for (int i = 1; i <= g_blk.nthreads; ++i) {
    const Fiber& a = g_fibers[start];
    const bool same = i < g_blk.nthreads && g_fibers[i].st == a.st &&
                      (a.st != St::Collective || g_fibers[i].coll_name == a.coll_name) &&
                      (a.st == St::Exited || a.st == St::Runnable ||
                       (g_fibers[i].line == a.line && std::strcmp(g_fibers[i].file, a.file) == 0));
    if (same) continue;
    if (!out.empty()) out += "; ";
    out += start == i - 1 ? fmt("thread %d ", start) : fmt("threads %d-%d ", start, i - 1);
    out += a.st == St::Collective ? std::string("in ") + a.coll_name : std::string(state_name(a.st));
    if (a.st != St::Exited && a.st != St::Runnable) out += fmt(" (%s:%d)", base_name(a.file), a.line);
    start = i;
  }
  return out;
}

void record_failure(const std::string& what, cudaError_t code = cudaErrorLaunchFailure) {
  if (g_blk.failed) return;
  g_blk.failed = true;
  g_fail_code = code;
  g_fail_message = what + " (" + where() + ")";
}

inline void yield_to_scheduler(Fiber* f) {
  ++g_stats.context_switches;
#if defined(CUEMU_ASM_SWITCH)
  cuemu_switch_ctx(&f->sp, g_sched_sp);
#else
  swapcontext(&f->uc, &g_sched_uc);
#endif
}

// From a fiber: record the failure and never run again (the launch is abandoned; the
// fiber's stack is simply reused by the next block).
[[noreturn]] void fail_in_fiber(const std::string& what) {
  record_failure(what);
  yield_to_scheduler(g_cur);
  std::abort();  // unreachable: a failed block's fibers are never resumed
}

// ---- scheduler -------------------------------------------------------------------------------
inline void set_runnable(Fiber* f) {
  f->st = St::Runnable;
  g_blk.runnable[f->t.warp] |= 1u << f->t.lane;
  g_blk.warps_runnable |= 1u << f->t.warp;
}

inline void block_fiber(Fiber* f, St st) {
  f->st = st;
  g_blk.runnable[f->t.warp] &= ~(1u << f->t.lane);
  if (!g_blk.runnable[f->t.warp]) g_blk.warps_runnable &= ~(1u << f->t.warp);
}

int random_bit(uint32_t m) {
  int k = static_cast<int>(g_rng.below(static_cast<uint32_t>(__builtin_popcount(m))));
  while (k-- > 0) m &= m - 1;
  return __builtin_ctz(m);
}

int pick_bit(uint32_t m, bool random, bool reverse) {
  if (random) return random_bit(m);
  return reverse ? 31 - __builtin_clz(m) : __builtin_ctz(m);
}

Fiber* pick() {
  const uint32_t wr = g_blk.warps_runnable;
  int w = g_blk.focus;
  const Policy& pol = g_blk.pol;
  if (w < 0 || !((wr >> w) & 1u) || (pol.p_switch > 0 && g_rng.uniform() < pol.p_switch))
    w = pick_bit(wr, pol.random_warps, pol.reverse);
  g_blk.focus = w;
  const int lane = pick_bit(g_blk.runnable[w], pol.random_lanes, pol.reverse);
  return &g_fibers[w * 32 + lane];
}

Policy draw_policy() {
  Policy pol;
  if (g_config.seed == 0) return pol;  // lowest warp first, each until it blocks
  if (g_config.seed == 1) {            // highest warp first, lanes high to low
    pol.reverse = true;
    return pol;
  }
  static const double kSwitch[] = {0.0, 0.01, 0.2, 1.0};
  pol.p_switch = kSwitch[g_rng.below(4)];
  pol.random_warps = true;
  pol.random_lanes = g_rng.below(2) == 0;
  return pol;
}

void init_frame(Fiber* f) {
#if defined(CUEMU_ASM_SWITCH)
  const uintptr_t top = reinterpret_cast<uintptr_t>(f->map + kStackBytes) & ~uintptr_t(15);
  uint64_t* sp = reinterpret_cast<uint64_t*>(top - 80);
  uint32_t mxcsr;
  uint16_t fcw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fcw));
  sp[0] = mxcsr | (static_cast<uint64_t>(fcw) << 32);
  for (int i = 1; i <= 6; ++i) sp[i] = 0;  // r15 r14 r13 r12 rbx rbp
  sp[7] = reinterpret_cast<uint64_t>(&cuemu_fiber_entry);
  sp[8] = sp[9] = 0;
  f->sp = sp;
#else
  getcontext(&f->uc);
  f->uc.uc_stack.ss_sp = f->map + page_size();
  f->uc.uc_stack.ss_size = kStackBytes - page_size();
  f->uc.uc_link = nullptr;
  makecontext(&f->uc, reinterpret_cast<void (*)()>(&cuemu_fiber_main), 0);
#endif
}

bool ensure_fibers() {
  if (g_fibers) return true;
  g_fibers.reset(new Fiber[kMaxThreads]);
  for (int i = 0; i < kMaxThreads; ++i) {
    void* m = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (m == MAP_FAILED) return false;
    mprotect(m, page_size(), PROT_NONE);  // stack overflow faults (and is reported)
    g_fibers[i].map = static_cast<char*>(m);
  }
  void* a = mmap(nullptr, kStaticArenaBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (a == MAP_FAILED) return false;
  g_static_arena = static_cast<char*>(a);
  return true;
}

// Dynamic shared memory: `bytes` ending (16-byte aligned) right before a guard page.
bool map_dynamic(size_t bytes) {
  const size_t pg = page_size();
  const size_t need = round_up(std::max<size_t>(bytes, 1), pg) + 2 * pg;
  if (need > g_dyn_map_len) {
    if (g_dyn_map) munmap(g_dyn_map, g_dyn_map_len);
    g_dyn_map = map_guarded(bytes, &g_dyn_map_len);
    if (!g_dyn_map) {
      g_dyn_map_len = 0;
      return false;
    }
  }
  // the body is [pg, g_dyn_map_len - pg); the data ends at its end
  char* end = g_dyn_map + g_dyn_map_len - pg;
  g_dyn_ptr = reinterpret_cast<char*>(reinterpret_cast<uintptr_t>(end - bytes) & ~uintptr_t(15));
  return true;
}

void run_block(KernelInfo& ki) {
  const dim3 bd = g_launch.block;
  const int n = static_cast<int>(bd.x * bd.y * bd.z);
  g_blk = BlockState{};
  g_blk.nthreads = n;
  g_blk.nwarps = (n + 31) / 32;
  g_blk.live = n;
  g_blk.pol = draw_policy();
  for (int i = 0; i < n; ++i) {
    Fiber& f = g_fibers[i];
    f.t.idx = uint3{static_cast<unsigned>(i) % bd.x, (static_cast<unsigned>(i) / bd.x) % bd.y,
                    static_cast<unsigned>(i) / (bd.x * bd.y)};
    f.t.linear = i;
    f.t.warp = i / 32;
    f.t.lane = i % 32;
    f.file = "";
    f.line = 0;
    init_frame(&f);
    g_blk.present[f.t.warp] |= 1u << f.t.lane;
    set_runnable(&f);
  }
  for (int i = 0; i < n; ++i) {  // no cp.async carried over from a block that failed
    g_fibers[i].async.clear();
    g_fibers[i].landed.clear();
    g_fibers[i].async_groups = 0;
  }
  if (g_chunks_dirty) {
    std::fill(g_chunks.begin(), g_chunks.end(), 0u);
    g_chunks_dirty = false;
  }
  // shared memory: every byte NaN before the block starts
  ++g_block_stamp;
  g_block_static_bytes = 0;
  fill_pattern(g_static_arena, g_static_used);
  fill_pattern(g_dyn_ptr, static_cast<size_t>(g_dyn_map + g_dyn_map_len - page_size() - g_dyn_ptr));

  while (!g_blk.failed) {
    if (!g_blk.warps_runnable) {
      if (g_blk.live == 0) break;
      record_failure("deadlock: no CUDA thread can proceed: " + describe_threads());
      break;
    }
    Fiber* f = pick();
    g_cur = f;
    g_thread = &f->t;
    ++g_stats.context_switches;
#if defined(CUEMU_ASM_SWITCH)
    cuemu_switch_ctx(&g_sched_sp, f->sp);
#else
    swapcontext(&g_sched_uc, &f->uc);
#endif
  }
  g_cur = nullptr;
  g_thread = nullptr;
  ++g_stats.blocks;
  ki.static_bytes = std::max(ki.static_bytes, g_block_static_bytes);
  ki.static_known = true;
}

std::string check_shared(const KernelInfo& ki, size_t smem) {
  if (ki.static_bytes > kDefaultSmem)
    return fmt("static shared memory of %zu B exceeds 48 KB", ki.static_bytes);
  const long max_dyn = ki.max_dynamic >= 0 ? ki.max_dynamic : static_cast<long>(kDefaultSmem - ki.static_bytes);
  if (static_cast<long>(smem) > max_dyn) {
    if (ki.max_dynamic >= 0)
      return fmt("dynamic shared memory of %zu B exceeds the %ld B the kernel opted into with "
                 "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)", smem, max_dyn);
    return fmt("dynamic shared memory of %zu B exceeds the default limit of %ld B (48 KB less %zu B of "
               "static shared memory) and the kernel did not opt in with cudaFuncSetAttribute("
               "cudaFuncAttributeMaxDynamicSharedMemorySize)", smem, max_dyn, ki.static_bytes);
  }
  if (ki.static_bytes + smem > kMaxSmemPerBlock)
    return fmt("%zu B static + %zu B dynamic shared memory exceed the A100's %zu B per block",
               ki.static_bytes, smem, kMaxSmemPerBlock);
  return "";
}

// __launch_bounds__(n) leaves n one-byte NOPs at the kernel's entry (see cuemu.h).
int launch_bound(const void* kernel) {
  const unsigned char* p = static_cast<const unsigned char*>(kernel);
  if (p[0] == 0xf3 && p[1] == 0x0f && p[2] == 0x1e && p[3] == 0xfa) p += 4;  // endbr64
  int n = 0;
  while (n <= kMaxThreads && p[n] == 0x90) ++n;
  return n;
}

cudaError_t set_error(cudaError_t err, const std::string& msg) {
  t_last_error = err;
  t_message = msg;
  return err;
}

// ---- fault handler --------------------------------------------------------------------------
struct sigaction g_old_segv, g_old_bus;
int g_handler_depth = 0;

void write_str(const char* s) {
  size_t n = std::strlen(s);
  while (n > 0) {
    const ssize_t w = write(2, s, n);
    if (w <= 0) return;
    s += w;
    n -= static_cast<size_t>(w);
  }
}

void on_fault(int sig, siginfo_t* si, void* uctx) {
  const char* addr = static_cast<const char*>(si->si_addr);
  const char* access = "access";
#if defined(__x86_64__)
  const auto* uc = static_cast<const ucontext_t*>(uctx);
  access = (uc->uc_mcontext.gregs[REG_ERR] & 2) ? "write" : "read";
#else
  (void)uctx;
#endif
  char what[512] = "";
  for (int i = 0; i < kMaxRegions && !what[0]; ++i) {
    const Region& r = g_regions[i];
    if (!r.used || addr < r.map || addr >= r.map + r.map_len) continue;
    if (addr >= r.data + r.bytes)
      snprintf(what, sizeof what, "out-of-bounds %s of global buffer '%s': byte %zu past its end (it holds %zu B)",
               access, r.name, static_cast<size_t>(addr - (r.data + r.bytes)), r.bytes);
    else if (addr < r.data)
      snprintf(what, sizeof what, "out-of-bounds %s of global buffer '%s': %zu B before its start (it holds %zu B)",
               access, r.name, static_cast<size_t>(r.data - addr), r.bytes);
    else
      snprintf(what, sizeof what, "%s of global buffer '%s' at byte %zu faulted", access, r.name,
               static_cast<size_t>(addr - r.data));
  }
  if (!what[0] && g_dyn_map && addr >= g_dyn_map && addr < g_dyn_map + g_dyn_map_len) {
    const char* end = g_dyn_ptr + g_launch.smem;
    if (addr >= end)
      snprintf(what, sizeof what, "out-of-bounds %s of dynamic shared memory: byte %zu past the %zu B the launch gave",
               access, static_cast<size_t>(addr - end), g_launch.smem);
    else
      snprintf(what, sizeof what, "out-of-bounds %s before the start of dynamic shared memory", access);
  }
  if (!what[0] && g_fibers) {
    for (int i = 0; i < kMaxThreads && !what[0]; ++i)
      if (addr >= g_fibers[i].map && addr < g_fibers[i].map + page_size())
        snprintf(what, sizeof what, "stack overflow of a CUDA thread's fiber (%zu KB)", kStackBytes / 1024);
  }
  if (!what[0] && g_cur)  // a CUDA thread faulted outside every buffer it was given
    snprintf(what, sizeof what, "invalid global memory %s at address %p, outside every buffer of the launch",
             access, static_cast<const void*>(addr));
  if (!what[0]) {  // not ours: let the previous handler (e.g. Python's faulthandler) see it
    sigaction(sig, sig == SIGSEGV ? &g_old_segv : &g_old_bus, nullptr);
    return;
  }
#if defined(CUEMU_ASM_SWITCH)
  if (g_cur) {
    // A CUDA thread faulted: as on the GPU, the launch fails (cudaErrorIllegalAddress) and
    // the process goes on. The handler returns into cuemu_fault_recover on the top of the
    // thread's (abandoned) stack, which records the report and leaves the block.
    snprintf(g_fault_text, sizeof g_fault_text, "%s, in thread (%u,%u,%u)", what, g_cur->t.idx.x,
             g_cur->t.idx.y, g_cur->t.idx.z);
    auto* ctx = static_cast<ucontext_t*>(uctx);
    const uintptr_t top = reinterpret_cast<uintptr_t>(g_cur->map + kStackBytes) & ~uintptr_t(15);
    *reinterpret_cast<uint64_t*>(top - 8) = 0;  // a return address that is never used
    ctx->uc_mcontext.gregs[REG_RSP] = static_cast<greg_t>(top - 8);
    ctx->uc_mcontext.gregs[REG_RIP] = reinterpret_cast<greg_t>(&cuemu_fault_recover);
    return;
  }
#endif
  char msg[1024];
  if (g_cur) {
    snprintf(msg, sizeof msg,
             "\ncuemu: %s, in the kernel launched at %s:%d, block (%u,%u,%u), thread (%u,%u,%u)\n", what,
             base_name(g_launch.file), g_launch.line, g_block_idx.x, g_block_idx.y, g_block_idx.z,
             g_cur->t.idx.x, g_cur->t.idx.y, g_cur->t.idx.z);
  } else {
    snprintf(msg, sizeof msg, "\ncuemu: %s (outside any CUDA thread)\n", what);
  }
  write_str(msg);
  signal(SIGABRT, SIG_DFL);
  abort();
}

void install_fault_handler() {
  if (g_handler_depth++ > 0) return;
  static thread_local std::unique_ptr<char[]> alt;
  if (!alt) {
    const size_t n = 256 * 1024;
    alt.reset(new char[n]);
    stack_t ss{};
    ss.ss_sp = alt.get();
    ss.ss_size = n;
    sigaltstack(&ss, nullptr);
  }
  struct sigaction sa{};
  sa.sa_sigaction = &on_fault;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGSEGV, &sa, &g_old_segv);
  sigaction(SIGBUS, &sa, &g_old_bus);
}

void remove_fault_handler() {
  if (--g_handler_depth > 0) return;
  sigaction(SIGSEGV, &g_old_segv, nullptr);
  sigaction(SIGBUS, &g_old_bus, nullptr);
}

struct FaultHandlerScope {
  FaultHandlerScope() { install_fault_handler(); }
  ~FaultHandlerScope() { remove_fault_handler(); }
};

// ---- cp.async bookkeeping --------------------------------------------------------------------
// The 16-byte chunk of shared memory holding [p, p + n) (an index into g_chunks), or -1 when
// that range is not all inside the block's shared memory.
long smem_chunk(const void* p, size_t n) {
  const char* c = static_cast<const char*>(p);
  if (g_static_arena && c >= g_static_arena && c + n <= g_static_arena + g_static_used)
    return (c - g_static_arena) / 16;
  if (g_dyn_ptr && c >= g_dyn_ptr && c + n <= g_dyn_ptr + g_launch.smem)
    return static_cast<long>(kStaticChunks) + (c - g_dyn_ptr) / 16;
  return -1;
}

inline uint32_t chunk_state(uint32_t e) { return e & 0xffff0000u; }
inline int chunk_owner(uint32_t e) { return static_cast<int>(e & 0xffffu) - 1; }

// At the end of a barrier over threads [begin, end): the chunks their cp.async copies landed
// in become visible to the warp (state kChunkWarp, at __syncwarp) or to everyone (0).
void publish_landed(int begin, int end, uint32_t state) {
  if (g_blk.nwarps == 1) state = 0;  // the warp is the whole block
  for (int i = begin; i < end; ++i) {
    Fiber& f = g_fibers[i];
    for (const long chunk : f.landed) {
      uint32_t& e = g_chunks[chunk];
      if (chunk_owner(e) == i && (chunk_state(e) == kChunkLanded || chunk_state(e) == kChunkWarp))
        e = state ? (state | static_cast<uint32_t>(i + 1)) : 0u;
    }
    if (!state) f.landed.clear();
  }
}

const AsyncCopy* find_pending(int thread, long chunk) {
  for (const AsyncCopy& c : g_fibers[thread].async)
    if (c.chunk == chunk) return &c;
  return nullptr;
}

// The warp-collective instruction running now (for warp_op_fail's reports).
const char* g_coll_name = "";
const char* g_coll_file = "";
int g_coll_line = 0, g_coll_warp = 0;

}  // namespace

// ---- fiber entry and exit ----------------------------------------------------------------
}  // namespace cuemu

extern "C" void cuemu_fiber_main() {
  using namespace cuemu;
  g_launch.thunk(g_launch.kernel, g_launch.args);
  Fiber* f = g_cur;
  const int w = f->t.warp;
  block_fiber(f, St::Exited);
  --g_blk.live;
  ++g_blk.n_exited;
  g_blk.exited[w] |= 1u << f->t.lane;
  if (g_blk.first_exited < 0) g_blk.first_exited = f->t.linear;
  if (g_blk.at_barrier > 0) {
    const Fiber* waiting = nullptr;
    for (int i = 0; i < g_blk.nthreads && !waiting; ++i)
      if (g_fibers[i].st == St::Barrier) waiting = &g_fibers[i];
    record_failure(fmt("%s exited while %d threads wait at __syncthreads (%s:%d): a barrier every "
                       "thread of the block must reach", thread_name(*f).c_str(), g_blk.at_barrier,
                       base_name(waiting->file), waiting->line));
  }
  else if (g_blk.at_shfl[w] || g_blk.at_wsync[w])
    record_failure(fmt("%s exited while lanes of its warp wait in a warp shuffle or __syncwarp: the "
                       "mask names every lane, so all must take part", thread_name(*f).c_str()));
  else if (g_blk.at_coll[w]) {
    const Fiber& o = g_fibers[w * 32 + __builtin_ctz(g_blk.at_coll[w])];
    record_failure(fmt("%s exited while lanes of its warp wait in %s (%s:%d): a warp-collective "
                       "instruction every lane of the warp must execute", thread_name(*f).c_str(),
                       o.coll_name, base_name(o.file), o.line));
  } else if (!f->async.empty()) {
    const AsyncCopy& c = f->async.front();
    record_failure(fmt("%s exited with %zu cp.async copies in flight, the first issued at %s:%d and %s: "
                       "every copy must be retired by a cp_async_wait before the thread exits",
                       thread_name(*f).c_str(), f->async.size(), base_name(c.file), c.line,
                       c.group ? fmt("committed (group %u of the thread) but never waited for", c.group).c_str()
                               : "never committed (cp_async_commit), so no cp_async_wait retires it"));
  }
  yield_to_scheduler(f);
  std::abort();  // an exited fiber is never resumed
}

// Entered (from the fault handler) on the top of a faulting CUDA thread's stack.
extern "C" void cuemu_fault_recover() {
  using namespace cuemu;
  record_failure(g_fault_text, cudaErrorIllegalAddress);
  yield_to_scheduler(g_cur);
  std::abort();  // a failed block's fibers are never resumed
}

namespace cuemu {

// ---- synchronisation -----------------------------------------------------------------------
void syncthreads(const char* file, int line) {
  Fiber* f = g_cur;
  if (g_blk.n_exited > 0)
    fail_in_fiber(fmt("__syncthreads at %s:%d reached by %s after thread %d of the block exited: a "
                      "barrier every thread of the block must reach", base_name(file), line,
                      thread_name(*f).c_str(), g_blk.first_exited));
  block_fiber(f, St::Barrier);
  f->file = file;
  f->line = line;
  if (++g_blk.at_barrier == g_blk.live) {
    // everyone is here: the same barrier?
    for (int i = 0; i < g_blk.nthreads; ++i) {
      const Fiber& o = g_fibers[i];
      if (o.st == St::Barrier && (o.line != line || std::strcmp(o.file, file) != 0))
        fail_in_fiber("divergent __syncthreads: the block's threads wait at different barriers: " +
                      describe_threads());
    }
    g_blk.at_barrier = 0;
    publish_landed(0, g_blk.nthreads, 0u);  // cp.async data retired before it: visible to all
    for (int i = 0; i < g_blk.nthreads; ++i)
      if (g_fibers[i].st == St::Barrier) set_runnable(&g_fibers[i]);
  }
  yield_to_scheduler(f);
}

namespace {

void check_warp_op(Fiber* f, const char* what, unsigned mask, const char* file, int line) {
  const int w = f->t.warp;
  if (mask != 0xffffffffu)
    fail_in_fiber(fmt("%s at %s:%d with mask 0x%08x: the kernels' warp operations must name the whole "
                      "warp (0xffffffff)", what, base_name(file), line, mask));
  if (g_blk.present[w] != 0xffffffffu)
    fail_in_fiber(fmt("%s at %s:%d names 32 lanes but warp %d has only %d threads (blockDim %d is not a "
                      "multiple of 32)", what, base_name(file), line, w, __builtin_popcount(g_blk.present[w]),
                      g_blk.nthreads));
  if (g_blk.exited[w])
    fail_in_fiber(fmt("%s at %s:%d by %s after lane %d of its warp exited", what, base_name(file), line,
                      thread_name(*f).c_str(), __builtin_ctz(g_blk.exited[w])));
}

int shuffle_source(const Fiber& f) {
  const int lane = f.t.lane, w = f.width, base = lane & ~(w - 1);
  switch (f.kind) {
    case kShflIdx: return base + (f.arg & (w - 1));
    case kShflXor: {
      const int s = lane ^ f.arg;
      return (s >= base && s < base + w) ? s : lane;
    }
    case kShflDown: return (lane - base) + f.arg < w ? lane + f.arg : lane;
    case kShflUp: return (lane - base) - f.arg >= 0 ? lane - f.arg : lane;
  }
  return lane;
}

const char* shfl_name(ShflKind k) {
  switch (k) {
    case kShflIdx: return "__shfl_sync";
    case kShflXor: return "__shfl_xor_sync";
    case kShflDown: return "__shfl_down_sync";
    case kShflUp: return "__shfl_up_sync";
  }
  return "shuffle";
}

}  // namespace

uint64_t shuffle(ShflKind kind, unsigned mask, uint64_t bits, int arg, int width, const char* file, int line) {
  Fiber* f = g_cur;
  check_warp_op(f, shfl_name(kind), mask, file, line);
  if (width < 1 || width > 32 || (width & (width - 1)))
    fail_in_fiber(fmt("%s at %s:%d with width %d (must be a power of two <= 32)", shfl_name(kind),
                      base_name(file), line, width));
  const int w = f->t.warp;
  f->kind = kind;
  f->mask = mask;
  f->arg = arg;
  f->width = width;
  f->val = bits;
  f->file = file;
  f->line = line;
  block_fiber(f, St::Shuffle);
  g_blk.at_shfl[w] |= 1u << f->t.lane;
  if (g_blk.at_wsync[w] || g_blk.at_coll[w])
    fail_in_fiber(fmt("warp %d: lanes wait %s while %s enters %s at %s:%d", w,
                      g_blk.at_wsync[w] ? "at __syncwarp" : "in a warp-collective instruction",
                      thread_name(*f).c_str(), shfl_name(kind), base_name(file), line));
  if (g_blk.at_shfl[w] == g_blk.present[w]) {  // the whole warp is here: exchange
    Fiber* lanes = &g_fibers[w * 32];
    for (int i = 0; i < 32; ++i) {
      const Fiber& o = lanes[i];
      if (o.kind != kind || o.width != width || o.line != line || std::strcmp(o.file, file) != 0)
        fail_in_fiber(fmt("divergent warp shuffle in warp %d: lane %d is in %s at %s:%d, lane %d in %s at %s:%d",
                          w, i, shfl_name(o.kind), base_name(o.file), o.line, f->t.lane, shfl_name(kind),
                          base_name(file), line));
    }
    for (int i = 0; i < 32; ++i) lanes[i].result = lanes[shuffle_source(lanes[i])].val;
    g_blk.at_shfl[w] = 0;
    for (int i = 0; i < 32; ++i) set_runnable(&lanes[i]);
  }
  yield_to_scheduler(f);
  return f->result;
}

void syncwarp(unsigned mask, const char* file, int line) {
  Fiber* f = g_cur;
  check_warp_op(f, "__syncwarp", mask, file, line);
  const int w = f->t.warp;
  f->file = file;
  f->line = line;
  block_fiber(f, St::Warpsync);
  g_blk.at_wsync[w] |= 1u << f->t.lane;
  if (g_blk.at_shfl[w] || g_blk.at_coll[w])
    fail_in_fiber(fmt("warp %d: lanes wait in a %s while %s enters __syncwarp at %s:%d", w,
                      g_blk.at_shfl[w] ? "shuffle" : "warp-collective instruction",
                      thread_name(*f).c_str(), base_name(file), line));
  if (g_blk.at_wsync[w] == g_blk.present[w]) {
    g_blk.at_wsync[w] = 0;
    publish_landed(w * 32, w * 32 + 32, kChunkWarp);  // cp.async data retired before it: the warp's
    for (int i = 0; i < 32; ++i) set_runnable(&g_fibers[w * 32 + i]);
  }
  yield_to_scheduler(f);
}

// ---- warp-collective instructions ----------------------------------------------------------------
void warp_collective(const char* name, WarpOp op, void* frag, const char* file, int line) {
  Fiber* f = g_cur;
  check_warp_op(f, name, 0xffffffffu, file, line);
  const int w = f->t.warp;
  f->coll_name = name;
  f->coll_op = op;
  f->frag = frag;
  f->file = file;
  f->line = line;
  block_fiber(f, St::Collective);
  g_blk.at_coll[w] |= 1u << f->t.lane;
  if (g_blk.at_shfl[w] || g_blk.at_wsync[w])
    fail_in_fiber(fmt("warp %d: lanes wait %s while %s enters %s at %s:%d", w,
                      g_blk.at_shfl[w] ? "in a warp shuffle" : "at __syncwarp", thread_name(*f).c_str(), name,
                      base_name(file), line));
  if (g_blk.at_coll[w] == g_blk.present[w]) {  // the whole warp is here: run the instruction
    Fiber* lanes = &g_fibers[w * 32];
    void* frags[32];
    for (int i = 0; i < 32; ++i) {
      const Fiber& o = lanes[i];
      if (o.coll_op != op || o.line != line || std::strcmp(o.file, file) != 0)
        fail_in_fiber(fmt("divergent warp-collective instruction in warp %d: lane %d is in %s at %s:%d, lane %d "
                          "in %s at %s:%d", w, i, o.coll_name, base_name(o.file), o.line, f->t.lane, name,
                          base_name(file), line));
      frags[i] = o.frag;
    }
    g_coll_name = name;
    g_coll_file = file;
    g_coll_line = line;
    g_coll_warp = w;
    op(frags);
    g_blk.at_coll[w] = 0;
    for (int i = 0; i < 32; ++i) set_runnable(&lanes[i]);
  }
  yield_to_scheduler(f);
}

void warp_op_fail(const char* format, ...) {
  char buf[768];
  va_list ap;
  va_start(ap, format);
  vsnprintf(buf, sizeof buf, format, ap);
  va_end(ap);
  fail_in_fiber(fmt("%s (%s at %s:%d, warp %d)", buf, g_coll_name, base_name(g_coll_file), g_coll_line,
                    g_coll_warp));
}

void check_warp_smem_row(const void* p, int lane) {
  const long chunk = smem_chunk(p, 16);
  if (chunk < 0)
    warp_op_fail("lane %d supplies the row address %p, which is not in the block's shared memory", lane, p);
  if (reinterpret_cast<uintptr_t>(p) & 15)
    warp_op_fail("lane %d supplies the row address %p, which is not 16-byte aligned", lane, p);
  const uint32_t e = g_chunks[chunk];
  if (!e) return;
  const int owner = chunk_owner(e);
  const Fiber& o = g_fibers[owner];
  if (chunk_state(e) == kChunkWarp && o.t.warp == g_coll_warp) return;
  if (chunk_state(e) == kChunkPending) {
    const AsyncCopy* c = find_pending(owner, chunk);
    warp_op_fail("the row at %p (lane %d's address) is the destination of a cp.async of %s issued at %s:%d "
                 "and still in flight: a cp_async_wait that retires its group is missing", p, lane,
                 thread_name(o).c_str(), c ? base_name(c->file) : "?", c ? c->line : 0);
  }
  warp_op_fail("the row at %p (lane %d's address) was written by a cp.async of %s, retired by its "
               "cp_async_wait but not yet made visible to this warp: %s is missing after the wait", p, lane,
               thread_name(o).c_str(), o.t.warp == g_coll_warp ? "a __syncwarp or __syncthreads" : "a __syncthreads");
}

// ---- cp.async ------------------------------------------------------------------------------------
void cp_async_16(void* smem, const void* gmem, bool pred, const char* file, int line) {
  Fiber* f = g_cur;
  const long chunk = smem_chunk(smem, 16);
  const char* what = "cp.async";
  if (chunk < 0)
    fail_in_fiber(fmt("%s at %s:%d by %s: the destination %p is not in the block's shared memory", what,
                      base_name(file), line, thread_name(*f).c_str(), smem));
  if (reinterpret_cast<uintptr_t>(smem) & 15)
    fail_in_fiber(fmt("%s at %s:%d by %s: the destination %p is not 16-byte aligned", what, base_name(file),
                      line, thread_name(*f).c_str(), smem));
  if (pred && (reinterpret_cast<uintptr_t>(gmem) & 15))
    fail_in_fiber(fmt("%s at %s:%d by %s: the source %p is not 16-byte aligned", what, base_name(file), line,
                      thread_name(*f).c_str(), gmem));
  if (pred && smem_chunk(gmem, 1) >= 0)
    fail_in_fiber(fmt("%s at %s:%d by %s: the source %p is in shared memory (cp.async copies global to shared)",
                      what, base_name(file), line, thread_name(*f).c_str(), gmem));
  uint32_t& e = g_chunks[chunk];
  if (chunk_state(e) == kChunkPending) {
    const int owner = chunk_owner(e);
    const AsyncCopy* c = find_pending(owner, chunk);
    fail_in_fiber(fmt("%s at %s:%d by %s into shared memory at %p, where a cp.async of %s issued at %s:%d is "
                      "still in flight", what, base_name(file), line, thread_name(*f).c_str(), smem,
                      thread_name(g_fibers[owner]).c_str(), c ? base_name(c->file) : "?", c ? c->line : 0));
  }
  AsyncCopy c;
  c.dst = static_cast<char*>(smem);
  c.chunk = chunk;
  c.group = 0;
  c.file = file;
  c.line = line;
  if (pred)
    std::memcpy(c.data, gmem, 16);  // a bad source faults here, at the issuing line
  else
    std::memset(c.data, 0, 16);     // src-size 0: the 16 bytes are zero-filled, nothing is read
  fill_pattern(c.dst, 16);          // what a read before the wait sees
  e = kChunkPending | static_cast<uint32_t>(f->t.linear + 1);
  g_chunks_dirty = true;
  f->async.push_back(c);
}

void cp_async_commit(const char*, int) {
  Fiber* f = g_cur;
  ++f->async_groups;  // an empty group counts too, as in PTX
  for (AsyncCopy& c : f->async)
    if (!c.group) c.group = f->async_groups;
}

void cp_async_wait(int n, const char* file, int line) {
  Fiber* f = g_cur;
  if (n < 0)
    fail_in_fiber(fmt("cp_async_wait<%d> at %s:%d: the group count must be >= 0", n, base_name(file), line));
  // cp.async.wait_group n: every committed group but the newest n is complete
  const uint32_t upto = f->async_groups > static_cast<uint32_t>(n) ? f->async_groups - n : 0;
  size_t kept = 0;
  uint32_t poison[4];
  fill_pattern(poison, 16);
  for (size_t i = 0; i < f->async.size(); ++i) {
    AsyncCopy& c = f->async[i];
    if (!c.group || c.group > upto) {
      f->async[kept++] = c;
      continue;
    }
    if (std::memcmp(c.dst, poison, 16) != 0)
      fail_in_fiber(fmt("shared memory at %p was written while a cp.async to it (issued at %s:%d by %s) was in "
                        "flight; found at the cp_async_wait at %s:%d", static_cast<void*>(c.dst), base_name(c.file),
                        c.line, thread_name(*f).c_str(), base_name(file), line));
    std::memcpy(c.dst, c.data, 16);
    g_chunks[c.chunk] = kChunkLanded | static_cast<uint32_t>(f->t.linear + 1);
    f->landed.push_back(c.chunk);
  }
  f->async.resize(kept);
}

// ---- shared memory -------------------------------------------------------------------------
void* static_shared(SharedSlot& slot) {
  if (slot.offset < 0) {
    const size_t a = std::max<size_t>(slot.align, 16);
    const size_t off = round_up(g_static_used, a);
    if (off + slot.size > kStaticArenaBytes)
      fail_in_fiber(fmt("static shared memory arena full (%zu B) at %s", kStaticArenaBytes, slot.name));
    slot.offset = static_cast<long>(off);
    g_static_used = off + slot.size;
    fill_pattern(g_static_arena + off, slot.size);
  }
  if (slot.stamp != g_block_stamp) {
    slot.stamp = g_block_stamp;
    g_block_static_bytes += slot.size;
    if (g_block_static_bytes > kDefaultSmem)
      fail_in_fiber(fmt("static shared memory of the kernel exceeds 48 KB (at %s, %s:%d)", slot.name,
                        base_name(slot.file), slot.line));
  }
  return g_static_arena + slot.offset;
}

void* dynamic_shared() { return g_dyn_ptr; }

// ---- launches --------------------------------------------------------------------------------
cudaError_t launch_raw(const void* kernel, dim3 grid, dim3 block, size_t smem, Thunk thunk, const void* args,
                       const char* file, int line) {
  std::lock_guard<std::recursive_mutex> lock(g_launch_mutex);
  ++g_stats.launches;
  const std::string site = fmt(" (kernel launched at %s:%d)", base_name(file), line);
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  if (block.x == 0 || block.y == 0 || block.z == 0 || block.x > 1024 || block.y > 1024 || block.z > 64 ||
      threads > 1024)
    return set_error(cudaErrorInvalidConfiguration,
                     fmt("blockDim (%u,%u,%u) is invalid: each of x, y <= 1024, z <= 64, at most 1024 threads",
                         block.x, block.y, block.z) + site);
  const int bound = launch_bound(kernel);
  if (bound > 0 && threads > static_cast<uint64_t>(bound))
    return set_error(cudaErrorLaunchOutOfResources,
                     fmt("%llu threads per block exceed the kernel's __launch_bounds__(%d)",
                         static_cast<unsigned long long>(threads), bound) + site);
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > kMaxGridX || grid.y > kMaxGridYZ ||
      grid.z > kMaxGridYZ)
    return set_error(cudaErrorInvalidConfiguration,
                     fmt("gridDim (%u,%u,%u) is invalid: x in [1, 2^31-1], y and z in [1, 65535]", grid.x,
                         grid.y, grid.z) + site);
  if (!ensure_fibers() || !map_dynamic(smem))
    return set_error(cudaErrorMemoryAllocation, "the emulator could not map its stacks or shared memory");
  KernelInfo& ki = g_kernels[kernel];
  if (ki.static_known) {
    const std::string why = check_shared(ki, smem);
    if (!why.empty()) return set_error(cudaErrorInvalidValue, why + site);
  }

  Stats& site_stats = g_site_stats[base_name(file)];
  ++site_stats.launches;  // a launch that passed the checks above; its blocks as they run
  g_launch = LaunchState{kernel, thunk, args, file, line, grid, block, smem};
  g_grid_dim = grid;
  g_block_dim = block;
  g_rng.s = g_config.seed * 0x2545f4914f6cdd1dull + 12345;

  // the blocks to run, in launch order (x fastest)
  const uint64_t total = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  std::vector<uint64_t> order;
  if (g_config.sample_blocks > 0 && total > static_cast<uint64_t>(g_config.sample_blocks) + 2) {
    order.push_back(0);
    order.push_back(total - 1);
    while (order.size() < static_cast<size_t>(g_config.sample_blocks) + 2) {
      const uint64_t b = g_rng.next() % total;
      if (std::find(order.begin(), order.end(), b) == order.end()) order.push_back(b);
    }
  } else {
    order.resize(total);
    for (uint64_t i = 0; i < total; ++i) order[i] = i;
  }
  if (g_config.seed >= 2)
    for (size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[g_rng.next() % i]);
  else if (g_config.seed == 1)
    std::reverse(order.begin(), order.end());

  FaultHandlerScope handler;
  g_fill = (g_config.seed & 1) ? 0xffffffffu : 0x7fc00000u;
  g_chunks.assign(kStaticChunks + (smem + 15) / 16, 0u);
  g_chunks_dirty = false;
  for (const uint64_t id : order) {
    g_block_idx = uint3{static_cast<unsigned>(id % grid.x), static_cast<unsigned>((id / grid.x) % grid.y),
                        static_cast<unsigned>(id / (static_cast<uint64_t>(grid.x) * grid.y))};
    run_block(ki);
    ++site_stats.blocks;
    if (g_blk.failed) return set_error(g_fail_code, g_fail_message);
    const std::string why = check_shared(ki, smem);
    if (!why.empty()) return set_error(cudaErrorInvalidValue, why + site);
  }
  return cudaSuccess;
}

cudaError_t func_set_attribute(const void* kernel, int attr, int value) {
  std::lock_guard<std::recursive_mutex> lock(g_launch_mutex);
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;
  KernelInfo& ki = g_kernels[kernel];
  if (value < 0 || static_cast<size_t>(value) + ki.static_bytes > kMaxSmemPerBlock)
    return set_error(cudaErrorInvalidValue,
                     fmt("cudaFuncSetAttribute(MaxDynamicSharedMemorySize, %d): over the A100's %zu B per "
                         "block (with %zu B static)", value, kMaxSmemPerBlock, ki.static_bytes));
  ki.max_dynamic = value;
  return cudaSuccess;
}

cudaError_t peek_last_error() { return t_last_error; }

cudaError_t take_last_error() {
  const cudaError_t e = t_last_error;
  t_last_error = cudaSuccess;
  return e;
}

const char* error_string(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDeviceFunction: return "invalid device function";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
  }
  return "unknown error";
}

// ---- host-side API ---------------------------------------------------------------------------
void configure(const Config& cfg) {
  std::lock_guard<std::recursive_mutex> lock(g_launch_mutex);
  g_config = cfg;
}

Config config() {
  std::lock_guard<std::recursive_mutex> lock(g_launch_mutex);
  return g_config;
}

const std::string& last_message() { return t_message; }
void clear_last_message() { t_message.clear(); }

Stats stats() {
  std::lock_guard<std::recursive_mutex> lock(g_launch_mutex);
  return g_stats;
}

Stats site_stats(const char* file) {
  std::lock_guard<std::recursive_mutex> lock(g_launch_mutex);
  const auto it = g_site_stats.find(base_name(file));
  return it == g_site_stats.end() ? Stats{} : it->second;
}

GuardedBuffer::GuardedBuffer(const char* name, void* host, size_t bytes, bool copy_back)
    : name_(name), host_(host), bytes_(bytes), copy_back_(copy_back) {
  map_ = map_guarded(bytes, &map_len_);
  if (!map_) {
    std::fprintf(stderr, "cuemu: cannot map %zu B for buffer '%s'\n", bytes, name);
    std::abort();
  }
  const size_t pg = page_size();
  const size_t body = map_len_ - 2 * pg;
  data_ = config().guard_mode == 1 ? map_ + pg : map_ + pg + body - bytes;
  if (bytes) std::memcpy(data_, host, bytes);
  std::lock_guard<std::mutex> lock(g_region_mutex);
  for (int i = 0; i < kMaxRegions; ++i) {
    if (g_regions[i].used) continue;
    g_regions[i] = Region{name, map_, map_len_, data_, bytes, true};
    slot_ = i;
    break;
  }
}

GuardedBuffer::~GuardedBuffer() {
  if (copy_back_ && bytes_) std::memcpy(host_, data_, bytes_);
  {
    std::lock_guard<std::mutex> lock(g_region_mutex);
    if (slot_ >= 0) g_regions[slot_].used = false;
  }
  munmap(map_, map_len_);
}

}  // namespace cuemu
