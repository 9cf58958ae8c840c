// mslemu.h - a small Metal Shading Language shim for running MLX
// `mx.fast.metal_kernel` bodies on the CPU (the project's test tooling; see
// kernels/README.md).
//
// One translation unit = this header + mlx_prelude.h + the source MLX generates
// for one call (header, signature, body) + a launcher written by ../driver.py.
// The runtime behind it (mslemu_rt.cpp) runs every GPU thread of a threadgroup
// on the CPU: as a plain call when the kernel has no barriers or SIMD-group
// functions, otherwise as a cooperative fiber that yields at each barrier /
// collective, under a chosen legal schedule.
#pragma once

#include <cfloat>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <source_location>
#include <atomic>
#include <string>
#include <type_traits>



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
// Runtime interface (implemented once in mslemu_rt.cpp: fibers, schedules,
// threadgroup memory, sync points, messages)
// ---------------------------------------------------------------------------
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

constexpr int kSimd = 32;           // Apple GPUs: 32 threads per SIMD-group
constexpr int kMaxValue = 32;       // bytes one lane may contribute to a collective
constexpr size_t kTgLimit = 32768;  // threadgroup memory per threadgroup

// The values the lanes of one active set contributed to a collective.
struct Snapshot {
  uint32_t mask = 0;
  int nbytes = 0;
  unsigned char vals[kSimd][kMaxValue];
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

using ThreadFn = void (*)(void* ctx, const ThreadCtx& c);

// Storage of one `threadgroup` declaration for the current threadgroup (poisoned with 0xFF bytes).
void* tg_block(const void* key, size_t size);
// Block the calling GPU thread at a threadgroup barrier until the scheduler releases it.
void barrier_wait(const Site& site);
// Contribute `nbytes` to a SIMD-group collective at `site`; returns once the active set is resolved.
const Snapshot& collect_bytes(const void* value, int nbytes, const Site& site);
// Lane of the calling GPU thread in its SIMD-group.
int lane_id();
void warn(const char* text, const Site& site);
// Run the grid; returns the number of errors; messages ("kind|text|count" lines) go to msgbuf.
int launch_raw(const LaunchCfg& cfg, ThreadFn fn, void* ctx, char* msgbuf, int msgcap);

template <class A> A* tg_array(const void* key) { return static_cast<A*>(tg_block(key, sizeof(A))); }

template <class T> const Snapshot& collect_(const T& v, const std::source_location& loc) {
  static_assert(sizeof(T) <= kMaxValue, "collective value too large for the emulator");
  return collect_bytes(&v, int(sizeof(T)), site_of(loc));
}
inline int my_lane_() { return lane_id(); }

template <class F> int launch(const LaunchCfg& cfg, F&& fn, char* msgbuf, int msgcap) {
  using FF = std::remove_reference_t<F>;
  return launch_raw(cfg, [](void* c, const ThreadCtx& t) { (*static_cast<FF*>(c))(t); },
                    const_cast<void*>(static_cast<const void*>(&fn)), msgbuf, msgcap);
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
  mslemu::barrier_wait(mslemu::site_of(loc));
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
    mslemu::warn((std::string(fn) + " reads a lane that is missing or not active (result undefined)").c_str(),
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
