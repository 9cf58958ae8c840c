// mslemu_rt.cpp - the emulator's CPU runtime (compiled once per header version
// into a shared library the kernel libraries link against; compiled into the
// sanitizer executables directly). See mslemu.h for the interface.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <sys/mman.h>
#include <unistd.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define MSLEMU_ASAN 1
#else
#define MSLEMU_ASAN 0
#endif

#include "mslemu.h"
// mslemu.h erases the MSL address-space keywords; this file is plain C++ again
#undef device
#undef constant
#undef thread
#undef threadgroup

extern "C" void mslemu_swap(void** save_sp, void* to_sp);
#if defined(__x86_64__) && !defined(MSLEMU_UCONTEXT)
// Cooperative switch (SysV x86-64): save callee-saved registers, MXCSR and the
// x87 control word on the old stack, store its sp, load the new sp, restore.
asm(R"(
  .text
  .p2align 4
  .globl mslemu_swap
  .hidden mslemu_swap
  .type mslemu_swap,@function
mslemu_swap:
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
  .size mslemu_swap, .-mslemu_swap
)");
#define MSLEMU_ASM_SWITCH 1
#else
#include <ucontext.h>
#define MSLEMU_ASM_SWITCH 0
#endif

namespace mslemu {

struct Fiber {
  void* sp = nullptr;
  char* base = nullptr;  // mapping (guard page first)
  char* stack = nullptr;
  size_t stack_size = 0;
  St state = St::done;
  Site site;
  int tid = 0;
  int nbytes = 0;
  unsigned char val[kMaxValue];
  Snapshot* snap = nullptr;
  void* asan_fake = nullptr;
#if !MSLEMU_ASM_SWITCH
  ucontext_t uc;
#endif
};

struct TgBlock {
  const void* key;
  void* ptr;
  size_t size;
  uint64_t gen;
};

struct Messages {
  std::mutex mu;
  std::vector<std::pair<std::string, long>> items;  // "kind|text" -> count
  void add(const std::string& s) {
    std::lock_guard<std::mutex> g(mu);
    for (auto& it : items)
      if (it.first == s) {
        ++it.second;
        return;
      }
    items.emplace_back(s, 1);
  }
};

struct Runtime {
  const LaunchCfg* cfg = nullptr;
  Messages* msgs = nullptr;
  // current threadgroup
  uint32_t tg_pos[3] = {0, 0, 0};
  uint32_t tg_act[3] = {1, 1, 1};  // actual size of this (maybe partial) threadgroup
  int n_threads = 0;
  uint64_t gen = 0;
  size_t tg_bytes = 0;
  std::vector<TgBlock> blocks;
  // fibers
  bool fiber_mode = false;
  std::vector<std::unique_ptr<Fiber>> fibers;
  Fiber* cur = nullptr;
  void* main_sp = nullptr;
  void* main_fake = nullptr;
  const void* main_bottom = nullptr;
  size_t main_size = 0;
#if !MSLEMU_ASM_SWITCH
  ucontext_t main_uc;
#endif
  int n_live = 0;
  void (*body)(void*, int) = nullptr;
  void* body_ctx = nullptr;
  std::vector<std::vector<std::unique_ptr<Snapshot>>> snaps;  // per simdgroup, reused
  std::vector<int> snap_used;
  std::mt19937_64 rng;

