// mslemu.h - a small Metal Shading Language shim and CPU runtime for MLX
// `mx.fast.metal_kernel` bodies (the project's test tooling; see ../README.md).
//
// One translation unit = this header + the source MLX generates for one call
// (header, signature, body) + a launcher written by ../driver.py. Every GPU
// thread of a threadgroup runs on the CPU: as a plain call when the kernel has
// no barriers or SIMD-group functions, otherwise as a cooperative fiber that
// yields at each barrier / collective, under a chosen legal schedule.
#pragma once

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <random>
#include <source_location>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include <sys/mman.h>
#include <sys/types.h>
#include <unistd.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define MSLEMU_ASAN 1
#else
#define MSLEMU_ASAN 0
#endif

// ---------------------------------------------------------------------------
// Scalar types
// ---------------------------------------------------------------------------
typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef _Float16 half;

struct bfloat {
  uint16_t bits_;
  static uint16_t round_(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    return uint16_t(u >> 16);
  }
  bfloat() = default;
  bfloat(float f) : bits_(round_(f)) {}
  template <class S, class = std::enable_if_t<std::is_arithmetic_v<S> || std::is_same_v<S, _Float16>>>
  bfloat(S v) : bits_(round_(float(v))) {}
  operator float() const {
    uint32_t u = uint32_t(bits_) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  template <class S> bfloat& operator+=(S v) { return *this = bfloat(float(*this) + float(v)); }
  template <class S> bfloat& operator-=(S v) { return *this = bfloat(float(*this) - float(v)); }
  template <class S> bfloat& operator*=(S v) { return *this = bfloat(float(*this) * float(v)); }
  template <class S> bfloat& operator/=(S v) { return *this = bfloat(float(*this) / float(v)); }
};

constexpr half operator""h(long double v) { return half(v); }

namespace mslemu {
template <class T>
inline constexpr bool is_scalar_v = std::is_arithmetic_v<T> || std::is_same_v<T, half> || std::is_same_v<T, bfloat>;
}

// ---------------------------------------------------------------------------
// Vector types: vec<T, N> with MSL size/alignment, .xyzw/.rgba and a few swizzles
// ---------------------------------------------------------------------------
template <class T, int N> struct vec;

namespace mslemu {
template <class T, int N, int... I> struct swz {
  T v_[N];
  operator vec<T, int(sizeof...(I))>() const;
  swz& operator=(const vec<T, int(sizeof...(I))>& o);
};
template <class T> struct vec_traits { static constexpr bool is_vec = false; };
template <class T, int N> struct vec_traits<vec<T, N>> {
  static constexpr bool is_vec = true;
  using elem = T;
  static constexpr int n = N;
};
template <class T, int N, int... I> struct vec_traits<swz<T, N, I...>> {
  static constexpr bool is_vec = true;
  using elem = T;
  static constexpr int n = int(sizeof...(I));
};
template <class A> inline constexpr bool is_vec_v = vec_traits<std::remove_cv_t<std::remove_reference_t<A>>>::is_vec;
}  // namespace mslemu

template <class T, int N> struct vec_storage;
template <class T> struct alignas(2 * sizeof(T)) vec_storage<T, 2> {
  union {
    T v_[2];
    struct { T x, y; };
    struct { T r, g; };
    mslemu::swz<T, 2, 1, 0> yx;
  };
};
template <class T> struct alignas(4 * sizeof(T)) vec_storage<T, 3> {
  union {
    T v_[3];
    struct { T x, y, z; };
    struct { T r, g, b; };
    mslemu::swz<T, 3, 0, 1> xy;
    mslemu::swz<T, 3, 1, 2> yz;
    mslemu::swz<T, 3, 0, 2> xz;
    mslemu::swz<T, 3, 2, 1, 0> zyx;
  };
};
template <class T> struct alignas(4 * sizeof(T)) vec_storage<T, 4> {
  union {
    T v_[4];
    struct { T x, y, z, w; };
    struct { T r, g, b, a; };
    mslemu::swz<T, 4, 0, 1> xy;
    mslemu::swz<T, 4, 2, 3> zw;
    mslemu::swz<T, 4, 0, 1, 2> xyz;
    mslemu::swz<T, 4, 0, 1, 2> rgb;
    mslemu::swz<T, 4, 3, 2, 1, 0> wzyx;
  };
};

template <class T, int N> struct vec : vec_storage<T, N> {
  using vec_storage<T, N>::v_;
  vec() = default;
  // scalar broadcast
  template <class S, class = std::enable_if_t<mslemu::is_scalar_v<S>>>
  vec(S s) {
    for (int i = 0; i < N; ++i) v_[i] = T(s);
  }
  // element-type conversion (explicit in MSL)
  template <class U, class = std::enable_if_t<!std::is_same_v<U, T>>>
  explicit vec(const vec<U, N>& o) {
    for (int i = 0; i < N; ++i) v_[i] = T(o.v_[i]);
  }
  // concatenating constructor: scalars and vectors whose component count is N
  template <class A0, class A1, class... As>
  vec(const A0& a0, const A1& a1, const As&... as) {
    int k = 0;
    put_(k, a0);
    put_(k, a1);
    (put_(k, as), ...);
  }
  template <class A> void put_(int& k, const A& a) {
    if constexpr (mslemu::is_vec_v<A>) {
      using V = vec<typename mslemu::vec_traits<A>::elem, mslemu::vec_traits<A>::n>;
      V t = a;
      for (int i = 0; i < mslemu::vec_traits<A>::n; ++i) v_[k++] = T(t.v_[i]);
    } else {
      v_[k++] = T(a);
    }
  }
  T& operator[](int i) { return v_[i]; }
  const T& operator[](int i) const { return v_[i]; }
#define MSLEMU_VEC_COMPOUND(op)                                   \
  template <class B> vec& operator op##=(const B& b) {            \
    vec r = *this op b;                                           \
    return *this = r;                                             \
  }
  MSLEMU_VEC_COMPOUND(+)
  MSLEMU_VEC_COMPOUND(-)
  MSLEMU_VEC_COMPOUND(*)
  MSLEMU_VEC_COMPOUND(/)
  MSLEMU_VEC_COMPOUND(%)
  MSLEMU_VEC_COMPOUND(&)
  MSLEMU_VEC_COMPOUND(|)
  MSLEMU_VEC_COMPOUND(^)
  MSLEMU_VEC_COMPOUND(<<)
  MSLEMU_VEC_COMPOUND(>>)
#undef MSLEMU_VEC_COMPOUND
};

