// mlx_prelude.h - the part of the prelude MLX prepends to every custom Metal
// kernel (its metal utils header) that kernel bodies commonly use, written for
// the emulator. MLX's real header does not compile as C++ (it relies on Metal
// compiler builtins); anything a body needs beyond this subset must be added here.
#pragma once

typedef half float16_t;
typedef bfloat bfloat16_t;

// Limits<T>: max/min (infinities for floating types) and finite_max/finite_min.
template <typename U> struct Limits;
#define MSLEMU_INT_LIMITS(T)                                        \
  template <> struct Limits<T> {                                    \
    static constexpr T max = std::numeric_limits<T>::max();         \
    static constexpr T min = std::numeric_limits<T>::min();         \
    static constexpr T finite_max = std::numeric_limits<T>::max();  \
    static constexpr T finite_min = std::numeric_limits<T>::min();  \
  };
MSLEMU_INT_LIMITS(uint8_t)
MSLEMU_INT_LIMITS(uint16_t)
MSLEMU_INT_LIMITS(uint32_t)
MSLEMU_INT_LIMITS(uint64_t)
MSLEMU_INT_LIMITS(int8_t)
MSLEMU_INT_LIMITS(int16_t)
MSLEMU_INT_LIMITS(int32_t)
MSLEMU_INT_LIMITS(int64_t)
#undef MSLEMU_INT_LIMITS
template <> struct Limits<bool> {
  static constexpr bool max = true;
  static constexpr bool min = false;
};
template <> struct Limits<float> {
  static constexpr float max = __builtin_inff();
  static constexpr float min = -__builtin_inff();
  static constexpr float finite_max = FLT_MAX;
  static constexpr float finite_min = -FLT_MAX;
};
template <> struct Limits<half> {
  static inline const half max = half(__builtin_inff());
  static inline const half min = half(-__builtin_inff());
  static inline const half finite_max = half(65504.0f);
  static inline const half finite_min = half(-65504.0f);
};
template <> struct Limits<bfloat> {
  static inline const bfloat max = bfloat(__builtin_inff());
  static inline const bfloat min = bfloat(-__builtin_inff());
  static inline const bfloat finite_max = metal::numeric_limits<bfloat>::max();
  static inline const bfloat finite_min = metal::numeric_limits<bfloat>::lowest();
};

// Linear index -> memory offset for a strided array (ensure_row_contiguous=False).
template <typename IdxT = int64_t>
inline IdxT elem_to_loc(IdxT elem, const int* shape, const int64_t* strides, int ndim) {
  IdxT loc = 0;
  for (int i = ndim - 1; i >= 0 && elem > 0; --i) {
    loc += IdxT(elem % IdxT(shape[i])) * IdxT(strides[i]);
    elem /= IdxT(shape[i]);
  }
  return loc;
}
inline int64_t elem_to_loc(uint elem, const int* shape, const int64_t* strides, int ndim) {
  return elem_to_loc<int64_t>(int64_t(elem), shape, strides, ndim);
}
template <typename IdxT = int64_t>
inline IdxT elem_to_loc(uint3 elem, const int* shape, const int64_t* strides, int ndim) {
  IdxT loc = IdxT(elem.x) * IdxT(strides[ndim - 1]) + IdxT(elem.y) * IdxT(strides[ndim - 2]);
  for (int d = ndim - 3; d >= 0; --d) {
    loc += IdxT(elem.z % uint(shape[d])) * IdxT(strides[d]);
    elem.z /= uint(shape[d]);
  }
  return loc;
}

template <typename T, typename U> inline constexpr T ceildiv(T n, U m) { return (n + T(m) - 1) / T(m); }