  ~Runtime() {
    for (auto& f : fibers)
      if (f->base) munmap(f->base, f->stack_size + size_t(getpagesize()));
    for (auto& b : blocks) std::free(b.ptr);
  }
};

static thread_local Runtime* g_rt = nullptr;

static std::string where(const Site& s) { return std::string(s.file) + ":" + std::to_string(s.line); }
static void message(const char* kind, const std::string& text) {
  if (g_rt && g_rt->msgs) g_rt->msgs->add(std::string(kind) + "|" + text);
}
void warn(const char* text, const Site& s) { message("warning", std::string(text) + " at " + where(s)); }
static void warn(const std::string& text, const Site& s) { warn(text.c_str(), s); }

struct PlainModeSync : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// --- threadgroup memory: one heap block per declaration, poisoned (0xFF = NaN) per threadgroup
void* tg_block(const void* key, size_t size) {
  Runtime& rt = *g_rt;
  TgBlock* blk = nullptr;
  for (auto& b : rt.blocks)
    if (b.key == key) blk = &b;
  if (!blk) {
    void* p = std::malloc(size);  // exact size: ASan builds see overflows
    rt.blocks.push_back(TgBlock{key, p, size, 0});
    blk = &rt.blocks.back();
  }
  if (blk->gen != rt.gen) {
    std::memset(blk->ptr, 0xFF, blk->size);
    blk->gen = rt.gen;
    rt.tg_bytes += blk->size;
    if (rt.tg_bytes > kTgLimit)
      message("error", "threadgroup memory " + std::to_string(rt.tg_bytes) + " bytes exceeds the 32 KiB limit");
  }
  return blk->ptr;
}

// --- fibers
[[noreturn]] static void fiber_entry_();

static void switch_to_fiber(Runtime& rt, Fiber& f) {
  rt.cur = &f;
#if MSLEMU_ASAN
  __sanitizer_start_switch_fiber(&rt.main_fake, f.stack, f.stack_size);
#endif
#if MSLEMU_ASM_SWITCH
  mslemu_swap(&rt.main_sp, f.sp);
#else
  swapcontext(&rt.main_uc, &f.uc);
#endif
#if MSLEMU_ASAN
  __sanitizer_finish_switch_fiber(rt.main_fake, nullptr, nullptr);
#endif
  rt.cur = nullptr;
}

static void yield_to_main(Runtime& rt, Fiber& f, bool dying) {
#if MSLEMU_ASAN
  __sanitizer_start_switch_fiber(dying ? nullptr : &f.asan_fake, rt.main_bottom, rt.main_size);
#else
  (void)dying;
#endif
#if MSLEMU_ASM_SWITCH
  mslemu_swap(&f.sp, rt.main_sp);
#else
  swapcontext(&f.uc, &rt.main_uc);
#endif
#if MSLEMU_ASAN
  __sanitizer_finish_switch_fiber(f.asan_fake, &rt.main_bottom, &rt.main_size);
#endif
}

[[noreturn]] static void fiber_entry_() {
  Runtime& rt = *g_rt;
  Fiber& f = *rt.cur;
#if MSLEMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &rt.main_bottom, &rt.main_size);
#endif
  rt.body(rt.body_ctx, f.tid);
  f.state = St::done;
  rt.n_live--;
  yield_to_main(rt, f, true);
  __builtin_unreachable();
}
#if !MSLEMU_ASM_SWITCH
extern "C" void mslemu_uc_entry_() { fiber_entry_(); }
#endif

static void init_fiber(Runtime& rt, Fiber& f, int tid) {
  if (!f.base) {
    size_t page = size_t(getpagesize());
    f.stack_size = size_t(rt.cfg->stack_kb) * 1024;
    f.base = static_cast<char*>(mmap(nullptr, f.stack_size + page, PROT_READ | PROT_WRITE,
                                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
    if (f.base == MAP_FAILED) throw std::runtime_error("mslemu: cannot map a fiber stack");
    mprotect(f.base, page, PROT_NONE);  // guard page: a stack overflow faults
    f.stack = f.base + page;
  }
  f.tid = tid;
  f.state = St::runnable;
  f.snap = nullptr;
  f.asan_fake = nullptr;
#if MSLEMU_ASM_SWITCH
  uintptr_t top = (reinterpret_cast<uintptr_t>(f.stack) + f.stack_size) & ~uintptr_t(15);
  uint64_t* sp = reinterpret_cast<uint64_t*>(top);
  *--sp = 0;                                                   // fake return address of fiber_entry_
  *--sp = reinterpret_cast<uint64_t>(&fiber_entry_);           // popped by `ret`
  for (int i = 0; i < 6; ++i) *--sp = 0;                       // rbp rbx r12-r15
  *--sp = 0x1F80ull | (uint64_t(0x037F) << 32);                // MXCSR, x87 control word
  f.sp = sp;
#else
  getcontext(&f.uc);
  f.uc.uc_stack.ss_sp = f.stack;
  f.uc.uc_stack.ss_size = f.stack_size;
  f.uc.uc_link = nullptr;
  makecontext(&f.uc, reinterpret_cast<void (*)()>(&mslemu_uc_entry_), 0);
#endif
}

// Resolve the collectives of SIMD-group `sg` whose live lanes are all blocked.
// Lanes waiting at the same call site form one active set.
static bool resolve_sg_(Runtime& rt, int sg) {
  int lo = sg * kSimd, hi = std::min(rt.n_threads, lo + kSimd);
  for (int t = lo; t < hi; ++t)
    if (rt.fibers[t]->state == St::runnable) return false;
  bool any = false;
  uint32_t done_mask = 0;
  for (int t = lo; t < hi; ++t) {
    Fiber& f = *rt.fibers[t];
    if (f.state != St::collective || (done_mask >> (t - lo) & 1)) continue;
    if (rt.snap_used[sg] == int(rt.snaps[sg].size())) rt.snaps[sg].push_back(std::make_unique<Snapshot>());
    Snapshot& s = *rt.snaps[sg][rt.snap_used[sg]++];
    s.mask = 0;
    s.nbytes = f.nbytes;
    for (int u = t; u < hi; ++u) {
      Fiber& g = *rt.fibers[u];
      if (g.state == St::collective && g.site == f.site) {
        if (g.nbytes != s.nbytes) warn("collective called with different value types", g.site);
        s.mask |= 1u << (u - lo);
        std::memcpy(s.vals[u - lo], g.val, kMaxValue);
        g.snap = &s;
        g.state = St::runnable;
      }
    }
    done_mask |= s.mask;
    any = true;
  }
  return any;
}

static void run_fiber_(Runtime& rt, int t) {
  Fiber& f = *rt.fibers[t];
  if (f.state == St::runnable) switch_to_fiber(rt, f);
}

static void run_threadgroup_fibers_(Runtime& rt) {
  const int n = rt.n_threads;
  const int nsg = (n + kSimd - 1) / kSimd;
  while (int(rt.fibers.size()) < n) rt.fibers.push_back(std::make_unique<Fiber>());
  for (int t = 0; t < n; ++t) init_fiber(rt, *rt.fibers[t], t);
  rt.snaps.resize(std::max<size_t>(rt.snaps.size(), size_t(nsg)));
  rt.snap_used.assign(size_t(nsg), 0);
  rt.n_live = n;
  const Sched sched = Sched(rt.cfg->sched);
  std::vector<int> order(static_cast<size_t>(n));
  while (rt.n_live > 0) {
    if (sched == Sched::eager) {
      // Each SIMD-group runs ahead to its next threadgroup barrier before the next one starts.
      for (int sg = 0; sg < nsg; ++sg) {
        for (;;) {
          rt.snap_used[sg] = 0;
          for (int t = sg * kSimd; t < std::min(n, (sg + 1) * kSimd); ++t) run_fiber_(rt, t);
          if (!resolve_sg_(rt, sg)) break;
        }
      }
    } else {
      for (int t = 0; t < n; ++t) order[t] = t;
      if (sched == Sched::reverse) std::reverse(order.begin(), order.end());
      if (sched == Sched::random) std::shuffle(order.begin(), order.end(), rt.rng);
      for (int t : order) run_fiber_(rt, t);
      bool any = false;
      for (int sg = 0; sg < nsg; ++sg) {
        rt.snap_used[sg] = 0;
        any |= resolve_sg_(rt, sg);
      }
      if (any) continue;
    }
    if (rt.n_live == 0) break;
    // Everyone alive is blocked at a threadgroup barrier.
    int waiting = 0;
    const Site* first = nullptr;
    bool same = true;
    for (int t = 0; t < n; ++t) {
      Fiber& f = *rt.fibers[t];
      if (f.state == St::collective) {
        throw std::runtime_error("mslemu scheduler: unresolved collective at " + where(f.site));
      }
      if (f.state != St::barrier) continue;
      ++waiting;
      if (!first) first = &f.site;
      else if (!(f.site == *first)) same = false;
    }
    if (waiting == 0) throw std::runtime_error("mslemu scheduler: no progress");
    if (!same) warn("threads of one threadgroup wait at different threadgroup_barrier call sites", *first);
    if (waiting < n)
      warn("threadgroup_barrier reached by " + std::to_string(waiting) + " of " + std::to_string(n) +
               " threads (the others returned)",
           *first);
    for (int t = 0; t < n; ++t)
      if (rt.fibers[t]->state == St::barrier) rt.fibers[t]->state = St::runnable;
  }
}


// --- sync points called from kernel code
static void block_(St st, const Site& site) {
  Runtime& rt = *g_rt;
  if (!rt.fiber_mode || !rt.cur)
    throw PlainModeSync("barrier or SIMD-group function reached in plain (fiber-less) mode at " + where(site));
  Fiber& f = *rt.cur;
  f.state = st;
  f.site = site;
  yield_to_main(rt, f, false);
}

void barrier_wait(const Site& site) { block_(St::barrier, site); }

const Snapshot& collect_bytes(const void* v, int nbytes, const Site& site) {
  Runtime& rt = *g_rt;
  if (!rt.fiber_mode || !rt.cur)
    throw PlainModeSync("SIMD-group function reached in plain (fiber-less) mode at " + where(site));
  Fiber& f = *rt.cur;
  std::memcpy(f.val, v, size_t(nbytes));
  f.nbytes = nbytes;
  block_(St::collective, site);
  return *f.snap;
}

int lane_id() { return g_rt->cur->tid % kSimd; }

static ThreadCtx make_ctx_(const Runtime& rt, int tid) {
  const LaunchCfg& c = *rt.cfg;
  ThreadCtx x;
  const uint a0 = rt.tg_act[0], a1 = rt.tg_act[1];
  const uint n = uint(rt.n_threads);
  const uint req = c.tg[0] * c.tg[1] * c.tg[2];
  uint tp[3] = {uint(tid) % a0, (uint(tid) / a0) % a1, uint(tid) / (a0 * a1)};
  x.thread_position_in_threadgroup = uint3(tp[0], tp[1], tp[2]);
  x.threadgroup_position_in_grid = uint3(rt.tg_pos[0], rt.tg_pos[1], rt.tg_pos[2]);
  x.thread_position_in_grid = uint3(rt.tg_pos[0] * c.tg[0] + tp[0], rt.tg_pos[1] * c.tg[1] + tp[1],
                                    rt.tg_pos[2] * c.tg[2] + tp[2]);
  x.threads_per_threadgroup = uint3(rt.tg_act[0], rt.tg_act[1], rt.tg_act[2]);
  x.dispatch_threads_per_threadgroup = uint3(c.tg[0], c.tg[1], c.tg[2]);
  x.threads_per_grid = uint3(c.grid[0], c.grid[1], c.grid[2]);
  x.grid_size = x.threads_per_grid;
  x.grid_origin = uint3(0u);
  x.threadgroups_per_grid = uint3((c.grid[0] + c.tg[0] - 1) / c.tg[0], (c.grid[1] + c.tg[1] - 1) / c.tg[1],
                                  (c.grid[2] + c.tg[2] - 1) / c.tg[2]);
  x.thread_index_in_threadgroup = uint(tid);
  x.thread_execution_width = kSimd;
  x.threads_per_simdgroup = kSimd;
  x.simdgroup_index_in_threadgroup = uint(tid) / kSimd;
  x.thread_index_in_simdgroup = uint(tid) % kSimd;
  x.simdgroups_per_threadgroup = (n + kSimd - 1) / kSimd;
  x.dispatch_simdgroups_per_threadgroup = (req + kSimd - 1) / kSimd;
  x.quadgroup_index_in_threadgroup = uint(tid) / 4;
  x.thread_index_in_quadgroup = uint(tid) % 4;
  x.quadgroups_per_threadgroup = (n + 3) / 4;
  x.dispatch_quadgroups_per_threadgroup = (req + 3) / 4;
  return x;
}

// Run the whole grid. `fn(const ThreadCtx&)` runs one GPU thread.
int launch_raw(const LaunchCfg& cfg, ThreadFn fn, void* fn_ctx, char* msgbuf, int msgcap) {
  Messages msgs;
  uint32_t ntg[3];
  for (int d = 0; d < 3; ++d) ntg[d] = cfg.grid[d] == 0 ? 0 : (cfg.grid[d] + cfg.tg[d] - 1) / cfg.tg[d];
  const uint64_t total = uint64_t(ntg[0]) * ntg[1] * ntg[2];
  std::vector<uint64_t> order(total);
  for (uint64_t i = 0; i < total; ++i) order[i] = i;
  const Sched sched = Sched(cfg.sched);
  if (sched == Sched::reverse) std::reverse(order.begin(), order.end());
  if (sched == Sched::random) {
    std::mt19937_64 r(cfg.seed);
    std::shuffle(order.begin(), order.end(), r);
  }
  std::atomic<uint64_t> next{0};
  auto worker = [&](int wid) {
    Runtime rt;
    rt.cfg = &cfg;
    rt.msgs = &msgs;
    rt.fiber_mode = cfg.fiber_mode != 0;
    rt.rng.seed(cfg.seed * 7919 + uint64_t(wid));
    g_rt = &rt;
    std::vector<int> plain_order;
    try {
      for (;;) {
        uint64_t k = next.fetch_add(1);
        if (k >= total) break;
        uint64_t lin = order[k];
        rt.tg_pos[0] = uint32_t(lin % ntg[0]);
        rt.tg_pos[1] = uint32_t((lin / ntg[0]) % ntg[1]);
        rt.tg_pos[2] = uint32_t(lin / (uint64_t(ntg[0]) * ntg[1]));
        for (int d = 0; d < 3; ++d) rt.tg_act[d] = std::min(cfg.tg[d], cfg.grid[d] - rt.tg_pos[d] * cfg.tg[d]);
        rt.n_threads = int(rt.tg_act[0] * rt.tg_act[1] * rt.tg_act[2]);
        rt.gen++;
        rt.tg_bytes = 0;
        auto body = [&](int tid) { fn(fn_ctx, make_ctx_(rt, tid)); };
        if (rt.fiber_mode) {
          rt.body = [](void* c, int tid) { (*static_cast<decltype(body)*>(c))(tid); };
          rt.body_ctx = &body;
          run_threadgroup_fibers_(rt);
        } else {
          plain_order.resize(size_t(rt.n_threads));
          for (int t = 0; t < rt.n_threads; ++t) plain_order[t] = t;
          if (sched == Sched::reverse) std::reverse(plain_order.begin(), plain_order.end());
          if (sched == Sched::random) std::shuffle(plain_order.begin(), plain_order.end(), rt.rng);
          for (int t : plain_order) body(t);
        }
      }
    } catch (const std::exception& e) {
      msgs.add(std::string("error|") + e.what());
      next.store(total);
    }
    g_rt = nullptr;
  };
  int workers = std::max(1, cfg.workers);
  if (workers == 1 || total <= 1) {
    worker(0);
  } else {
    std::vector<std::thread> pool;
    for (int w = 1; w < workers; ++w) pool.emplace_back(worker, w);
    worker(0);
    for (auto& t : pool) t.join();
  }
  std::string out;
  int errors = 0;
  for (auto& it : msgs.items) {
    out += it.first + "|" + std::to_string(it.second) + "\n";
    if (it.first.rfind("error|", 0) == 0) ++errors;
  }
  if (msgbuf && msgcap > 0) {
    size_t n = std::min(out.size(), size_t(msgcap - 1));
    std::memcpy(msgbuf, out.data(), n);
    msgbuf[n] = 0;
  }
  return errors;
}

}  // namespace mslemu