namespace mslemu {
template <class T, int N, int... I> swz<T, N, I...>::operator vec<T, int(sizeof...(I))>() const {
  vec<T, int(sizeof...(I))> r;
  int k = 0;
  ((r.v_[k++] = v_[I]), ...);
  return r;
}
template <class T, int N, int... I> swz<T, N, I...>& swz<T, N, I...>::operator=(const vec<T, int(sizeof...(I))>& o) {
  int k = 0;
  ((v_[I] = o.v_[k++]), ...);
  return *this;
}
template <class A> auto as_vec(const A& a) {
  using Tr = vec_traits<std::remove_cv_t<A>>;
  return vec<typename Tr::elem, Tr::n>(a);
}
// the vector type of an operation: that of its first vector-like operand
template <class A> using vec_type_t = vec<typename vec_traits<A>::elem, vec_traits<A>::n>;
template <class A, class B, bool = is_vec_v<A>> struct vec_of { using type = vec_type_t<A>; };
template <class A, class B> struct vec_of<A, B, false> { using type = vec_type_t<B>; };
template <class A, class B> using vec_of_t = typename vec_of<A, B>::type;
template <class A, class B, class C, bool = is_vec_v<A> || is_vec_v<B>> struct vec_of3 { using type = vec_of_t<A, B>; };
template <class A, class B, class C> struct vec_of3<A, B, C, false> { using type = vec_type_t<C>; };
template <class A> inline auto elem_(const A& a, int i) {
  if constexpr (is_vec_v<A>) {
    return as_vec(a).v_[i];
  } else {
    return a;
  }
}
}  // namespace mslemu

#define MSLEMU_VEC_BINOP(op)                                                                   \
  template <class A, class B, class = std::enable_if_t<mslemu::is_vec_v<A> || mslemu::is_vec_v<B>>> \
  auto operator op(const A& a, const B& b) {                                                   \
    using V = mslemu::vec_of_t<A, B>;                                                          \
    using T = typename mslemu::vec_traits<V>::elem;                                            \
    V r;                                                                                       \
    for (int i = 0; i < mslemu::vec_traits<V>::n; ++i)                                         \
      r.v_[i] = T(mslemu::elem_(a, i) op mslemu::elem_(b, i));                                 \
    return r;                                                                                  \
  }
MSLEMU_VEC_BINOP(+)
MSLEMU_VEC_BINOP(-)
MSLEMU_VEC_BINOP(*)
MSLEMU_VEC_BINOP(/)
MSLEMU_VEC_BINOP(%)
MSLEMU_VEC_BINOP(&)
MSLEMU_VEC_BINOP(|)
MSLEMU_VEC_BINOP(^)
MSLEMU_VEC_BINOP(<<)
MSLEMU_VEC_BINOP(>>)
#undef MSLEMU_VEC_BINOP
#define MSLEMU_VEC_CMPOP(op)                                                                   \
  template <class A, class B, class = std::enable_if_t<mslemu::is_vec_v<A> || mslemu::is_vec_v<B>>> \
  auto operator op(const A& a, const B& b) {                                                   \
    using V = mslemu::vec_of_t<A, B>;                                                          \
    constexpr int n = mslemu::vec_traits<V>::n;                                                \
    vec<bool, n> r;                                                                            \
    for (int i = 0; i < n; ++i) r.v_[i] = (mslemu::elem_(a, i) op mslemu::elem_(b, i));        \
    return r;                                                                                  \
  }
MSLEMU_VEC_CMPOP(==)
MSLEMU_VEC_CMPOP(!=)
MSLEMU_VEC_CMPOP(<)
MSLEMU_VEC_CMPOP(<=)
MSLEMU_VEC_CMPOP(>)
MSLEMU_VEC_CMPOP(>=)
MSLEMU_VEC_CMPOP(&&)
MSLEMU_VEC_CMPOP(||)
#undef MSLEMU_VEC_CMPOP
template <class T, int N> vec<T, N> operator-(const vec<T, N>& a) {
  vec<T, N> r;
  for (int i = 0; i < N; ++i) r.v_[i] = T(-a.v_[i]);
  return r;
}
template <class T, int N> vec<T, N> operator~(const vec<T, N>& a) {
  vec<T, N> r;
  for (int i = 0; i < N; ++i) r.v_[i] = T(~a.v_[i]);
  return r;
}
template <class T, int N> vec<bool, N> operator!(const vec<T, N>& a) {
  vec<bool, N> r;
  for (int i = 0; i < N; ++i) r.v_[i] = !a.v_[i];
  return r;
}

#define MSLEMU_VEC_ALIASES(T, name) \
  typedef vec<T, 2> name##2;        \
  typedef vec<T, 3> name##3;        \
  typedef vec<T, 4> name##4;
MSLEMU_VEC_ALIASES(float, float)
MSLEMU_VEC_ALIASES(half, half)
MSLEMU_VEC_ALIASES(bfloat, bfloat)
MSLEMU_VEC_ALIASES(int, int)
MSLEMU_VEC_ALIASES(uint, uint)
MSLEMU_VEC_ALIASES(short, short)
MSLEMU_VEC_ALIASES(ushort, ushort)
MSLEMU_VEC_ALIASES(char, char)
MSLEMU_VEC_ALIASES(uchar, uchar)
MSLEMU_VEC_ALIASES(bool, bool)
MSLEMU_VEC_ALIASES(long, long)
MSLEMU_VEC_ALIASES(ulong, ulong)
#undef MSLEMU_VEC_ALIASES
static_assert(sizeof(float3) == 16 && alignof(float3) == 16, "MSL float3 is 16 bytes");
static_assert(sizeof(half4) == 8 && sizeof(uint3) == 16, "MSL vector sizes");

// ---------------------------------------------------------------------------
// Runtime: fibers, schedules, threadgroup memory, sync points, messages
// ---------------------------------------------------------------------------
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

enum class Sched : int { forward = 0, reverse = 1, random = 2, eager = 3 };
enum class St : uint8_t { runnable, barrier, collective, done };

struct Site {
  const char* file = "";
  uint32_t line = 0;
  uint32_t col = 0;
  bool operator==(const Site& o) const {
    return line == o.line && col == o.col && std::strcmp(file, o.file) == 0;
  }
};
inline Site site_of(const std::source_location& l) { return Site{l.file_name(), l.line(), l.column()}; }

constexpr int kSimd = 32;         // Apple GPUs: 32 threads per SIMD-group
constexpr int kMaxValue = 32;     // bytes one lane may contribute to a collective
constexpr size_t kTgLimit = 32768;  // threadgroup memory per threadgroup

struct Snapshot {
  uint32_t mask = 0;
  int nbytes = 0;
  unsigned char vals[kSimd][kMaxValue];
};

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

struct ThreadCtx {
  uint dispatch_quadgroups_per_threadgroup, dispatch_simdgroups_per_threadgroup;
  uint3 dispatch_threads_per_threadgroup, grid_origin, grid_size;
  uint quadgroup_index_in_threadgroup, quadgroups_per_threadgroup;
  uint simdgroup_index_in_threadgroup, simdgroups_per_threadgroup;
  uint thread_execution_width, thread_index_in_quadgroup, thread_index_in_simdgroup;
  uint thread_index_in_threadgroup;
  uint3 thread_position_in_grid, thread_position_in_threadgroup, threadgroup_position_in_grid;
  uint3 threadgroups_per_grid, threads_per_grid;
  uint threads_per_simdgroup;
  uint3 threads_per_threadgroup;
};

struct LaunchCfg {
  uint32_t grid[3];
  uint32_t tg[3];  // already clamped to the grid (MLX: min(threadgroup, grid) per dimension)
  int32_t sched;
  int32_t workers;
  uint64_t seed;
  int32_t fiber_mode;
  int32_t stack_kb;
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

inline thread_local Runtime* g_rt = nullptr;

inline std::string where(const Site& s) {
  return std::string(s.file) + ":" + std::to_string(s.line);
}
inline void message(const char* kind, const std::string& text) {
  if (g_rt && g_rt->msgs) g_rt->msgs->add(std::string(kind) + "|" + text);
}
inline void warn(const std::string& text, const Site& s) { message("warning", text + " at " + where(s)); }

// --- threadgroup memory: one heap block per declaration, poisoned (0xFF = NaN) per threadgroup
template <class A> A* tg_array(const void* key) {
  Runtime& rt = *g_rt;
  TgBlock* blk = nullptr;
  for (auto& b : rt.blocks)
    if (b.key == key) blk = &b;
  if (!blk) {
    void* p = std::malloc(sizeof(A));  // exact size: ASan builds see overflows
    rt.blocks.push_back(TgBlock{key, p, sizeof(A), 0});
    blk = &rt.blocks.back();
  }
  if (blk->gen != rt.gen) {
    std::memset(blk->ptr, 0xFF, blk->size);
    blk->gen = rt.gen;
    rt.tg_bytes += blk->size;
    if (rt.tg_bytes > kTgLimit)
      message("error", "threadgroup memory " + std::to_string(rt.tg_bytes) + " bytes exceeds the 32 KiB limit");
  }
  return static_cast<A*>(blk->ptr);
}

// --- fibers
#if MSLEMU_ASM_SWITCH
inline void raw_switch(void** save, void* to, Fiber*) { mslemu_swap(save, to); }
#endif

[[noreturn]] inline void fiber_entry_();

inline void switch_to_fiber(Runtime& rt, Fiber& f) {
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

inline void yield_to_main(Runtime& rt, Fiber& f, bool dying) {
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

[[noreturn]] inline void fiber_entry_() {
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
extern "C" inline void mslemu_uc_entry_() { fiber_entry_(); }
#endif

inline void init_fiber(Runtime& rt, Fiber& f, int tid) {
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

struct PlainModeSync : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Block the calling GPU thread at a sync point until the scheduler releases it.
inline void block_(St st, const Site& site) {
  Runtime& rt = *g_rt;
  if (!rt.fiber_mode || !rt.cur)
    throw PlainModeSync("barrier or SIMD-group function reached in plain (fiber-less) mode at " + where(site));
  Fiber& f = *rt.cur;
  f.state = st;
  f.site = site;
  yield_to_main(rt, f, false);
}

inline int cur_tid_() { return g_rt->cur->tid; }

template <class T> const Snapshot& collect_(const T& v, const std::source_location& loc) {
  static_assert(sizeof(T) <= kMaxValue, "collective value too large for the emulator");
  Runtime& rt = *g_rt;
  if (!rt.fiber_mode || !rt.cur)
    throw PlainModeSync("SIMD-group function reached in plain (fiber-less) mode at " + where(site_of(loc)));
  Fiber& f = *rt.cur;
  std::memcpy(f.val, &v, sizeof(T));
  f.nbytes = int(sizeof(T));
  block_(St::collective, site_of(loc));
  return *f.snap;
}

// Resolve the collectives of SIMD-group `sg` whose live lanes are all blocked.
// Lanes waiting at the same call site form one active set.
inline bool resolve_sg_(Runtime& rt, int sg) {
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

inline void run_fiber_(Runtime& rt, int t) {
  Fiber& f = *rt.fibers[t];
  if (f.state == St::runnable) switch_to_fiber(rt, f);
}

inline void run_threadgroup_fibers_(Runtime& rt) {
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

template <class F> void call_body_(void* ctx, int tid) { (*static_cast<F*>(ctx))(tid); }

inline ThreadCtx make_ctx_(const Runtime& rt, int tid) {
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
template <class F> int launch(const LaunchCfg& cfg, F&& fn, char* msgbuf, int msgcap) {
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
        auto body = [&](int tid) { fn(make_ctx_(rt, tid)); };
        if (rt.fiber_mode) {
          rt.body = &call_body_<decltype(body)>;
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

template <class T> T poison_() {
  T r;
  std::memset(static_cast<void*>(&r), 0xFF, sizeof(T));
  return r;
}
template <class T> T lane_(const Snapshot& s, int lane) {
  T r;
  std::memcpy(static_cast<void*>(&r), s.vals[lane], sizeof(T));
  return r;
}
inline int my_lane_() { return cur_tid_() % kSimd; }

}  // namespace mslemu

// ---------------------------------------------------------------------------
// MSL address spaces and attributes (erased)
// ---------------------------------------------------------------------------
#define device
#define constant
#define thread
#define threadgroup
#define threadgroup_imageblock
#define ray_data
#define object_data
#define METAL_FUNC inline
#define METAL_CONST static constexpr constant
#define STEEL_CONST static constexpr constant
#define STEEL_PRAGMA_UNROLL _Pragma("GCC unroll 16")

// ---------------------------------------------------------------------------
// namespace metal: math, conversions, synchronisation, SIMD-group functions
// ---------------------------------------------------------------------------
namespace metal {

enum class mem_flags : int { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4, mem_threadgroup_imageblock = 8, mem_object_data = 16 };
constexpr mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(int(a) | int(b)); }
enum class thread_scope : int { thread_scope_thread, thread_scope_simdgroup, thread_scope_threadgroup, thread_scope_device };
enum memory_order { memory_order_relaxed = 0, memory_order_seq_cst = 5 };

template <class T> struct numeric_limits : std::numeric_limits<T> {};
template <> struct numeric_limits<half> {
  static constexpr bool is_specialized = true;
  static half max() { return half(65504.0f); }
  static half min() { return half(6.103515625e-05f); }
  static half lowest() { return half(-65504.0f); }
  static half epsilon() { return half(0.0009765625f); }
  static half infinity() { return half(__builtin_inff()); }
  static half quiet_NaN() { return half(__builtin_nanf("")); }
};
template <> struct numeric_limits<bfloat> {
  static constexpr bool is_specialized = true;
  static bfloat mk_(uint16_t b) { bfloat r; r.bits_ = b; return r; }
  static bfloat max() { return mk_(0x7F7F); }
  static bfloat min() { return mk_(0x0080); }
  static bfloat lowest() { return mk_(0xFF7F); }
  static bfloat epsilon() { return mk_(0x3C00); }
  static bfloat infinity() { return mk_(0x7F80); }
  static bfloat quiet_NaN() { return mk_(0x7FC0); }
};

template <class To, class From> To as_type(const From& f) {
  static_assert(sizeof(To) == sizeof(From), "as_type needs equal sizes");
  To t;
  std::memcpy(static_cast<void*>(&t), &f, sizeof(To));
  return t;
}

// Elementwise application over scalars and vectors.
template <class A, class F> auto map1_(const A& a, F f) {
  if constexpr (mslemu::is_vec_v<A>) {
    auto v = mslemu::as_vec(a);
    decltype(v) r;
    for (int i = 0; i < mslemu::vec_traits<decltype(v)>::n; ++i) r.v_[i] = f(v.v_[i]);
    return r;
  } else {
    return f(a);
  }
}
template <class A, class B, class F> auto map2_(const A& a, const B& b, F f) {
  if constexpr (mslemu::is_vec_v<A> || mslemu::is_vec_v<B>) {
    using V = mslemu::vec_of_t<A, B>;
    V r;
    for (int i = 0; i < mslemu::vec_traits<V>::n; ++i) r.v_[i] = f(mslemu::elem_(a, i), mslemu::elem_(b, i));
    return r;
  } else {
    return f(a, b);
  }
}
template <class A, class B, class C, class F> auto map3_(const A& a, const B& b, const C& c, F f) {
  if constexpr (mslemu::is_vec_v<A> || mslemu::is_vec_v<B> || mslemu::is_vec_v<C>) {
    using V = typename mslemu::vec_of3<A, B, C>::type;
    V r;
    for (int i = 0; i < mslemu::vec_traits<V>::n; ++i)
      r.v_[i] = f(mslemu::elem_(a, i), mslemu::elem_(b, i), mslemu::elem_(c, i));
    return r;
  } else {
    return f(a, b, c);
  }
}

// Float functions compute in float and round to the argument type (half/bfloat/float).
#define MSLEMU_F1(name, expr)                                                       \
  template <class A> auto name(const A& a) {                                        \
    return map1_(a, [](auto x) {                                                    \
      using T = decltype(x);                                                        \
      float v = float(x);                                                           \
      return T(expr);                                                               \
    });                                                                             \
  }
MSLEMU_F1(exp, std::exp(v))
MSLEMU_F1(exp2, std::exp2(v))
MSLEMU_F1(exp10, std::pow(10.0f, v))
MSLEMU_F1(log, std::log(v))
MSLEMU_F1(log2, std::log2(v))
MSLEMU_F1(log10, std::log10(v))
MSLEMU_F1(log1p, std::log1p(v))
MSLEMU_F1(sqrt, std::sqrt(v))
MSLEMU_F1(rsqrt, 1.0f / std::sqrt(v))
MSLEMU_F1(sin, std::sin(v))
MSLEMU_F1(cos, std::cos(v))
MSLEMU_F1(tan, std::tan(v))
MSLEMU_F1(asin, std::asin(v))
MSLEMU_F1(acos, std::acos(v))
MSLEMU_F1(atan, std::atan(v))
MSLEMU_F1(sinh, std::sinh(v))
MSLEMU_F1(cosh, std::cosh(v))
MSLEMU_F1(tanh, std::tanh(v))
MSLEMU_F1(asinh, std::asinh(v))
MSLEMU_F1(acosh, std::acosh(v))
MSLEMU_F1(atanh, std::atanh(v))
MSLEMU_F1(floor, std::floor(v))
MSLEMU_F1(ceil, std::ceil(v))
MSLEMU_F1(round, std::round(v))
MSLEMU_F1(rint, std::rint(v))
MSLEMU_F1(trunc, std::trunc(v))
MSLEMU_F1(fract, std::fmin(v - std::floor(v), 0x1.fffffep-1f))
MSLEMU_F1(fabs, std::fabs(v))
MSLEMU_F1(saturate, std::fmin(std::fmax(v, 0.0f), 1.0f))
MSLEMU_F1(sign, (v > 0.0f ? 1.0f : (v < 0.0f ? -1.0f : v)))
MSLEMU_F1(erf, std::erf(v))
#undef MSLEMU_F1

#define MSLEMU_F2(name, expr)                                                       \
  template <class A, class B> auto name(const A& a, const B& b) {                   \
    return map2_(a, b, [](auto x, auto y) {                                         \
      using T = decltype(x);                                                        \
      float u = float(x), v = float(y);                                             \
      return T(expr);                                                               \
    });                                                                             \
  }
MSLEMU_F2(pow, std::pow(u, v))
MSLEMU_F2(powr, std::pow(u, v))
MSLEMU_F2(atan2, std::atan2(u, v))
MSLEMU_F2(fmod, std::fmod(u, v))
MSLEMU_F2(fmin, std::fmin(u, v))
MSLEMU_F2(fmax, std::fmax(u, v))
MSLEMU_F2(copysign, std::copysign(u, v))
MSLEMU_F2(step, (v < u ? 0.0f : 1.0f))
MSLEMU_F2(divide, u / v)
#undef MSLEMU_F2

// abs/min/max/clamp also take integers.
template <class A> auto abs(const A& a) {
  return map1_(a, [](auto x) {
    using T = decltype(x);
    if constexpr (std::is_unsigned_v<T> || std::is_same_v<T, bool>) return x;
    else return T(x < T(0) ? T(-x) : x);
  });
}
template <class A, class B> auto min(const A& a, const B& b) {
  return map2_(a, b, [](auto x, auto y) {
    using T = decltype(x);
    if constexpr (std::is_floating_point_v<T> || std::is_same_v<T, half> || std::is_same_v<T, bfloat>)
      return T(std::fmin(float(x), float(y)));
    else return T(y < x ? y : x);
  });
}
template <class A, class B> auto max(const A& a, const B& b) {
  return map2_(a, b, [](auto x, auto y) {
    using T = decltype(x);
    if constexpr (std::is_floating_point_v<T> || std::is_same_v<T, half> || std::is_same_v<T, bfloat>)
      return T(std::fmax(float(x), float(y)));
    else return T(x < y ? y : x);
  });
}
template <class A, class B, class C> auto clamp(const A& x, const B& lo, const C& hi) { return min(max(x, lo), hi); }
template <class A, class B, class C> auto fma(const A& a, const B& b, const C& c) {
  return map3_(a, b, c, [](auto x, auto y, auto z) {
    using T = decltype(x);
    return T(std::fma(float(x), float(y), float(z)));
  });
}
template <class A, class B, class C> auto mix(const A& a, const B& b, const C& t) {
  return map3_(a, b, t, [](auto x, auto y, auto z) {
    using T = decltype(x);
    return T(float(x) + (float(y) - float(x)) * float(z));
  });
}
template <class A, class B, class C> auto smoothstep(const A& e0, const B& e1, const C& x) {
  return map3_(e0, e1, x, [](auto a, auto b, auto v) {
    using T = decltype(v);
    float t = std::fmin(std::fmax((float(v) - float(a)) / (float(b) - float(a)), 0.0f), 1.0f);
    return T(t * t * (3.0f - 2.0f * t));
  });
}
template <class A, class B, class C> auto select(const A& a, const B& b, const C& c) {
  if constexpr (mslemu::is_vec_v<C>) {
    using V = mslemu::vec_of_t<A, B>;
    V r;
    auto cv = mslemu::as_vec(c);
    for (int i = 0; i < mslemu::vec_traits<V>::n; ++i) r.v_[i] = cv.v_[i] ? mslemu::elem_(b, i) : mslemu::elem_(a, i);
    return r;
  } else {
    return c ? b : a;
  }
}
template <class A> auto isnan(const A& a) { return map1_(a, [](auto x) { return bool(std::isnan(float(x))); }); }
template <class A> auto isinf(const A& a) { return map1_(a, [](auto x) { return bool(std::isinf(float(x))); }); }
template <class A> auto isfinite(const A& a) { return map1_(a, [](auto x) { return bool(std::isfinite(float(x))); }); }
template <class A> auto signbit(const A& a) { return map1_(a, [](auto x) { return bool(std::signbit(float(x))); }); }
template <class T, int N> bool all(const vec<T, N>& v) {
  for (int i = 0; i < N; ++i)
    if (!v.v_[i]) return false;
  return true;
}
template <class T, int N> bool any(const vec<T, N>& v) {
  for (int i = 0; i < N; ++i)
    if (v.v_[i]) return true;
  return false;
}
inline bool all(bool b) { return b; }
inline bool any(bool b) { return b; }
template <class T, int N> T dot(const vec<T, N>& a, const vec<T, N>& b) {
  float s = 0.0f;
  for (int i = 0; i < N; ++i) s += float(a.v_[i]) * float(b.v_[i]);
  return T(s);
}
template <class T, int N> T length(const vec<T, N>& a) { return T(std::sqrt(float(dot(a, a)))); }
template <class T, int N> vec<T, N> normalize(const vec<T, N>& a) { return a * T(1.0f / float(length(a))); }
template <class T> vec<T, 3> cross(const vec<T, 3>& a, const vec<T, 3>& b) {
  return vec<T, 3>(a.y * b.z - a.z * b.y, a.z * b.x - a.x * b.z, a.x * b.y - a.y * b.x);
}
template <class T> T popcount(T x) { return T(__builtin_popcountll((unsigned long long)x)); }
template <class T> T clz(T x) { return x == 0 ? T(sizeof(T) * 8) : T(__builtin_clzll((unsigned long long)x) - (64 - sizeof(T) * 8)); }
template <class T> T ctz(T x) { return x == 0 ? T(sizeof(T) * 8) : T(__builtin_ctzll((unsigned long long)x)); }
template <class T> T mulhi(T a, T b) {
  return T((static_cast<__int128>(a) * static_cast<__int128>(b)) >> (sizeof(T) * 8));
}

namespace fast { using metal::exp; using metal::exp2; using metal::log; using metal::log2; using metal::sqrt;
  using metal::rsqrt; using metal::sin; using metal::cos; using metal::tanh; using metal::pow; using metal::powr;
  using metal::divide; using metal::max; using metal::min; using metal::fmax; using metal::fmin; using metal::abs;
  using metal::fabs; using metal::clamp; using metal::floor; using metal::ceil; using metal::tan; using metal::atan;
  using metal::atan2; using metal::fma; using metal::log10; using metal::exp10; using metal::saturate; }
namespace precise { using namespace metal::fast; }

// --- synchronisation
inline void threadgroup_barrier(mem_flags, std::source_location loc = std::source_location::current()) {
  mslemu::block_(mslemu::St::barrier, mslemu::site_of(loc));
}
inline void simdgroup_barrier(mem_flags, std::source_location loc = std::source_location::current()) {
  (void)mslemu::collect_(char(0), loc);
}
inline void atomic_thread_fence(mem_flags, memory_order, thread_scope = thread_scope::thread_scope_device) {}

// --- SIMD-group reductions, scans, shuffles and votes (32 lanes; active set = lanes at the same call site)
#define MSLEMU_SIMD_REDUCE(name, init, combine)                                                  \
  template <class T> T name(T x, std::source_location loc = std::source_location::current()) {   \
    const auto& s = mslemu::collect_(x, loc);                                                    \
    bool first = true;                                                                           \
    T r = x;                                                                                     \
    for (int l = 0; l < mslemu::kSimd; ++l) {                                                    \
      if (!(s.mask >> l & 1)) continue;                                                          \
      T v = mslemu::lane_<T>(s, l);                                                              \
      if (first) { r = v; first = false; } else { r = T(combine); }                              \
    }                                                                                            \
    return r;                                                                                    \
  }
MSLEMU_SIMD_REDUCE(simd_sum, 0, r + v)
MSLEMU_SIMD_REDUCE(simd_product, 1, r * v)
MSLEMU_SIMD_REDUCE(simd_min, 0, metal::min(r, v))
MSLEMU_SIMD_REDUCE(simd_max, 0, metal::max(r, v))
MSLEMU_SIMD_REDUCE(simd_and, 0, r & v)
MSLEMU_SIMD_REDUCE(simd_or, 0, r | v)
MSLEMU_SIMD_REDUCE(simd_xor, 0, r ^ v)
#undef MSLEMU_SIMD_REDUCE

#define MSLEMU_SIMD_SCAN(name, inclusive, combine, identity)                                      \
  template <class T> T name(T x, std::source_location loc = std::source_location::current()) {    \
    const auto& s = mslemu::collect_(x, loc);                                                     \
    const int me = mslemu::my_lane_();                                                            \
    T r = T(identity);                                                                            \
    for (int l = 0; l < (inclusive ? me + 1 : me); ++l)                                           \
      if (s.mask >> l & 1) { T v = mslemu::lane_<T>(s, l); r = T(combine); }                      \
    return r;                                                                                     \
  }
MSLEMU_SIMD_SCAN(simd_prefix_inclusive_sum, true, r + v, 0)
MSLEMU_SIMD_SCAN(simd_prefix_exclusive_sum, false, r + v, 0)
MSLEMU_SIMD_SCAN(simd_prefix_inclusive_product, true, r * v, 1)
MSLEMU_SIMD_SCAN(simd_prefix_exclusive_product, false, r * v, 1)
#undef MSLEMU_SIMD_SCAN

template <class T> T shuffle_from_(const mslemu::Snapshot& s, int src, const T& own, const char* fn,
                                   const std::source_location& loc) {
  if (src < 0 || src >= mslemu::kSimd || !(s.mask >> src & 1)) {
    mslemu::warn(std::string(fn) + " reads a lane that is missing or not active (result undefined)",
                 mslemu::site_of(loc));
    (void)own;
    return mslemu::poison_<T>();
  }
  return mslemu::lane_<T>(s, src);
}
template <class T> T simd_shuffle(T x, ushort lane, std::source_location loc = std::source_location::current()) {
  const auto& s = mslemu::collect_(x, loc);
  return shuffle_from_(s, int(lane), x, "simd_shuffle", loc);
}
template <class T> T simd_broadcast(T x, ushort lane, std::source_location loc = std::source_location::current()) {
  const auto& s = mslemu::collect_(x, loc);
  return shuffle_from_(s, int(lane), x, "simd_broadcast", loc);
}
template <class T> T simd_shuffle_xor(T x, ushort mask, std::source_location loc = std::source_location::current()) {
  const auto& s = mslemu::collect_(x, loc);
  return shuffle_from_(s, mslemu::my_lane_() ^ int(mask), x, "simd_shuffle_xor", loc);
}
template <class T> T simd_shuffle_up(T x, ushort delta, std::source_location loc = std::source_location::current()) {
  const auto& s = mslemu::collect_(x, loc);
  int src = mslemu::my_lane_() - int(delta);
  if (src < 0) return x;  // the lower `delta` lanes keep their value
  return shuffle_from_(s, src, x, "simd_shuffle_up", loc);
}
template <class T> T simd_shuffle_down(T x, ushort delta, std::source_location loc = std::source_location::current()) {
  const auto& s = mslemu::collect_(x, loc);
  int src = mslemu::my_lane_() + int(delta);
  if (src >= mslemu::kSimd) return x;  // the upper `delta` lanes keep their value
  return shuffle_from_(s, src, x, "simd_shuffle_down", loc);
}
template <class T> T simd_shuffle_rotate_down(T x, ushort delta, std::source_location loc = std::source_location::current()) {
  const auto& s = mslemu::collect_(x, loc);
  return shuffle_from_(s, (mslemu::my_lane_() + int(delta)) % mslemu::kSimd, x, "simd_shuffle_rotate_down", loc);
}
template <class T> T simd_shuffle_rotate_up(T x, ushort delta, std::source_location loc = std::source_location::current()) {
  const auto& s = mslemu::collect_(x, loc);
  return shuffle_from_(s, ((mslemu::my_lane_() - int(delta)) % mslemu::kSimd + mslemu::kSimd) % mslemu::kSimd, x,
                       "simd_shuffle_rotate_up", loc);
}
template <class T> T simd_broadcast_first(T x, std::source_location loc = std::source_location::current()) {
  const auto& s = mslemu::collect_(x, loc);
  return mslemu::lane_<T>(s, __builtin_ctz(s.mask));
}
inline bool simd_is_first(std::source_location loc = std::source_location::current()) {
  const auto& s = mslemu::collect_(char(1), loc);
  return mslemu::my_lane_() == __builtin_ctz(s.mask);
}
inline bool simd_all(bool b, std::source_location loc = std::source_location::current()) {
  const auto& s = mslemu::collect_(b, loc);
  for (int l = 0; l < mslemu::kSimd; ++l)
    if ((s.mask >> l & 1) && !mslemu::lane_<bool>(s, l)) return false;
  return true;
}
inline bool simd_any(bool b, std::source_location loc = std::source_location::current()) {
  const auto& s = mslemu::collect_(b, loc);
  for (int l = 0; l < mslemu::kSimd; ++l)
    if ((s.mask >> l & 1) && mslemu::lane_<bool>(s, l)) return true;
  return false;
}
struct simd_vote {
  uint64_t v;
  explicit operator uint64_t() const { return v; }
  bool all() const { return false; }
  bool any() const { return v != 0; }
};
inline simd_vote simd_ballot(bool b, std::source_location loc = std::source_location::current()) {
  const auto& s = mslemu::collect_(b, loc);
  uint64_t r = 0;
  for (int l = 0; l < mslemu::kSimd; ++l)
    if ((s.mask >> l & 1) && mslemu::lane_<bool>(s, l)) r |= uint64_t(1) << l;
  return simd_vote{r};
}

// quad-group functions: lanes 4q..4q+3 of the SIMD-group
template <class T> T quad_shuffle(T x, ushort ql, std::source_location loc = std::source_location::current()) {
  const auto& s = mslemu::collect_(x, loc);
  return shuffle_from_(s, (mslemu::my_lane_() & ~3) + int(ql), x, "quad_shuffle", loc);
}
template <class T> T quad_broadcast(T x, ushort ql, std::source_location loc = std::source_location::current()) {
  return quad_shuffle(x, ql, loc);
}
template <class T> T quad_shuffle_xor(T x, ushort m, std::source_location loc = std::source_location::current()) {
  const auto& s = mslemu::collect_(x, loc);
  const int me = mslemu::my_lane_();
  return shuffle_from_(s, (me & ~3) + ((me & 3) ^ int(m & 3)), x, "quad_shuffle_xor", loc);
}
template <class T> T quad_shuffle_down(T x, ushort d, std::source_location loc = std::source_location::current()) {
  const auto& s = mslemu::collect_(x, loc);
  const int me = mslemu::my_lane_();
  if ((me & 3) + int(d) > 3) return x;
  return shuffle_from_(s, me + int(d), x, "quad_shuffle_down", loc);
}
template <class T> T quad_shuffle_up(T x, ushort d, std::source_location loc = std::source_location::current()) {
  const auto& s = mslemu::collect_(x, loc);
  const int me = mslemu::my_lane_();
  if ((me & 3) - int(d) < 0) return x;
  return shuffle_from_(s, me - int(d), x, "quad_shuffle_up", loc);
}
#define MSLEMU_QUAD_REDUCE(name, combine)                                                        \
  template <class T> T name(T x, std::source_location loc = std::source_location::current()) {   \
    const auto& s = mslemu::collect_(x, loc);                                                    \
    const int q = mslemu::my_lane_() & ~3;                                                       \
    bool first = true;                                                                           \
    T r = x;                                                                                     \
    for (int l = q; l < q + 4; ++l) {                                                            \
      if (!(s.mask >> l & 1)) continue;                                                          \
      T v = mslemu::lane_<T>(s, l);                                                              \
      if (first) { r = v; first = false; } else { r = T(combine); }                              \
    }                                                                                            \
    return r;                                                                                    \
  }
MSLEMU_QUAD_REDUCE(quad_sum, r + v)
MSLEMU_QUAD_REDUCE(quad_min, metal::min(r, v))
MSLEMU_QUAD_REDUCE(quad_max, metal::max(r, v))
#undef MSLEMU_QUAD_REDUCE

// --- atomics (device and threadgroup); std::atomic_ref makes them real across worker threads
template <class T> struct atomic {
  T v_;
};
typedef atomic<int> atomic_int;
typedef atomic<uint> atomic_uint;
typedef atomic<float> atomic_float;
template <class T> T atomic_load_explicit(const atomic<T>* a, memory_order) {
  return std::atomic_ref<T>(const_cast<T&>(a->v_)).load();
}
template <class T, class U> void atomic_store_explicit(atomic<T>* a, U v, memory_order) {
  std::atomic_ref<T>(a->v_).store(T(v));
}
template <class T, class U> T atomic_exchange_explicit(atomic<T>* a, U v, memory_order) {
  return std::atomic_ref<T>(a->v_).exchange(T(v));
}
template <class T, class U> T atomic_fetch_add_explicit(atomic<T>* a, U v, memory_order) {
  return std::atomic_ref<T>(a->v_).fetch_add(T(v));
}
template <class T, class U> T atomic_fetch_sub_explicit(atomic<T>* a, U v, memory_order) {
  return std::atomic_ref<T>(a->v_).fetch_sub(T(v));
}
template <class T, class U> T atomic_fetch_and_explicit(atomic<T>* a, U v, memory_order) {
  return std::atomic_ref<T>(a->v_).fetch_and(T(v));
}
template <class T, class U> T atomic_fetch_or_explicit(atomic<T>* a, U v, memory_order) {
  return std::atomic_ref<T>(a->v_).fetch_or(T(v));
}
template <class T, class U> T atomic_fetch_xor_explicit(atomic<T>* a, U v, memory_order) {
  return std::atomic_ref<T>(a->v_).fetch_xor(T(v));
}
template <class T, class U> T atomic_fetch_min_explicit(atomic<T>* a, U v, memory_order) {
  std::atomic_ref<T> r(a->v_);
  T old = r.load();
  while (T(v) < old && !r.compare_exchange_weak(old, T(v))) {}
  return old;
}
template <class T, class U> T atomic_fetch_max_explicit(atomic<T>* a, U v, memory_order) {
  std::atomic_ref<T> r(a->v_);
  T old = r.load();
  while (old < T(v) && !r.compare_exchange_weak(old, T(v))) {}
  return old;
}
template <class T, class U> bool atomic_compare_exchange_weak_explicit(atomic<T>* a, T* expected, U desired,
                                                                       memory_order, memory_order) {
  return std::atomic_ref<T>(a->v_).compare_exchange_strong(*expected, T(desired));
}

}  // namespace metal

using namespace metal;
