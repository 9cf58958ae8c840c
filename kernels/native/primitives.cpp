// The native CPU kernels as nodes of MLX's graph: one mlx::core::Primitive per kernel.
//
// Building an operation only records a node (nothing is evaluated); MLX evaluates it on the
// CPU stream it was built on, where eval_cpu allocates the output (or takes over an input
// buffer MLX says no one else holds, as MLX's own element-wise operations do) and queues
// the C kernel (cpu_kernels: quantized_gemv.c, dequantize.c, bf16_gemm.c, gelu.c, depthwise.c) on that
// stream's thread. So the kernels compose with mx.compile, with streams and with the rest
// of the graph. Gradients, forward derivatives and vmap transform the plain-MLX formula of
// each kernel (Kernel::reference), not the C. The GPU has no body here: eval_gpu raises,
// and the Python side (kernels/primitives.py) builds these nodes only on CPU streams.
//
// Bound with nanobind in MLX's domain (NB_DOMAIN=mlx), so mx.array crosses in and out as
// the same Python type mlx.core uses.
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>

#include "mlx/allocator.h"
#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/backend/common/utils.h"
#include "mlx/fast.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"
#include "mlx/transforms.h"
#include "mlx/utils.h"
#include "mlx/version.h"

#include "cpu_kernels.h"

namespace nb = nanobind;
namespace mx = mlx::core;

namespace {

using Arrays = std::vector<mx::array>;
#define MOBILEO_STR2(x) #x
#define MOBILEO_STR(x) MOBILEO_STR2(x)
constexpr const char *BUILT_FOR_MLX =
    MOBILEO_STR(MLX_VERSION_MAJOR) "." MOBILEO_STR(MLX_VERSION_MINOR) "." MOBILEO_STR(MLX_VERSION_PATCH);

void require(bool ok, const std::string &message) {
  if (!ok) throw std::invalid_argument(message);
}

// The stream to build on: the given one, else the default one; it must be a CPU stream.
mx::Stream cpu_stream(const mx::StreamOrDevice &where, const char *op) {
  const mx::Stream stream = mx::to_stream(where);
  require(stream.device.type == mx::Device::DeviceType::cpu,
          std::string("mobileo ") + op + ": a native CPU kernel needs a CPU stream");
  return stream;
}

// Base of the four kernels: no GPU body; transformations through the plain-MLX formula.
class Kernel : public mx::Primitive {
 public:
  explicit Kernel(mx::Stream stream) : mx::Primitive(stream) {}

  // What the kernel computes, as MLX operations on this node's stream.
  virtual Arrays reference(const Arrays &inputs) = 0;

  void eval_gpu(const Arrays &, Arrays &) override {
    throw std::runtime_error(std::string(name()) + " has no GPU implementation (a CPU kernel)");
  }

  Arrays vjp(const Arrays &primals, const Arrays &cotangents, const std::vector<int> &argnums,
             const Arrays &) override {
    return mx::vjp(of_chosen(primals, argnums), chosen(primals, argnums), cotangents).second;
  }

  Arrays jvp(const Arrays &primals, const Arrays &tangents, const std::vector<int> &argnums) override {
    return mx::jvp(of_chosen(primals, argnums), chosen(primals, argnums), tangents).second;
  }

  std::pair<Arrays, std::vector<int>> vmap(const Arrays &inputs, const std::vector<int> &axes) override {
    Arrays outputs = mx::vmap([this](const Arrays &in) { return reference(in); }, axes)(inputs);
    return {outputs, std::vector<int>(outputs.size(), 0)};
  }

 protected:
  // The output in the buffer of the first candidate no one else holds (each row-contiguous and of
  // the output's size: the ops make them so; nullptr: not a candidate), else in fresh memory.
  static void take_over_or_allocate(mx::array &out, std::initializer_list<const mx::array *> candidates) {
    for (const auto *in : candidates) {
      if (in != nullptr && in->is_donatable()) {
        out.copy_shared_buffer(*in);
        return;
      }
    }
    out.set_data(mx::allocator::malloc(out.nbytes()));
  }

  mx::cpu::CommandEncoder &encoder(const Arrays &inputs, Arrays &outputs) {
    auto &enc = mx::cpu::get_command_encoder(stream());
    for (const auto &in : inputs) enc.set_input_array(in);
    for (auto &out : outputs) enc.set_output_array(out);
    return enc;
  }

 private:
  static Arrays chosen(const Arrays &primals, const std::vector<int> &argnums) {
    Arrays picked;
    for (int i : argnums) picked.push_back(primals[i]);
    return picked;
  }

  // reference() as a function of the inputs named by argnums, the others held fixed.
  std::function<Arrays(const Arrays &)> of_chosen(const Arrays &primals, const std::vector<int> &argnums) {
    return [this, primals, argnums](const Arrays &values) {
      Arrays all = primals;
      for (size_t i = 0; i < argnums.size(); i++) all[argnums[i]] = values[i];
      return reference(all);
    };
  }
};

// ------------------------------------------------------------ element-wise activations (GELU, SiLU)
// A float32 activation: its C kernel over the input's buffer, and its plain MLX formula (gelu.c and
// silu.c compute the CPU backend's MLX forms of them, bit for bit).
struct ActivationKind {
  const char *name;
  int (*kernel)(const float *x, float *out, long count);
  mx::array (*formula)(const mx::array &x, const mx::Stream &s);
};

mx::array activation(const ActivationKind &kind, const mx::array &x, const mx::Stream &stream);

class Activation : public Kernel {
 public:
  Activation(mx::Stream stream, const ActivationKind &kind) : Kernel(stream), kind_(kind) {}
  const char *name() const override { return kind_.name; }
  bool is_equivalent(const mx::Primitive &other) const override {
    return kind_.kernel == static_cast<const Activation &>(other).kind_.kernel;
  }
  std::vector<mx::Shape> output_shapes(const Arrays &inputs) override { return {inputs[0].shape()}; }

  Arrays reference(const Arrays &in) override { return {kind_.formula(in[0], stream())}; }

  // Element-wise: the vmapped axis just passes through the kernel.
  std::pair<Arrays, std::vector<int>> vmap(const Arrays &inputs, const std::vector<int> &axes) override {
    return {{activation(kind_, inputs[0], stream())}, axes};
  }

  void eval_cpu(const Arrays &inputs, Arrays &outputs) override {
    const auto &x = inputs[0];
    auto &out = outputs[0];
    // The input is row- or column-contiguous (mx::contiguous in the op); the output takes its layout.
    if (x.is_donatable())
      out.copy_shared_buffer(x);
    else
      out.set_data(mx::allocator::malloc(x.data_size() * sizeof(float)), x.data_size(), x.strides(), x.flags());
    auto &enc = encoder(inputs, outputs);
    enc.dispatch([kernel = kind_.kernel, source = x.data<float>(), result = out.data<float>(),
                  count = (long)x.data_size()]() { kernel(source, result, count); });
  }

 private:
  ActivationKind kind_;
};

mx::array activation(const ActivationKind &kind, const mx::array &x, const mx::Stream &stream) {
  return mx::array(x.shape(), mx::float32, std::make_shared<Activation>(stream, kind), {mx::contiguous(x, true, stream)});
}

// x * Phi(x), the exact GELU
mx::array gelu_formula(const mx::array &x, const mx::Stream &s) {
  const float sqrt_half = 0.70710678118654752f;
  auto phi = mx::multiply(mx::add(mx::erf(mx::multiply(x, mx::array(sqrt_half), s), s), mx::array(1.0f), s),
                          mx::array(0.5f), s);
  return mx::multiply(x, phi, s);
}

mx::array silu_formula(const mx::array &x, const mx::Stream &s) { return mx::multiply(x, mx::sigmoid(x, s), s); }

const ActivationKind GELU{"MobileoGelu", mobileo_gelu, gelu_formula};
const ActivationKind SILU{"MobileoSilu", mobileo_silu, silu_formula};

mx::array gelu(const mx::array &x, const mx::StreamOrDevice &where) {
  const auto stream = cpu_stream(where, "gelu");
  require(x.dtype() == mx::float32, "mobileo gelu: float32 only");
  return activation(GELU, x, stream);
}

mx::array silu(const mx::array &x, const mx::StreamOrDevice &where) {
  const auto stream = cpu_stream(where, "silu");
  require(x.dtype() == mx::float32, "mobileo silu: float32 only");
  return activation(SILU, x, stream);
}

// ------------------------------------------------------------------------------ depthwise conv
class DepthwiseConv2d : public Kernel {
 public:
  DepthwiseConv2d(mx::Stream stream, std::pair<int, int> stride, std::pair<int, int> padding)
      : Kernel(stream), stride_(stride), padding_(padding) {}
  const char *name() const override { return "MobileoDepthwiseConv2d"; }
  bool is_equivalent(const mx::Primitive &other) const override {
    const auto &o = static_cast<const DepthwiseConv2d &>(other);
    return stride_ == o.stride_ && padding_ == o.padding_;
  }

  std::vector<mx::Shape> output_shapes(const Arrays &inputs) override {
    const auto &x = inputs[0], &taps = inputs[1];
    return {{x.shape(0), out_size(x.shape(1), taps.shape(0), stride_.first, padding_.first),
             out_size(x.shape(2), taps.shape(1), stride_.second, padding_.second), x.shape(3)}};
  }

  static int out_size(int size, int kernel, int stride, int padding) {
    return (size + 2 * padding - kernel) / stride + 1;
  }

  // inputs: x [B, H, W, C], taps [kh, kw, C], bias [C] (optional)
  Arrays reference(const Arrays &in) override {
    const auto s = stream();
    const int channels = in[0].shape(3);
    auto weight = mx::expand_dims(mx::transpose(in[1], {2, 0, 1}, s), 3, s);  // [C, kh, kw, 1]
    auto y = mx::conv2d(in[0], weight, stride_, padding_, {1, 1}, channels, s);
    return {in.size() > 2 ? mx::add(y, in[2], s) : y};
  }

  void eval_cpu(const Arrays &inputs, Arrays &outputs) override {
    const auto &x = inputs[0], &taps = inputs[1];
    auto &out = outputs[0];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto &enc = encoder(inputs, outputs);
    enc.dispatch([image = x.data<float>(), weights = taps.data<float>(),
                  bias = inputs.size() > 2 ? inputs[2].data<float>() : nullptr, result = out.data<float>(),
                  batch = x.shape(0), height = x.shape(1), width = x.shape(2), channels = x.shape(3),
                  kh = taps.shape(0), kw = taps.shape(1), stride = stride_, padding = padding_,
                  out_h = out.shape(1), out_w = out.shape(2)]() {
      if (mobileo_depthwise_conv2d(image, batch, height, width, channels, weights, kh, kw, bias, stride.first,
                                   stride.second, padding.first, padding.second, result, out_h, out_w) != 0)
        throw std::runtime_error("MobileoDepthwiseConv2d: shape not taken by the kernel");
    });
  }

 private:
  std::pair<int, int> stride_, padding_;
};

mx::array depthwise_conv2d(const mx::array &x, const mx::array &weight, const std::optional<mx::array> &bias,
                           std::pair<int, int> stride, std::pair<int, int> padding, const mx::StreamOrDevice &where) {
  const auto stream = cpu_stream(where, "depthwise_conv2d");
  require(x.ndim() == 4 && weight.ndim() == 4 && weight.shape(3) == 1,
          "mobileo depthwise_conv2d: x [B, H, W, C] and weight [C, kh, kw, 1]");
  const int channels = x.shape(3);
  require(weight.shape(0) == channels, "mobileo depthwise_conv2d: one output channel per input channel");
  require(channels % 8 == 0, "mobileo depthwise_conv2d: channels must be a multiple of 8");
  require(x.dtype() == mx::float32 && weight.dtype() == mx::float32 && (!bias || bias->dtype() == mx::float32),
          "mobileo depthwise_conv2d: float32 only");
  require(!bias || (bias->ndim() == 1 && bias->shape(0) == channels), "mobileo depthwise_conv2d: bias [C]");
  require(stride.first >= 1 && stride.second >= 1 && padding.first >= 0 && padding.second >= 0,
          "mobileo depthwise_conv2d: stride >= 1 and padding >= 0");
  const int kh = weight.shape(1), kw = weight.shape(2);
  const int out_h = DepthwiseConv2d::out_size(x.shape(1), kh, stride.first, padding.first);
  const int out_w = DepthwiseConv2d::out_size(x.shape(2), kw, stride.second, padding.second);
  require(out_h >= 1 && out_w >= 1, "mobileo depthwise_conv2d: the kernel is larger than the padded input");
  // [C, kh, kw, 1] -> [kh, kw, C]: each tap a contiguous vector over the channels
  auto taps = mx::contiguous(mx::transpose(mx::reshape(weight, {channels, kh, kw}, stream), {1, 2, 0}, stream),
                             false, stream);
  Arrays inputs = {mx::contiguous(x, false, stream), taps};
  if (bias) inputs.push_back(mx::contiguous(*bias, false, stream));
  return mx::array({x.shape(0), out_h, out_w, channels}, mx::float32,
                   std::make_shared<DepthwiseConv2d>(stream, stride, padding), std::move(inputs));
}

// ------------------------------------------------------------------------------ quantized GEMV
class QuantizedGemv : public Kernel {
 public:
  QuantizedGemv(mx::Stream stream, int bits, int group_size) : Kernel(stream), bits_(bits), group_size_(group_size) {}
  const char *name() const override { return "MobileoQuantizedGemv"; }
  bool is_equivalent(const mx::Primitive &other) const override {
    const auto &o = static_cast<const QuantizedGemv &>(other);
    return bits_ == o.bits_ && group_size_ == o.group_size_;
  }
  std::vector<mx::Shape> output_shapes(const Arrays &inputs) override {
    return {{inputs[0].shape(0), inputs[1].shape(0)}};
  }

  // inputs: x [rows, K], packed [N, K * bits / 32], scales and biases [N, K / group_size]
  Arrays reference(const Arrays &in) override {
    return {mx::quantized_matmul(in[0], in[1], in[2], in[3], true, group_size_, bits_, "affine", stream())};
  }

  void eval_cpu(const Arrays &inputs, Arrays &outputs) override {
    const auto &x = inputs[0];
    auto &out = outputs[0];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto &enc = encoder(inputs, outputs);
    enc.dispatch([rows_x = x.data<float>(), packed = inputs[1].data<uint32_t>(), scales = inputs[2].data<float>(),
                  biases = inputs[3].data<float>(), result = out.data<float>(), rows = x.shape(0), k = x.shape(1),
                  n = out.shape(1), bits = bits_, group = group_size_]() {
      if (mobileo_quantized_gemv(rows_x, rows, k, packed, scales, biases, n, bits, group, result) != 0)
        throw std::runtime_error("MobileoQuantizedGemv: shape not taken by the kernel");
    });
  }

 private:
  int bits_, group_size_;
};

constexpr int GEMV_MAX_ROWS = 8;  // quantized_gemv.c keeps one accumulator per row in registers

mx::array quantized_gemv(const mx::array &x, const mx::array &packed, const mx::array &scales,
                         const mx::array &biases, int bits, int group_size, const mx::StreamOrDevice &where) {
  const auto stream = cpu_stream(where, "quantized_gemv");
  require(bits == 4 || bits == 8, "mobileo quantized_gemv: 4 or 8 bits");
  const int per_word = 32 / bits;
  require(group_size > 0 && group_size % (8 * per_word) == 0,
          "mobileo quantized_gemv: group_size must be a multiple of " + std::to_string(8 * per_word));
  require(x.ndim() >= 1 && packed.ndim() == 2, "mobileo quantized_gemv: x [..., K] and packed [N, K * bits / 32]");
  const int k = x.shape(-1), n = packed.shape(0);
  const size_t rows = k > 0 ? x.size() / k : 0;
  require(rows >= 1 && rows <= GEMV_MAX_ROWS, "mobileo quantized_gemv: 1 to 8 rows");
  require(k % group_size == 0 && packed.shape(1) * per_word == k, "mobileo quantized_gemv: K does not match the weights");
  require(x.dtype() == mx::float32 && packed.dtype() == mx::uint32 && scales.dtype() == mx::float32 &&
              biases.dtype() == mx::float32,
          "mobileo quantized_gemv: float32 x, scales and biases, uint32 packed weights");
  const mx::Shape groups = {n, k / group_size};
  require(scales.shape() == groups && biases.shape() == groups, "mobileo quantized_gemv: scales and biases [N, K / group_size]");
  auto rows_x = mx::contiguous(mx::reshape(x, {(int)rows, k}, stream), false, stream);
  auto product = mx::array({(int)rows, n}, mx::float32, std::make_shared<QuantizedGemv>(stream, bits, group_size),
                           {rows_x, mx::contiguous(packed, false, stream), mx::contiguous(scales, false, stream),
                            mx::contiguous(biases, false, stream)});
  auto shape = x.shape();
  shape.back() = n;
  return mx::reshape(product, shape, stream);
}

// ------------------------------------------------------------------------------ dequantize
class Dequantize : public Kernel {
 public:
  Dequantize(mx::Stream stream, int bits, int group_size) : Kernel(stream), bits_(bits), group_size_(group_size) {}
  const char *name() const override { return "MobileoDequantize"; }
  bool is_equivalent(const mx::Primitive &other) const override {
    const auto &o = static_cast<const Dequantize &>(other);
    return bits_ == o.bits_ && group_size_ == o.group_size_;
  }
  std::vector<mx::Shape> output_shapes(const Arrays &inputs) override {
    return {{inputs[0].shape(0), inputs[0].shape(1) * (32 / bits_)}};
  }

  // inputs: packed [N, K * bits / 32], scales and biases [N, K / group_size]
  Arrays reference(const Arrays &in) override {
    return {mx::dequantize(in[0], in[1], in[2], group_size_, bits_, "affine", std::nullopt, std::nullopt, stream())};
  }

  void eval_cpu(const Arrays &inputs, Arrays &outputs) override {
    auto &out = outputs[0];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto &enc = encoder(inputs, outputs);
    enc.dispatch([packed = inputs[0].data<uint32_t>(), scales = inputs[1].data<float>(),
                  biases = inputs[2].data<float>(), result = out.data<float>(), n = out.shape(0), k = out.shape(1),
                  bits = bits_, group = group_size_]() {
      if (mobileo_dequantize(packed, scales, biases, n, k, bits, group, result) != 0)
        throw std::runtime_error("MobileoDequantize: shape not taken by the kernel");
    });
  }

 private:
  int bits_, group_size_;
};

mx::array dequantize(const mx::array &packed, const mx::array &scales, const mx::array &biases, int bits,
                     int group_size, const mx::StreamOrDevice &where) {
  const auto stream = cpu_stream(where, "dequantize");
  require(bits == 4 || bits == 8, "mobileo dequantize: 4 or 8 bits");
  require(group_size > 0 && group_size % 8 == 0, "mobileo dequantize: group_size must be a multiple of 8");
  require(packed.ndim() == 2 && packed.dtype() == mx::uint32, "mobileo dequantize: packed [N, K * bits / 32] uint32");
  const int n = packed.shape(0), k = packed.shape(1) * (32 / bits);
  require(k % group_size == 0, "mobileo dequantize: K must be a multiple of group_size");
  const mx::Shape groups = {n, k / group_size};
  require(scales.dtype() == mx::float32 && biases.dtype() == mx::float32 && scales.shape() == groups &&
              biases.shape() == groups,
          "mobileo dequantize: float32 scales and biases [N, K / group_size]");
  return mx::array({n, k}, mx::float32, std::make_shared<Dequantize>(stream, bits, group_size),
                   {mx::contiguous(packed, false, stream), mx::contiguous(scales, false, stream),
                    mx::contiguous(biases, false, stream)});
}

// ------------------------------------------------------------------------------ bfloat16 GEMM
// How the GEMM reads an operand of `rows` x `cols` (an N-D one's leading axes merged into rows):
// in place when its rows are evenly spaced with unit element stride (a window of a larger
// array, as the DC-AE's window GEMMs slice, which mx::contiguous would copy), or when its
// columns are (a transposed view such as a Linear layer's W.T); else gathered row-major into a
// temporary when the kernel runs.
struct Operand {
  bool in_place, trans;
  int64_t ld;
};

Operand operand_layout(const mx::array &x, int64_t rows, int64_t cols) {
  const auto &shape = x.shape();
  const auto &strides = x.strides();
  bool evenly = cols == 1 || strides.back() == 1;
  int64_t row_stride = cols, outer = -1;  // outer: the stride the next non-unit leading axis must have
  for (int i = (int)x.ndim() - 2; i >= 0 && evenly; i--) {
    if (shape[i] == 1) continue;
    if (outer < 0)
      row_stride = strides[i];
    else
      evenly = strides[i] == outer;
    outer = strides[i] * shape[i];
  }
  if (evenly && (rows == 1 || row_stride >= cols)) return {true, false, rows == 1 ? cols : row_stride};
  if (x.ndim() == 2 && (shape[0] == 1 || strides[0] == 1) && (cols == 1 || strides[1] >= rows))
    return {true, true, cols == 1 ? rows : strides[1]};
  return {false, false, cols};
}

// x's elements in row-major order into dst (any strides).
void gather(const float *x, const mx::Shape &shape, const mx::Strides &strides, float *dst, size_t count) {
  const int ndim = (int)shape.size();
  std::vector<int> index(ndim, 0);
  int64_t offset = 0;
  for (size_t i = 0; i < count; i++) {
    dst[i] = x[offset];
    for (int d = ndim - 1; d >= 0; d--) {
      offset += strides[d];
      if (++index[d] < shape[d]) break;
      offset -= strides[d] * shape[d];
      index[d] = 0;
    }
  }
}

// v rounded to bfloat16 and back: what the bf16 GEMMs multiply (their plain-MLX formulas).
mx::array bf16_rounded(const mx::array &v, const mx::Stream &s) {
  return mx::astype(mx::astype(v, mx::bfloat16, s), mx::float32, s);
}

// Where the kernel reads an operand its layout does not let it read in place: a row-major
// temporary the encoder keeps alive until the kernel has run (nullptr when read in place).
float *staging(mx::cpu::CommandEncoder &enc, const mx::array &x, const Operand &layout) {
  if (layout.in_place) return nullptr;
  mx::array copy(mx::allocator::malloc(x.nbytes()), x.shape(), mx::float32);
  enc.add_temporary(copy);
  return copy.data<float>();
}

class Bf16Matmul : public Kernel {
 public:
  // bias_row: the third input is a row [N] added in the kernel's store, not a full [M, N] addend
  Bf16Matmul(mx::Stream stream, bool bias_row) : Kernel(stream), bias_row_(bias_row) {}
  const char *name() const override { return "MobileoBf16Matmul"; }
  bool is_equivalent(const mx::Primitive &other) const override {
    return bias_row_ == static_cast<const Bf16Matmul &>(other).bias_row_;
  }
  std::vector<mx::Shape> output_shapes(const Arrays &inputs) override {
    return {{(int)(inputs[0].size() / inputs[1].shape(0)), inputs[1].shape(1)}};
  }

  // inputs: a [..., K], b [K, N] (, c [M, N] or a bias row [N]); [c +] the products of the
  // bfloat16-rounded operands, summed in float32, as [M, N] (+ bias)
  Arrays reference(const Arrays &in) override {
    const auto s = stream();
    auto product = mx::matmul(mx::reshape(bf16_rounded(in[0], s), {-1, in[1].shape(0)}, s), bf16_rounded(in[1], s), s);
    if (in.size() < 3) return {product};
    return {bias_row_ ? mx::add(product, in[2], s) : mx::add(in[2], product, s)};
  }

  void eval_cpu(const Arrays &inputs, Arrays &outputs) override {
    const auto &a = inputs[0], &b = inputs[1];
    auto &out = outputs[0];
    const bool accumulate = inputs.size() > 2 && !bias_row_;
    const float *bias = inputs.size() > 2 && bias_row_ ? inputs[2].data<float>() : nullptr;
    take_over_or_allocate(out, {accumulate ? &inputs[2] : nullptr});  // c: row-contiguous [M, N]
    const int k = b.shape(0), n = b.shape(1), m = (int)(a.size() / k);
    const Operand left = operand_layout(a, m, k), right = operand_layout(b, k, n);
    auto &enc = encoder(inputs, outputs);
    enc.dispatch([a_data = a.data<float>(), a_shape = a.shape(), a_strides = a.strides(),
                  a_copy = staging(enc, a, left), b_data = b.data<float>(), b_shape = b.shape(),
                  b_strides = b.strides(), b_copy = staging(enc, b, right),
                  result = out.data<float>(), addend = accumulate ? inputs[2].data<float>() : nullptr, bias, m, n,
                  k, left, right]() {
      if (a_copy != nullptr) gather(a_data, a_shape, a_strides, a_copy, (size_t)m * k);
      if (b_copy != nullptr) gather(b_data, b_shape, b_strides, b_copy, (size_t)k * n);
      if (addend != nullptr && addend != result) std::memcpy(result, addend, (size_t)m * n * sizeof(float));
      if (mobileo_bf16_gemm(left.trans, right.trans, m, n, k, a_copy ? a_copy : a_data, (int)left.ld,
                            b_copy ? b_copy : b_data, (int)right.ld, addend != nullptr ? 1.0f : 0.0f, result, n,
                            bias) != 0)
        throw std::runtime_error("MobileoBf16Matmul: no AVX512-BF16 here, or out of memory");
    });
  }

 private:
  bool bias_row_;
};

mx::array bf16_matmul(const mx::array &a, const mx::array &b, const std::optional<mx::array> &c,
                      const mx::StreamOrDevice &where) {
  const auto stream = cpu_stream(where, "bf16_matmul");
  require(mobileo_bf16_gemm_supported(), "mobileo bf16_matmul: this CPU has no AVX512-BF16");
  require(a.dtype() == mx::float32 && b.dtype() == mx::float32 && (!c || c->dtype() == mx::float32),
          "mobileo bf16_matmul: float32 only");
  require(a.ndim() >= 1 && b.ndim() == 2 && a.shape(-1) == b.shape(0), "mobileo bf16_matmul: a [..., K] and b [K, N]");
  const int k = b.shape(0), n = b.shape(1);
  const int m = k > 0 ? (int)(a.size() / k) : 0;
  require(m >= 1 && n >= 1 && k >= 1, "mobileo bf16_matmul: empty product");
  auto shape = a.shape();
  shape.back() = n;
  // a and b as they are: the node reads them in place through their strides, or gathers them
  Arrays inputs = {a, b};
  // c that is one row repeated (a Linear layer's bias): added after the sums as the kernel stores
  // C, with no [M, N] copy of it and no pass over C before the product
  bool bias_row = false;
  if (c) {
    bias_row = c->ndim() >= 1 && c->ndim() <= shape.size() && c->shape(-1) == n && c->size() == (size_t)n;
    if (bias_row)
      inputs.push_back(mx::contiguous(mx::reshape(*c, {n}, stream), false, stream));
    else  // c broadcast to the product's shape, as one row-contiguous [M, N] block (no copy when it is one)
      inputs.push_back(
          mx::contiguous(mx::reshape(mx::broadcast_to(*c, shape, stream), {m, n}, stream), false, stream));
  }
  auto product = mx::array({m, n}, mx::float32, std::make_shared<Bf16Matmul>(stream, bias_row), std::move(inputs));
  return mx::reshape(product, shape, stream);
}

// ---------------------------------------------------------------- bfloat16 GEMM, 8-bit weights
// x @ W (+ bias) for W [K, N] = values * scales + biases in K-major 8-bit affine storage
// (backends/cpu/quantized.py's KMajorQuantizedLinear): the C dequantizes each B panel as it packs
// it, so no float32 W is ever made, and adds the bias row as it stores C.
// SANA's AdaLN modulation and gated residual as MLX operations: x [B, N, D], shift, scale and gate [B, D]
// (the plain formulas of the ModulatedLayerNorm and GatedResidual nodes, and of the 8-bit product's
// extras, which compute them in the GEMM).
mx::array modulated_layer_norm_formula(const mx::array &x, const mx::array &shift, const mx::array &scale, float eps,
                                       const mx::Stream &s) {
  auto normed = mx::fast::layer_norm(x, std::nullopt, std::nullopt, eps, s);
  return mx::add(mx::multiply(normed, mx::add(mx::array(1.0f), mx::expand_dims(scale, 1, s), s), s),
                 mx::expand_dims(shift, 1, s), s);
}

mx::array gated_residual_formula(const mx::array &x, const mx::array &gate, const mx::array &update,
                                 const mx::Stream &s) {
  return mx::add(x, mx::multiply(mx::expand_dims(gate, 1, s), update, s), s);
}

// shift, scale, gate broadcast to [B, 1, D] and passed as [B, D]
mx::array per_image(const mx::array &v, int batch, int dim, const mx::Stream &stream) {
  return mx::contiguous(mx::reshape(mx::broadcast_to(v, {batch, 1, dim}, stream), {batch, dim}, stream), false, stream);
}

// What the 8-bit product does besides x @ W + bias, each optional (bf16_gemm.c's extras): x's rows
// normalised first (SANA's modulated LayerNorm), the result added to a residual, gated or not.
struct Q8Extras {
  bool bias = false, norm = false, residual = false, gate = false;
  float eps = 0.0f;
  bool operator==(const Q8Extras &) const = default;
};

class Bf16MatmulQ8 : public Kernel {
 public:
  Bf16MatmulQ8(mx::Stream stream, int group_size, Q8Extras extras)
      : Kernel(stream), group_size_(group_size), extras_(extras) {}
  const char *name() const override { return "MobileoBf16MatmulQ8"; }
  bool is_equivalent(const mx::Primitive &other) const override {
    const auto &o = static_cast<const Bf16MatmulQ8 &>(other);
    return group_size_ == o.group_size_ && extras_ == o.extras_;
  }
  std::vector<mx::Shape> output_shapes(const Arrays &inputs) override {
    return {{(int)(inputs[0].size() / inputs[1].shape(0)), inputs[1].shape(1)}};
  }

  // inputs: x [M, K] (x [B, M / B, K] with a norm), values [K, N] uint8, scales and biases [K / group, N]
  // (, bias [N]) (, shift [B, K], scale [B, K]) (, residual [M, N]) (, gate [B, N]): [residual + [gate *]]
  // (the products of the bfloat16-rounded operands (x normalised), summed in float32, as [M, N] + bias)
  Arrays reference(const Arrays &in) override {
    const auto s = stream();
    const int k = in[1].shape(0), n = in[1].shape(1), groups = k / group_size_;
    size_t next = 4;
    const mx::array *bias = extras_.bias ? &in[next++] : nullptr;
    auto x = in[0];
    if (extras_.norm) {
      x = modulated_layer_norm_formula(x, in[next], in[next + 1], extras_.eps, s);
      next += 2;
    }
    auto grouped = mx::reshape(mx::astype(in[1], mx::float32, s), {groups, group_size_, n}, s);
    auto weight = mx::reshape(mx::add(mx::multiply(grouped, mx::expand_dims(in[2], 1, s), s),
                                      mx::expand_dims(in[3], 1, s), s),
                              {k, n}, s);
    auto product = mx::matmul(mx::reshape(bf16_rounded(x, s), {-1, k}, s), bf16_rounded(weight, s), s);
    if (bias != nullptr) product = mx::add(product, *bias, s);
    if (!extras_.residual) return {product};
    const auto &residual = in[next++];
    if (!extras_.gate) return {mx::add(residual, product, s)};
    const auto &gate = in[next];
    const int batch = gate.shape(0);
    auto update = mx::reshape(product, {batch, -1, n}, s);
    return {mx::reshape(gated_residual_formula(mx::reshape(residual, {batch, -1, n}, s), gate, update, s), {-1, n}, s)};
  }

  void eval_cpu(const Arrays &inputs, Arrays &outputs) override {
    const auto &a = inputs[0], &values = inputs[1];
    auto &out = outputs[0];
    size_t next = 4;
    const float *bias = extras_.bias ? inputs[next++].data<float>() : nullptr;
    mobileo_gemm_extras extras{};
    const int k = values.shape(0), n = values.shape(1), m = (int)(a.size() / k);
    if (extras_.norm) {
      extras.norm_shift = inputs[next].data<float>();
      extras.norm_scale = inputs[next + 1].data<float>();
      extras.norm_eps = extras_.eps;
      extras.norm_rows = m / inputs[next].shape(0);
      next += 2;
    }
    const mx::array *residual = extras_.residual ? &inputs[next++] : nullptr;
    if (residual != nullptr) {
      extras.residual = residual->data<float>();
      if (extras_.gate) {
        extras.gate = inputs[next].data<float>();
        extras.gate_rows = m / inputs[next].shape(0);
      }
    }
    // The residual's buffer, when no one else holds it: each value is read just before it is written.
    take_over_or_allocate(out, {residual});
    const Operand left = operand_layout(a, m, k);
    auto &enc = encoder(inputs, outputs);
    enc.dispatch([a_data = a.data<float>(), a_shape = a.shape(), a_strides = a.strides(), a_copy = staging(enc, a, left),
                  weights = values.data<uint8_t>(), scales = inputs[2].data<float>(), biases = inputs[3].data<float>(),
                  bias, result = out.data<float>(), m, n, k, group = group_size_, left, extras]() {
      if (a_copy != nullptr) gather(a_data, a_shape, a_strides, a_copy, (size_t)m * k);
      if (mobileo_bf16_gemm_q8(left.trans, m, n, k, a_copy ? a_copy : a_data, (int)left.ld, weights, scales, biases,
                               group, bias, result, n, &extras) != 0)
        throw std::runtime_error("MobileoBf16MatmulQ8: no AVX512-BF16 here, or out of memory");
    });
  }

 private:
  int group_size_;
  Q8Extras extras_;
};

mx::array bf16_matmul_q8(const mx::array &x, const mx::array &values, const mx::array &scales,
                         const mx::array &biases, int group_size, const std::optional<mx::array> &bias,
                         const std::optional<mx::array> &norm_shift, const std::optional<mx::array> &norm_scale,
                         float norm_eps, const std::optional<mx::array> &residual,
                         const std::optional<mx::array> &gate, const mx::StreamOrDevice &where) {
  const auto stream = cpu_stream(where, "bf16_matmul_q8");
  require(mobileo_bf16_gemm_supported(), "mobileo bf16_matmul_q8: this CPU has no AVX512-BF16");
  const auto is_float32 = [](const std::optional<mx::array> &v) { return !v || v->dtype() == mx::float32; };
  require(x.dtype() == mx::float32 && values.dtype() == mx::uint8 && scales.dtype() == mx::float32 &&
              biases.dtype() == mx::float32 && is_float32(bias) && is_float32(norm_shift) &&
              is_float32(norm_scale) && is_float32(residual) && is_float32(gate),
          "mobileo bf16_matmul_q8: float32 x, scales, biases and extras, uint8 values");
  require(x.ndim() >= 1 && values.ndim() == 2 && x.shape(-1) == values.shape(0),
          "mobileo bf16_matmul_q8: x [..., K] and values [K, N]");
  const int k = values.shape(0), n = values.shape(1);
  const int m = k > 0 ? (int)(x.size() / k) : 0;
  require(m >= 1 && n >= 1 && k >= 1, "mobileo bf16_matmul_q8: empty product");
  require(group_size >= 1 && k % group_size == 0, "mobileo bf16_matmul_q8: group_size must divide K");
  const mx::Shape groups = {k / group_size, n};
  require(scales.shape() == groups && biases.shape() == groups,
          "mobileo bf16_matmul_q8: scales and biases [K / group_size, N]");
  require(!bias || (bias->ndim() == 1 && bias->shape(0) == n), "mobileo bf16_matmul_q8: bias [N]");
  require(norm_shift.has_value() == norm_scale.has_value(), "mobileo bf16_matmul_q8: norm_shift and norm_scale together");
  require(!gate || residual, "mobileo bf16_matmul_q8: a gate needs a residual");
  auto shape = x.shape();
  shape.back() = n;
  Q8Extras extras;
  extras.bias = bias.has_value();
  extras.norm = norm_shift.has_value();
  extras.residual = residual.has_value();
  extras.gate = gate.has_value();
  extras.eps = norm_eps;
  // images: the leading axis of a 3-d x (the norm's and the gate's [B, 1, D] rows), else 1
  const int images = x.ndim() == 3 ? x.shape(0) : 1;
  require(!extras.norm && !extras.gate || x.ndim() == 3 || x.ndim() == 2,
          "mobileo bf16_matmul_q8: x [B, N, K] with a norm or a gate");
  // x as it is (read in place through its strides, or gathered; row-contiguous for the norm, which
  // normalises its rows in place of the packing); the weights row-contiguous
  Arrays inputs = {extras.norm ? mx::contiguous(x, false, stream) : x, mx::contiguous(values, false, stream),
                   mx::contiguous(scales, false, stream), mx::contiguous(biases, false, stream)};
  if (bias) inputs.push_back(mx::contiguous(*bias, false, stream));
  if (extras.norm) {
    require(norm_shift->size() % k == 0 && norm_scale->size() % k == 0,
            "mobileo bf16_matmul_q8: norm_shift and norm_scale [B, 1, K] or [1, K]");
    inputs.push_back(per_image(*norm_shift, images, k, stream));
    inputs.push_back(per_image(*norm_scale, images, k, stream));
  }
  if (residual) {
    require(residual->size() == (size_t)m * n, "mobileo bf16_matmul_q8: residual of the output's shape");
    inputs.push_back(mx::contiguous(mx::reshape(mx::broadcast_to(*residual, shape, stream), {m, n}, stream), false,
                                    stream));
  }
  if (gate) {
    require(gate->size() % n == 0, "mobileo bf16_matmul_q8: gate [B, 1, N] or [1, N]");
    inputs.push_back(per_image(*gate, images, n, stream));
  }
  auto product = mx::array({m, n}, mx::float32, std::make_shared<Bf16MatmulQ8>(stream, group_size, extras),
                           std::move(inputs));
  return mx::reshape(product, shape, stream);
}

// ------------------------------------------------------------------ bfloat16 GEMM, 4-bit weights
// x [..., K] @ W^T (+ bias) for W [N, K] in MLX's 4-bit affine layout (a quantized Linear's storage): each B
// panel dequantized and rounded to bf16 as it is packed (bf16_gemm.c's mobileo_bf16_gemm_q4), no float32 W.
// inputs: x, packed [N, K / 8] uint32, scales and biases [N, K / group] (, bias [N])
class Bf16MatmulQ4 : public Kernel {
 public:
  Bf16MatmulQ4(mx::Stream stream, int group_size) : Kernel(stream), group_size_(group_size) {}
  const char *name() const override { return "MobileoBf16MatmulQ4"; }
  bool is_equivalent(const mx::Primitive &other) const override {
    return group_size_ == static_cast<const Bf16MatmulQ4 &>(other).group_size_;
  }
  std::vector<mx::Shape> output_shapes(const Arrays &inputs) override {
    const int k = inputs[1].shape(1) * 8;
    return {{(int)(inputs[0].size() / k), inputs[1].shape(0)}};
  }

  Arrays reference(const Arrays &in) override {
    const auto s = stream();
    const int k = in[1].shape(1) * 8;
    auto weight = mx::dequantize(in[1], in[2], in[3], group_size_, 4, "affine", std::nullopt, std::nullopt, s);
    auto product = mx::matmul(mx::reshape(bf16_rounded(in[0], s), {-1, k}, s),
                              bf16_rounded(mx::transpose(weight, s), s), s);
    return {in.size() > 4 ? mx::add(product, in[4], s) : product};
  }

  void eval_cpu(const Arrays &inputs, Arrays &outputs) override {
    const auto &a = inputs[0], &packed = inputs[1];
    auto &out = outputs[0];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    const int k = packed.shape(1) * 8, n = packed.shape(0), m = (int)(a.size() / k);
    auto &enc = encoder(inputs, outputs);
    enc.dispatch([a_data = a.data<float>(), words = packed.data<uint32_t>(), scales = inputs[2].data<float>(),
                  biases = inputs[3].data<float>(), bias = inputs.size() > 4 ? inputs[4].data<float>() : nullptr,
                  result = out.data<float>(), m, n, k, group = group_size_]() {
      if (mobileo_bf16_gemm_q4(m, n, k, a_data, k, words, scales, biases, group, bias, result, n) != 0)
        throw std::runtime_error("MobileoBf16MatmulQ4: no AVX512-BF16 here, or out of memory");
    });
  }

 private:
  int group_size_;
};

mx::array bf16_matmul_q4(const mx::array &x, const mx::array &packed, const mx::array &scales,
                         const mx::array &biases, int group_size, const std::optional<mx::array> &bias,
                         const mx::StreamOrDevice &where) {
  const auto stream = cpu_stream(where, "bf16_matmul_q4");
  require(mobileo_bf16_gemm_supported(), "mobileo bf16_matmul_q4: this CPU has no AVX512-BF16");
  require(x.dtype() == mx::float32 && packed.dtype() == mx::uint32 && scales.dtype() == mx::float32 &&
              biases.dtype() == mx::float32 && (!bias || bias->dtype() == mx::float32),
          "mobileo bf16_matmul_q4: float32 x, scales, biases and bias, uint32 packed values");
  require(packed.ndim() == 2 && x.ndim() >= 1 && x.shape(-1) == packed.shape(1) * 8,
          "mobileo bf16_matmul_q4: x [..., K] and packed [N, K / 8]");
  const int k = x.shape(-1), n = packed.shape(0);
  require(x.size() > 0 && n > 0, "mobileo bf16_matmul_q4: empty product");
  require(group_size >= 32 && group_size % 32 == 0 && k % group_size == 0,
          "mobileo bf16_matmul_q4: group_size a multiple of 32 dividing K");
  const mx::Shape groups = {n, k / group_size};
  require(scales.shape() == groups && biases.shape() == groups,
          "mobileo bf16_matmul_q4: scales and biases [N, K / group_size]");
  require(!bias || (bias->ndim() == 1 && bias->shape(0) == n), "mobileo bf16_matmul_q4: bias [N]");
  auto shape = x.shape();
  shape.back() = n;
  const int m = (int)(x.size() / k);
  Arrays inputs = {mx::contiguous(x, false, stream), mx::contiguous(packed, false, stream),
                   mx::contiguous(scales, false, stream), mx::contiguous(biases, false, stream)};
  if (bias) inputs.push_back(mx::contiguous(*bias, false, stream));
  auto product = mx::array({m, n}, mx::float32, std::make_shared<Bf16MatmulQ4>(stream, group_size), std::move(inputs));
  return mx::reshape(product, shape, stream);
}

// ------------------------------------------------------------------ GLUMBConv's gated depthwise
// inputs: h [B, H, W, 2C], taps [k, k, 2C] (, bias [2C]) -> D[..., :C] * silu(D[..., C:]) with
// D = depthwise_conv(silu(h)) (+ bias), k odd, stride 1, padding k / 2
class GatedDepthwise : public Kernel {
 public:
  using Kernel::Kernel;
  const char *name() const override { return "MobileoGatedDepthwise"; }
  bool is_equivalent(const mx::Primitive &) const override { return true; }
  std::vector<mx::Shape> output_shapes(const Arrays &inputs) override {
    auto shape = inputs[0].shape();
    shape.back() /= 2;
    return {shape};
  }

  Arrays reference(const Arrays &in) override {
    const auto s = stream();
    const auto &h = in[0], &taps = in[1];
    const int channels = h.shape(3), k = taps.shape(0);
    auto weight = mx::expand_dims(mx::transpose(taps, {2, 0, 1}, s), 3, s);  // [2C, k, k, 1]
    auto d = mx::conv2d(silu_formula(h, s), weight, {1, 1}, {k / 2, k / 2}, {1, 1}, channels, s);
    if (in.size() > 2) d = mx::add(d, in[2], s);
    auto halves = mx::split(d, 2, -1, s);
    return {mx::multiply(halves[0], silu_formula(halves[1], s), s)};
  }

  void eval_cpu(const Arrays &inputs, Arrays &outputs) override {
    const auto &h = inputs[0], &taps = inputs[1];
    auto &out = outputs[0];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto &enc = encoder(inputs, outputs);
    enc.dispatch([source = h.data<float>(), weights = taps.data<float>(),
                  bias = inputs.size() > 2 ? inputs[2].data<float>() : nullptr, result = out.data<float>(),
                  batch = h.shape(0), height = h.shape(1), width = h.shape(2), hidden = out.shape(3),
                  k = taps.shape(0)]() {
      const int status = mobileo_gated_depthwise(source, batch, height, width, hidden, weights, k, bias, result);
      if (status == -2) throw std::runtime_error("MobileoGatedDepthwise: out of memory");
      if (status != 0) throw std::runtime_error("MobileoGatedDepthwise: shape not taken by the kernel");
    });
  }
};

mx::array gated_depthwise(const mx::array &h, const mx::array &weight, const std::optional<mx::array> &bias,
                          const mx::StreamOrDevice &where) {
  const auto stream = cpu_stream(where, "gated_depthwise");
  require(h.ndim() == 4 && weight.ndim() == 4 && weight.shape(3) == 1,
          "mobileo gated_depthwise: h [B, H, W, 2C] and weight [2C, k, k, 1]");
  const int channels = h.shape(3), k = weight.shape(1);
  require(weight.shape(0) == channels, "mobileo gated_depthwise: one output channel per input channel");
  require(channels % 16 == 0 && channels > 0, "mobileo gated_depthwise: 2C channels, C a multiple of 8");
  require(k % 2 == 1 && weight.shape(2) == k, "mobileo gated_depthwise: a square kernel of odd size");
  require(h.dtype() == mx::float32 && weight.dtype() == mx::float32 && (!bias || bias->dtype() == mx::float32),
          "mobileo gated_depthwise: float32 only");
  require(!bias || (bias->ndim() == 1 && bias->shape(0) == channels), "mobileo gated_depthwise: bias [2C]");
  require(h.size() > 0, "mobileo gated_depthwise: empty input");
  // [2C, k, k, 1] -> [k, k, 2C]: each tap a contiguous vector over the channels
  auto taps = mx::contiguous(mx::transpose(mx::reshape(weight, {channels, k, k}, stream), {1, 2, 0}, stream),
                             false, stream);
  Arrays inputs = {mx::contiguous(h, false, stream), taps};
  if (bias) inputs.push_back(mx::contiguous(*bias, false, stream));
  auto shape = h.shape();
  shape.back() = channels / 2;
  return mx::array(shape, mx::float32, std::make_shared<GatedDepthwise>(stream), std::move(inputs));
}

// ------------------------------------------------------------------ grouped 1x1 conv
// inputs: x [..., groups * size], weight [groups * size, size] -> per group, x's channels of the group
// times the group's weight transposed (the DC-AE LiteMLA's multiscale projection)
class GroupedPointwise : public Kernel {
 public:
  GroupedPointwise(mx::Stream stream, int groups) : Kernel(stream), groups_(groups) {}
  const char *name() const override { return "MobileoGroupedPointwise"; }
  bool is_equivalent(const mx::Primitive &other) const override {
    return groups_ == static_cast<const GroupedPointwise &>(other).groups_;
  }
  std::vector<mx::Shape> output_shapes(const Arrays &inputs) override { return {inputs[0].shape()}; }

  Arrays reference(const Arrays &in) override {
    const auto s = stream();
    const int channels = in[0].shape(-1), size = channels / groups_;
    auto rows = mx::reshape(in[0], {-1, groups_, 1, size}, s);
    auto weight = mx::swapaxes(mx::reshape(in[1], {groups_, size, size}, s), 1, 2, s);  // [g, in, out]
    return {mx::reshape(mx::matmul(rows, weight, s), in[0].shape(), s)};
  }

  void eval_cpu(const Arrays &inputs, Arrays &outputs) override {
    const auto &x = inputs[0];
    auto &out = outputs[0];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto &enc = encoder(inputs, outputs);
    const int channels = x.shape(-1);
    enc.dispatch([source = x.data<float>(), weight = inputs[1].data<float>(), result = out.data<float>(),
                  pixels = (long)(x.size() / channels), groups = groups_, size = channels / groups_]() {
      const int status = mobileo_grouped_pointwise(source, pixels, groups, size, weight, result);
      if (status == -2) throw std::runtime_error("MobileoGroupedPointwise: out of memory");
      if (status != 0) throw std::runtime_error("MobileoGroupedPointwise: shape not taken by the kernel");
    });
  }

 private:
  int groups_;
};

mx::array grouped_pointwise(const mx::array &x, const mx::array &weight, int groups, const mx::StreamOrDevice &where) {
  const auto stream = cpu_stream(where, "grouped_pointwise");
  require(x.dtype() == mx::float32 && weight.dtype() == mx::float32, "mobileo grouped_pointwise: float32 only");
  require(x.ndim() >= 1 && x.size() > 0 && groups >= 1 && x.shape(-1) % groups == 0,
          "mobileo grouped_pointwise: x [..., C] with C a multiple of groups");
  const int channels = x.shape(-1), size = channels / groups;
  require(weight.ndim() == 2 && weight.shape(0) == channels && weight.shape(1) == size,
          "mobileo grouped_pointwise: weight [C, C / groups]");
  require(size % 16 == 0 && size <= 64, "mobileo grouped_pointwise: C / groups a multiple of 16, up to 64");
  return mx::array(x.shape(), mx::float32, std::make_shared<GroupedPointwise>(stream, groups),
                   {mx::contiguous(x, false, stream), mx::contiguous(weight, false, stream)});
}

void register_gated_depthwise(nb::module_ &m) {
  m.def("gated_depthwise", &gated_depthwise, nb::arg("h"), nb::arg("weight"), nb::arg("bias").none(), nb::kw_only(),
        nb::arg("stream") = nb::none());
  m.def("grouped_pointwise", &grouped_pointwise, nb::arg("x"), nb::arg("weight"), nb::arg("groups"), nb::kw_only(),
        nb::arg("stream") = nb::none());
}

// ------------------------------------------------------------------ the SiLU gate
// a * silu(g), a and g of one shape
class GluSilu : public Kernel {
 public:
  using Kernel::Kernel;
  const char *name() const override { return "MobileoGluSilu"; }
  bool is_equivalent(const mx::Primitive &) const override { return true; }
  std::vector<mx::Shape> output_shapes(const Arrays &inputs) override { return {inputs[0].shape()}; }

  Arrays reference(const Arrays &in) override {
    const auto s = stream();
    return {mx::multiply(in[0], silu_formula(in[1], s), s)};
  }

  void eval_cpu(const Arrays &inputs, Arrays &outputs) override {
    const auto &a = inputs[0], &g = inputs[1];
    auto &out = outputs[0];
    // both row-contiguous (mx::contiguous in the op): an element's index is its offset in either
    take_over_or_allocate(out, {&a, &g});
    auto &enc = encoder(inputs, outputs);
    enc.dispatch([values = a.data<float>(), gates = g.data<float>(), result = out.data<float>(),
                  count = (long)a.size()]() { mobileo_glu_silu(values, gates, result, count); });
  }
};

mx::array glu_silu(const mx::array &a, const mx::array &g, const mx::StreamOrDevice &where) {
  const auto stream = cpu_stream(where, "glu_silu");
  require(a.dtype() == mx::float32 && g.dtype() == mx::float32, "mobileo glu_silu: float32 only");
  require(a.shape() == g.shape(), "mobileo glu_silu: a and g of one shape");
  return mx::array(a.shape(), mx::float32, std::make_shared<GluSilu>(stream),
                   {mx::contiguous(a, false, stream), mx::contiguous(g, false, stream)});
}

// ------------------------------------------------------------- RMSNorm + bias [+ residual]
// The rows of an evaluated array as norms.c reads them: in place when its last axis is
// contiguous (a cropped view such as the DC-AE's conv output costs no copy), else nullopt.
std::optional<mobileo_rows> row_layout(const mx::array &x) {
  const int lead = (int)x.ndim() - 1;
  if (lead > MOBILEO_MAX_ROW_DIMS || (x.shape(-1) > 1 && x.strides().back() != 1)) return std::nullopt;
  mobileo_rows rows{};
  rows.dims = lead;
  for (int i = 0; i < lead; i++) {
    rows.shape[i] = x.shape(i);
    rows.strides[i] = (long)x.strides()[i];
  }
  return rows;
}

mobileo_rows contiguous_rows(const mx::array &x) {
  mobileo_rows rows{};
  rows.dims = 1;
  rows.shape[0] = (long)(x.size() / x.shape(-1));
  rows.strides[0] = x.shape(-1);
  return rows;
}

// A node with one parameter, an epsilon, whose output has its first input's shape.
class EpsilonKernel : public Kernel {
 public:
  EpsilonKernel(mx::Stream stream, float eps) : Kernel(stream), eps_(eps) {}
  bool is_equivalent(const mx::Primitive &other) const override {
    return eps_ == static_cast<const EpsilonKernel &>(other).eps_;  // MLX compares nodes of one type only
  }
  std::vector<mx::Shape> output_shapes(const Arrays &inputs) override { return {inputs[0].shape()}; }

 protected:
  float eps_;
};

class RmsNormResidual : public EpsilonKernel {
 public:
  using EpsilonKernel::EpsilonKernel;
  const char *name() const override { return "MobileoRmsNormResidual"; }

  // inputs: y [..., D], weight [D], bias [D] (, residual of y's shape)
  Arrays reference(const Arrays &in) override {
    const auto s = stream();
    auto normed = mx::add(mx::fast::rms_norm(in[0], in[1], eps_, s), in[2], s);
    return {in.size() > 3 ? mx::add(in[3], normed, s) : normed};
  }

  void eval_cpu(const Arrays &inputs, Arrays &outputs) override {
    const auto &y = inputs[0];
    auto &out = outputs[0];
    const bool has_residual = inputs.size() > 3;
    take_over_or_allocate(out, {y.flags().row_contiguous ? &y : nullptr});  // each row summed before it is written
    auto &enc = encoder(inputs, outputs);
    const int dim = y.shape(-1);
    const long rows = (long)(y.size() / dim);
    // an input whose last axis is not contiguous is gathered row-major into a temporary first
    auto read = [&](const mx::array &x, float *&copy) {
      auto layout = row_layout(x);
      copy = nullptr;
      if (layout) return *layout;
      mx::array temporary(mx::allocator::malloc(x.nbytes()), x.shape(), mx::float32);
      enc.add_temporary(temporary);
      copy = temporary.data<float>();
      return contiguous_rows(x);
    };
    float *y_copy, *r_copy = nullptr;
    const mobileo_rows y_rows = read(y, y_copy);
    const mobileo_rows r_rows = has_residual ? read(inputs[3], r_copy) : mobileo_rows{};
    enc.dispatch([y_data = y.data<float>(), y_shape = y.shape(), y_strides = y.strides(), y_copy, y_rows,
                  r_data = has_residual ? inputs[3].data<float>() : nullptr,
                  r_shape = has_residual ? inputs[3].shape() : mx::Shape{},
                  r_strides = has_residual ? inputs[3].strides() : mx::Strides{}, r_copy, r_rows,
                  weight = inputs[1].data<float>(), bias = inputs[2].data<float>(), result = out.data<float>(),
                  eps = eps_, rows, dim]() {
      if (y_copy != nullptr) gather(y_data, y_shape, y_strides, y_copy, (size_t)rows * dim);
      if (r_copy != nullptr) gather(r_data, r_shape, r_strides, r_copy, (size_t)rows * dim);
      if (mobileo_rms_norm_residual(y_copy ? y_copy : y_data, &y_rows, r_copy ? r_copy : r_data, &r_rows, weight,
                                    bias, eps, rows, dim, result) != 0)
        throw std::runtime_error("MobileoRmsNormResidual: layout not taken by the kernel");
    });
  }
};

mx::array rms_norm_residual(const mx::array &y, const mx::array &weight, const mx::array &bias, float eps,
                            const std::optional<mx::array> &residual, const mx::StreamOrDevice &where) {
  const auto stream = cpu_stream(where, "rms_norm_residual");
  require(y.dtype() == mx::float32 && weight.dtype() == mx::float32 && bias.dtype() == mx::float32 &&
              (!residual || residual->dtype() == mx::float32),
          "mobileo rms_norm_residual: float32 only");
  require(y.ndim() >= 1 && y.size() > 0, "mobileo rms_norm_residual: y [..., D], not empty");
  const int dim = y.shape(-1);
  require(weight.ndim() == 1 && weight.shape(0) == dim && bias.ndim() == 1 && bias.shape(0) == dim,
          "mobileo rms_norm_residual: weight and bias [D]");
  require(!residual || residual->shape() == y.shape(), "mobileo rms_norm_residual: the residual of y's shape");
  // y and the residual as they are (read in place through their row strides, or gathered)
  Arrays inputs = {y, mx::contiguous(weight, false, stream), mx::contiguous(bias, false, stream)};
  if (residual) inputs.push_back(*residual);
  return mx::array(y.shape(), mx::float32, std::make_shared<RmsNormResidual>(stream, eps), std::move(inputs));
}

// --------------------------------------------------------- SANA's modulated LayerNorm, gated residual
// x [B, N, D]; shift, scale, gate broadcast to [B, 1, D] and passed as [B, D] (per_image)

class ModulatedLayerNorm : public EpsilonKernel {
 public:
  using EpsilonKernel::EpsilonKernel;
  const char *name() const override { return "MobileoModulatedLayerNorm"; }

  // inputs: x [B, N, D], shift [B, D], scale [B, D]
  Arrays reference(const Arrays &in) override {
    return {modulated_layer_norm_formula(in[0], in[1], in[2], eps_, stream())};
  }

  void eval_cpu(const Arrays &inputs, Arrays &outputs) override {
    const auto &x = inputs[0];
    auto &out = outputs[0];
    take_over_or_allocate(out, {&x});  // each row is summed before it is written
    auto &enc = encoder(inputs, outputs);
    enc.dispatch([source = x.data<float>(), shift = inputs[1].data<float>(), scale = inputs[2].data<float>(),
                  result = out.data<float>(), batch = x.shape(0), tokens = x.shape(1), dim = x.shape(2),
                  eps = eps_]() {
      if (mobileo_modulated_layer_norm(source, batch, tokens, dim, shift, scale, eps, result) != 0)
        throw std::runtime_error("MobileoModulatedLayerNorm: shape not taken by the kernel");
    });
  }
};

mx::array modulated_layer_norm(const mx::array &x, const mx::array &shift, const mx::array &scale, float eps,
                               const mx::StreamOrDevice &where) {
  const auto stream = cpu_stream(where, "modulated_layer_norm");
  require(x.dtype() == mx::float32 && shift.dtype() == mx::float32 && scale.dtype() == mx::float32,
          "mobileo modulated_layer_norm: float32 only");
  require(x.ndim() == 3 && x.size() > 0, "mobileo modulated_layer_norm: x [B, N, D], not empty");
  const int batch = x.shape(0), dim = x.shape(2);
  return mx::array(x.shape(), mx::float32, std::make_shared<ModulatedLayerNorm>(stream, eps),
                   {mx::contiguous(x, false, stream), per_image(shift, batch, dim, stream),
                    per_image(scale, batch, dim, stream)});
}

class GatedResidual : public Kernel {
 public:
  using Kernel::Kernel;
  const char *name() const override { return "MobileoGatedResidual"; }
  bool is_equivalent(const mx::Primitive &) const override { return true; }
  std::vector<mx::Shape> output_shapes(const Arrays &inputs) override { return {inputs[0].shape()}; }

  // inputs: x [B, N, D], gate [B, D], update [B, N, D]
  Arrays reference(const Arrays &in) override { return {gated_residual_formula(in[0], in[1], in[2], stream())}; }

  void eval_cpu(const Arrays &inputs, Arrays &outputs) override {
    const auto &x = inputs[0], &update = inputs[2];
    auto &out = outputs[0];
    take_over_or_allocate(out, {&x, &update});  // both row-contiguous (mx::contiguous in the op)
    auto &enc = encoder(inputs, outputs);
    enc.dispatch([stream_x = x.data<float>(), gate = inputs[1].data<float>(), delta = update.data<float>(),
                  result = out.data<float>(), batch = x.shape(0), tokens = x.shape(1), dim = x.shape(2)]() {
      if (mobileo_gated_residual(stream_x, gate, delta, batch, tokens, dim, result) != 0)
        throw std::runtime_error("MobileoGatedResidual: shape not taken by the kernel");
    });
  }
};

mx::array gated_residual(const mx::array &x, const mx::array &gate, const mx::array &update,
                         const mx::StreamOrDevice &where) {
  const auto stream = cpu_stream(where, "gated_residual");
  require(x.dtype() == mx::float32 && gate.dtype() == mx::float32 && update.dtype() == mx::float32,
          "mobileo gated_residual: float32 only");
  require(x.ndim() == 3 && x.size() > 0 && update.shape() == x.shape(),
          "mobileo gated_residual: x and update [B, N, D], not empty");
  const int batch = x.shape(0), dim = x.shape(2);
  return mx::array(x.shape(), mx::float32, std::make_shared<GatedResidual>(stream),
                   {mx::contiguous(x, false, stream), per_image(gate, batch, dim, stream),
                    mx::contiguous(update, false, stream)});
}

void register_elementwise(nb::module_ &m) {
  m.def("silu", &silu, nb::arg("x"), nb::kw_only(), nb::arg("stream") = nb::none());
  m.def("glu_silu", &glu_silu, nb::arg("a"), nb::arg("g"), nb::kw_only(), nb::arg("stream") = nb::none());
  m.def("rms_norm_residual", &rms_norm_residual, nb::arg("y"), nb::arg("weight"), nb::arg("bias"), nb::arg("eps"),
        nb::arg("residual").none(), nb::kw_only(), nb::arg("stream") = nb::none());
  m.def("modulated_layer_norm", &modulated_layer_norm, nb::arg("x"), nb::arg("shift"), nb::arg("scale"),
        nb::arg("eps"), nb::kw_only(), nb::arg("stream") = nb::none());
  m.def("gated_residual", &gated_residual, nb::arg("x"), nb::arg("gate"), nb::arg("update"), nb::kw_only(),
        nb::arg("stream") = nb::none());
}


// ------------------------------------------------------------------ attention cores (DiT, DC-AE)
// q, k, v [B, heads, rows, d] as the models pass them: views of their merged projections, read
// through their strides (unit stride along d; any other layout is gathered row-major when the
// kernel runs). The output [B, heads, N, d_v] is stored as [B, N, heads, d_v] (its strides say
// so), so the models' merge of the heads (transpose + reshape) is a view, not a copy.

// An input as the kernel reads it: in place, or a row-major copy the encoder keeps alive.
struct HeadsInput {
  const float *data;
  mx::Shape shape;
  mx::Strides strides;
  float *copy;  // nullptr: read in place

  mobileo_heads view() const {
    if (copy != nullptr) {
      const int64_t row = shape[3], head = row * shape[2];
      return {copy, head * shape[1], head, row};
    }
    return {data, strides[0], strides[1], strides[2]};
  }
  void prepare() const {
    if (copy != nullptr) gather(data, shape, strides, copy, (size_t)shape[0] * shape[1] * shape[2] * shape[3]);
  }
};

HeadsInput heads_input(mx::cpu::CommandEncoder &enc, const mx::array &x) {
  HeadsInput in{x.data<float>(), x.shape(), x.strides(), nullptr};
  if (x.strides(3) != 1 && x.shape(3) != 1) {
    mx::array copy(mx::allocator::malloc(x.nbytes()), x.shape(), mx::float32);
    enc.add_temporary(copy);
    in.copy = copy.data<float>();
  }
  return in;
}

// out [B, heads, N, d_v] laid out as [B, N, heads, d_v].
void allocate_merged_heads(mx::array &out) {
  const auto &shape = out.shape();
  const int64_t dv = shape[3], merged = (int64_t)shape[1] * dv;
  mx::Strides strides{merged * shape[2], dv, merged, 1};
  auto [data_size, row_contiguous, col_contiguous] = mx::check_contiguity(shape, strides);
  mx::array::Flags flags{};
  flags.contiguous = true;
  flags.row_contiguous = row_contiguous;
  flags.col_contiguous = col_contiguous;
  out.set_data(mx::allocator::malloc(out.nbytes()), out.size(), strides, flags);
}

void check_heads(const mx::array &q, const mx::array &k, const mx::array &v, const char *op) {
  const std::string name = std::string("mobileo ") + op;
  require(q.ndim() == 4 && k.ndim() == 4 && v.ndim() == 4, name + ": q, k, v [B, heads, rows, d]");
  require(q.dtype() == mx::float32 && k.dtype() == mx::float32 && v.dtype() == mx::float32, name + ": float32 only");
  require(k.shape(0) == q.shape(0) && v.shape(0) == q.shape(0) && k.shape(1) == q.shape(1) &&
              v.shape(1) == q.shape(1) && k.shape(3) == q.shape(3) && v.shape(2) == k.shape(2),
          name + ": q [B, heads, N, d], k [B, heads, L, d] and v [B, heads, L, d_v]");
  require(q.size() > 0 && k.size() > 0 && v.size() > 0, name + ": empty input");
}

// An attention core: q [B, heads, N, d], k, v [B, heads_kv, L, d / d_v] -> [B, heads, N, d_v].
class AttentionKernel : public Kernel {
 public:
  using Kernel::Kernel;
  std::vector<mx::Shape> output_shapes(const Arrays &inputs) override {
    auto shape = inputs[0].shape();
    shape[3] = inputs[2].shape(3);
    return {shape};
  }
};

// inputs: q, k, v (, key bias [B, L]) -> softmax(scale q k^T + bias [+ causal mask]) v; k and v
// may have fewer heads than q (grouped-query attention: query head h reads KV head h / group)
class SoftmaxAttention : public AttentionKernel {
 public:
  SoftmaxAttention(mx::Stream stream, float scale, bool causal) : AttentionKernel(stream), scale_(scale), causal_(causal) {}
  const char *name() const override { return "MobileoSoftmaxAttention"; }
  bool is_equivalent(const mx::Primitive &other) const override {
    const auto &o = static_cast<const SoftmaxAttention &>(other);
    return scale_ == o.scale_ && causal_ == o.causal_;
  }

  Arrays reference(const Arrays &in) override {
    const auto s = stream();
    const int group = in[0].shape(1) / in[1].shape(1);
    auto k = group > 1 ? mx::repeat(in[1], group, 1, s) : in[1], v = group > 1 ? mx::repeat(in[2], group, 1, s) : in[2];
    auto scores = mx::matmul(mx::multiply(in[0], mx::array(scale_), s), mx::swapaxes(k, -1, -2, s), s);
    if (in.size() > 3)
      scores = mx::add(scores, mx::reshape(in[3], {in[3].shape(0), 1, 1, in[3].shape(1)}, s), s);
    if (causal_) {
      const int queries = in[0].shape(2), keys = in[1].shape(2);
      auto rows = mx::reshape(mx::arange(keys - queries, keys, s), {queries, 1}, s);
      auto seen = mx::greater_equal(rows, mx::reshape(mx::arange(0, keys, s), {1, keys}, s), s);
      scores = mx::where(seen, scores, mx::array(-std::numeric_limits<float>::infinity()), s);
    }
    return {mx::matmul(mx::softmax(scores, std::vector<int>{-1}, true, s), v, s)};
  }

  void eval_cpu(const Arrays &inputs, Arrays &outputs) override {
    auto &out = outputs[0];
    allocate_merged_heads(out);
    auto &enc = encoder(inputs, outputs);
    const auto &q = inputs[0], &k = inputs[1], &v = inputs[2];
    enc.dispatch([q_in = heads_input(enc, q), k_in = heads_input(enc, k), v_in = heads_input(enc, v),
                  bias = inputs.size() > 3 ? inputs[3].data<float>() : nullptr, result = out.data<float>(),
                  batch = q.shape(0), heads = q.shape(1), heads_kv = k.shape(1), queries = q.shape(2),
                  keys = k.shape(2), depth = q.shape(3), depth_v = v.shape(3), causal = causal_, scale = scale_]() {
      q_in.prepare();
      k_in.prepare();
      v_in.prepare();
      const int status = mobileo_softmax_attention(batch, heads, heads_kv, queries, keys, depth, depth_v, q_in.view(),
                                                   k_in.view(), v_in.view(), bias, causal, scale, result);
      if (status == -2) throw std::runtime_error("MobileoSoftmaxAttention: out of memory");
      if (status != 0) throw std::runtime_error("MobileoSoftmaxAttention: no AVX-512 here, or an empty size");
    });
  }

 private:
  float scale_;
  bool causal_;
};

mx::array softmax_attention(const mx::array &q, const mx::array &k, const mx::array &v, float scale,
                            const std::optional<mx::array> &key_bias, bool causal, const mx::StreamOrDevice &where) {
  const auto stream = cpu_stream(where, "softmax_attention");
  require(mobileo_attention_supported(), "mobileo softmax_attention: this CPU has no AVX-512");
  require(q.ndim() == 4 && k.ndim() == 4 && v.ndim() == 4, "mobileo softmax_attention: q, k, v [B, heads, rows, d]");
  require(q.dtype() == mx::float32 && k.dtype() == mx::float32 && v.dtype() == mx::float32,
          "mobileo softmax_attention: float32 only");
  require(k.shape(0) == q.shape(0) && v.shape(0) == q.shape(0) && k.shape(1) > 0 && v.shape(1) == k.shape(1) &&
              q.shape(1) % k.shape(1) == 0 && k.shape(3) == q.shape(3) && v.shape(2) == k.shape(2),
          "mobileo softmax_attention: q [B, heads, N, d], k [B, heads_kv, L, d] and v [B, heads_kv, L, d_v], "
          "heads_kv dividing heads");
  require(q.size() > 0 && k.size() > 0 && v.size() > 0, "mobileo softmax_attention: empty input");
  require(!causal || k.shape(2) >= q.shape(2),
          "mobileo softmax_attention: causal needs at least as many keys as queries");
  const int batch = q.shape(0), keys = k.shape(2);
  Arrays inputs = {q, k, v};  // as they are: the kernel reads the head views in place
  if (key_bias) {
    const auto &b = *key_bias;
    require(b.dtype() == mx::float32 && b.ndim() == 4 && (b.shape(0) == batch || b.shape(0) == 1) &&
                b.shape(1) == 1 && b.shape(2) == 1 && b.shape(3) == keys,
            "mobileo softmax_attention: key_bias [B or 1, 1, 1, L] float32");
    inputs.push_back(mx::contiguous(
        mx::broadcast_to(mx::reshape(b, {b.shape(0), keys}, stream), {batch, keys}, stream), false, stream));
  }
  return mx::array({batch, q.shape(1), q.shape(2), v.shape(3)}, mx::float32,
                   std::make_shared<SoftmaxAttention>(stream, scale, causal), std::move(inputs));
}

// inputs: q, k, v -> relu(q) (relu(k)^T v) / (relu(q) . sum relu(k) + eps)
class ReluLinearAttention : public AttentionKernel {
 public:
  ReluLinearAttention(mx::Stream stream, float eps) : AttentionKernel(stream), eps_(eps) {}
  const char *name() const override { return "MobileoReluLinearAttention"; }
  bool is_equivalent(const mx::Primitive &other) const override {
    return eps_ == static_cast<const ReluLinearAttention &>(other).eps_;
  }

  Arrays reference(const Arrays &in) override {
    const auto s = stream();
    auto q = mx::maximum(in[0], mx::array(0.0f), s), k = mx::maximum(in[1], mx::array(0.0f), s);
    auto kv = mx::matmul(mx::swapaxes(k, -1, -2, s), in[2], s);
    auto k_sum = mx::sum(k, -2, true, s);
    auto denominator = mx::sum(mx::multiply(q, k_sum, s), -1, true, s);
    return {mx::divide(mx::matmul(q, kv, s), mx::add(denominator, mx::array(eps_), s), s)};
  }

  void eval_cpu(const Arrays &inputs, Arrays &outputs) override {
    auto &out = outputs[0];
    allocate_merged_heads(out);
    auto &enc = encoder(inputs, outputs);
    const auto &q = inputs[0], &k = inputs[1], &v = inputs[2];
    enc.dispatch([q_in = heads_input(enc, q), k_in = heads_input(enc, k), v_in = heads_input(enc, v),
                  result = out.data<float>(), batch = q.shape(0), heads = q.shape(1), queries = q.shape(2),
                  keys = k.shape(2), depth = q.shape(3), depth_v = v.shape(3), eps = eps_]() {
      q_in.prepare();
      k_in.prepare();
      v_in.prepare();
      const int status = mobileo_relu_linear_attention(batch, heads, queries, keys, depth, depth_v, q_in.view(),
                                                       k_in.view(), v_in.view(), eps, result);
      if (status == -2) throw std::runtime_error("MobileoReluLinearAttention: out of memory");
      if (status != 0) throw std::runtime_error("MobileoReluLinearAttention: no AVX-512 here, or an empty size");
    });
  }

 private:
  float eps_;
};

mx::array relu_linear_attention(const mx::array &q, const mx::array &k, const mx::array &v, float eps,
                                const mx::StreamOrDevice &where) {
  const auto stream = cpu_stream(where, "relu_linear_attention");
  require(mobileo_attention_supported(), "mobileo relu_linear_attention: this CPU has no AVX-512");
  check_heads(q, k, v, "relu_linear_attention");
  return mx::array({q.shape(0), q.shape(1), q.shape(2), v.shape(3)}, mx::float32,
                   std::make_shared<ReluLinearAttention>(stream, eps), {q, k, v});
}

void register_attention(nb::module_ &m) {
  m.def("attention_supported", []() { return mobileo_attention_supported() != 0; });
  m.def("softmax_attention", &softmax_attention, nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("scale"),
        nb::arg("key_bias").none(), nb::arg("causal") = false, nb::kw_only(), nb::arg("stream") = nb::none());
  m.def("relu_linear_attention", &relu_linear_attention, nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("eps"),
        nb::kw_only(), nb::arg("stream") = nb::none());
}

// ------------------------------------------------------------------ bfloat16 conv (implicit GEMM)
// A stride-1 conv whose output has the input's size (the DC-AE's 3x3 convs, padding 1; the
// sub-pixel upsampler's 2x2 parity convs) as one bf16 GEMM (bf16_gemm.c's mobileo_bf16_conv):
// A is packed straight from the windows of x with the zero padding made there, K = kh kw C is
// summed in the tiles and the output written once, the bias (and an optional addend) added as
// it is stored, then SiLU if asked (the DC-AE ResBlock's first conv and its activation), or each
// pixel's RMSNorm (+ bias, + a residual) once its row is whole (the ResBlock's second conv, its norm
// and residual): the map written once.
// inputs: x [B, H, W, C], weight [O, kh, kw, C] (, bias [O]) (, init [B, H, W, O])
//         (, norm weight [O], norm bias [O]) (, residual [B, H, W, O])
struct ConvExtras {
  bool bias = false, init = false, silu = false, norm = false, residual = false;
  float eps = 0.0f;
  bool operator==(const ConvExtras &) const = default;
};

class Bf16Conv : public Kernel {
 public:
  Bf16Conv(mx::Stream stream, std::pair<int, int> padding, ConvExtras extras)
      : Kernel(stream), padding_(padding), extras_(extras) {}
  const char *name() const override { return "MobileoBf16Conv"; }
  bool is_equivalent(const mx::Primitive &other) const override {
    const auto &o = static_cast<const Bf16Conv &>(other);
    return padding_ == o.padding_ && extras_ == o.extras_;
  }
  std::vector<mx::Shape> output_shapes(const Arrays &inputs) override {
    auto shape = inputs[0].shape();
    shape.back() = inputs[1].shape(0);
    return {shape};
  }

  // [init +] the conv of the bfloat16-rounded operands, summed in float32 [+ bias], then [SiLU] or
  // [[residual +] RMSNorm * weight + bias]
  Arrays reference(const Arrays &in) override {
    const auto s = stream();
    const int kh = in[1].shape(1), kw = in[1].shape(2);
    auto y = mx::conv_general(bf16_rounded(in[0], s), bf16_rounded(in[1], s), {1, 1},
                              {padding_.first, padding_.second},
                              {kh - 1 - padding_.first, kw - 1 - padding_.second}, {1, 1}, {1, 1}, 1, false, s);
    size_t next = 2;
    const mx::array *bias = extras_.bias ? &in[next++] : nullptr;
    if (extras_.init) y = mx::add(in[next++], y, s);
    if (bias != nullptr) y = mx::add(y, *bias, s);
    if (extras_.silu) y = silu_formula(y, s);
    if (extras_.norm) {
      y = mx::add(mx::fast::rms_norm(y, in[next], extras_.eps, s), in[next + 1], s);
      next += 2;
      if (extras_.residual) y = mx::add(in[next], y, s);
    }
    return {y};
  }

  void eval_cpu(const Arrays &inputs, Arrays &outputs) override {
    const auto &x = inputs[0], &weight = inputs[1];
    auto &out = outputs[0];
    size_t next = 2;
    const float *bias = extras_.bias ? inputs[next++].data<float>() : nullptr;
    const mx::array *init = extras_.init ? &inputs[next++] : nullptr;
    mobileo_gemm_extras extras{};
    extras.silu = extras_.silu;
    if (extras_.norm) {
      extras.row_weight = inputs[next].data<float>();
      extras.row_bias = inputs[next + 1].data<float>();
      extras.row_eps = extras_.eps;
      next += 2;
      if (extras_.residual) extras.row_residual = inputs[next].data<float>();
    }
    take_over_or_allocate(out, {init});  // row-contiguous [B, H, W, O] (mx::contiguous in the op)
    auto &enc = encoder(inputs, outputs);
    enc.dispatch([image = x.data<float>(), weights = weight.data<float>(), bias,
                  addend = init != nullptr ? init->data<float>() : nullptr, result = out.data<float>(),
                  batch = x.shape(0), height = x.shape(1), width = x.shape(2), channels = x.shape(3),
                  out_channels = weight.shape(0), kh = weight.shape(1), kw = weight.shape(2), padding = padding_,
                  size = out.size(), extras]() {
      if (addend != nullptr && addend != result) std::memcpy(result, addend, size * sizeof(float));
      if (mobileo_bf16_conv(image, batch, height, width, channels, weights, kh, kw, out_channels, padding.first,
                            padding.second, bias, addend != nullptr, result, 0, 0, &extras) != 0)
        throw std::runtime_error("MobileoBf16Conv: no AVX512-BF16 here, or out of memory");
    });
  }

 private:
  std::pair<int, int> padding_;
  ConvExtras extras_;
};

mx::array bf16_conv(const mx::array &x, const mx::array &weight, const std::optional<mx::array> &bias,
                    std::pair<int, int> padding, const std::optional<mx::array> &init, bool silu,
                    const std::optional<mx::array> &norm_weight, const std::optional<mx::array> &norm_bias,
                    float norm_eps, const std::optional<mx::array> &residual, const mx::StreamOrDevice &where) {
  const auto stream = cpu_stream(where, "bf16_conv");
  require(mobileo_bf16_gemm_supported(), "mobileo bf16_conv: this CPU has no AVX512-BF16");
  require(x.ndim() == 4 && weight.ndim() == 4 && x.shape(3) == weight.shape(3),
          "mobileo bf16_conv: x [B, H, W, C] and weight [O, kh, kw, C]");
  const auto is_float32 = [](const std::optional<mx::array> &v) { return !v || v->dtype() == mx::float32; };
  require(x.dtype() == mx::float32 && weight.dtype() == mx::float32 && is_float32(bias) && is_float32(init) &&
              is_float32(norm_weight) && is_float32(norm_bias) && is_float32(residual),
          "mobileo bf16_conv: float32 only");
  const int out_channels = weight.shape(0), kh = weight.shape(1), kw = weight.shape(2);
  require(x.size() > 0 && weight.size() > 0, "mobileo bf16_conv: empty input");
  require(padding.first >= 0 && padding.first < kh && padding.second >= 0 && padding.second < kw,
          "mobileo bf16_conv: padding 0 .. k - 1 (the output has the input's size)");
  const auto is_row = [out_channels](const std::optional<mx::array> &v) {
    return !v || (v->ndim() == 1 && v->shape(0) == out_channels);
  };
  require(is_row(bias), "mobileo bf16_conv: bias [O]");
  require(norm_weight.has_value() == norm_bias.has_value() && is_row(norm_weight) && is_row(norm_bias),
          "mobileo bf16_conv: norm_weight and norm_bias [O], together");
  require(!residual || norm_weight, "mobileo bf16_conv: a residual comes with the norm");
  require(!(silu && norm_weight), "mobileo bf16_conv: SiLU or the norm, not both");
  auto shape = x.shape();
  shape.back() = out_channels;
  require(!init || init->shape() == shape, "mobileo bf16_conv: init [B, H, W, O]");
  require(!residual || residual->shape() == shape, "mobileo bf16_conv: residual [B, H, W, O]");
  ConvExtras extras;
  extras.bias = bias.has_value();
  extras.init = init.has_value();
  extras.silu = silu;
  extras.norm = norm_weight.has_value();
  extras.residual = residual.has_value();
  extras.eps = norm_eps;
  Arrays inputs = {mx::contiguous(x, false, stream), mx::contiguous(weight, false, stream)};
  for (const auto *extra : {&bias, &init, &norm_weight, &norm_bias, &residual})
    if (*extra) inputs.push_back(mx::contiguous(**extra, false, stream));
  return mx::array(shape, mx::float32, std::make_shared<Bf16Conv>(stream, padding, extras), std::move(inputs));
}

// Nearest x2 upsampling then a 3x3 conv, in sub-pixel form (the DC-AE's upsamplers): output
// parity (a, b) is a 2x2 conv of the low-resolution x (padding 1 - a rows above, 1 - b columns
// left), each written by mobileo_bf16_conv straight into its pixels of the interleaved output, its
// stores adding the upsampler's shortcut read from x and the bias (or an init the output starts as):
// no per-parity map, no interleave copy, no shortcut map.
// inputs: x [B, H, W, C], weights [2 (a), 2 (b), O, 2, 2, C], then init [B, 2H, 2W, O] or (bias [O])
class Bf16SubpixelConv : public Kernel {
 public:
  // repeats 0: the output starts as the init input; else as the DC-AE upsampler's shortcut
  // pixel_shuffle(repeat_interleave(x, repeats)) (+ the bias input), read from x in the store
  Bf16SubpixelConv(mx::Stream stream, int repeats, bool has_bias)
      : Kernel(stream), repeats_(repeats), has_bias_(has_bias) {}
  const char *name() const override { return "MobileoBf16SubpixelConv"; }
  bool is_equivalent(const mx::Primitive &other) const override {
    const auto &o = static_cast<const Bf16SubpixelConv &>(other);
    return repeats_ == o.repeats_ && has_bias_ == o.has_bias_;
  }
  std::vector<mx::Shape> output_shapes(const Arrays &inputs) override {
    const auto &x = inputs[0];
    return {{x.shape(0), 2 * x.shape(1), 2 * x.shape(2), inputs[1].shape(2)}};
  }

  // The output channel o at parity (a, b) of the shortcut: x's channel (4 o + 2 a + b) / repeats.
  static int shortcut_step(int repeats) { return 4 / repeats; }
  static int shortcut_first(int repeats, int a, int b) { return (2 * a + b) / repeats; }

  Arrays reference(const Arrays &in) override {
    const auto s = stream();
    const auto &x = in[0];
    const int out_channels = in[1].shape(2);
    Arrays rows, starts;  // [B, H, W, 2 (b), O] per a
    for (int a = 0; a < 2; a++) {
      Arrays columns, shortcuts;
      for (int b = 0; b < 2; b++) {  // x rounded per parity, as bf16_conv's formula (the same gradients)
        auto w = mx::squeeze(mx::slice(in[1], {a, b, 0, 0, 0, 0}, {a + 1, b + 1, out_channels, 2, 2, in[1].shape(5)},
                                       s), {0, 1}, s);
        columns.push_back(mx::conv_general(bf16_rounded(x, s), bf16_rounded(w, s), {1, 1}, {1 - a, 1 - b}, {a, b},
                                           {1, 1}, {1, 1}, 1, false, s));
        if (repeats_ > 0) {
          const int first = shortcut_first(repeats_, a, b), step = shortcut_step(repeats_);
          auto picked = mx::slice(x, {0, 0, 0, first}, {x.shape(0), x.shape(1), x.shape(2),
                                                       first + step * (out_channels - 1) + 1}, {1, 1, 1, step}, s);
          shortcuts.push_back(has_bias_ ? mx::add(picked, in[2], s) : picked);
        }
      }
      rows.push_back(mx::stack(columns, 3, s));
      if (repeats_ > 0) starts.push_back(mx::stack(shortcuts, 3, s));
    }
    const mx::Shape shape = {x.shape(0), 2 * x.shape(1), 2 * x.shape(2), out_channels};
    auto start = repeats_ > 0 ? mx::reshape(mx::stack(starts, 2, s), shape, s) : in[2];
    return {mx::add(start, mx::reshape(mx::stack(rows, 2, s), shape, s), s)};
  }

  void eval_cpu(const Arrays &inputs, Arrays &outputs) override {
    const auto &x = inputs[0], &weights = inputs[1];
    auto &out = outputs[0];
    const mx::array *init = repeats_ == 0 ? &inputs[2] : nullptr;
    take_over_or_allocate(out, {init});  // row-contiguous (mx::contiguous in the op)
    auto &enc = encoder(inputs, outputs);
    enc.dispatch([image = x.data<float>(), taps = weights.data<float>(),
                  addend = init != nullptr ? init->data<float>() : nullptr,
                  bias = has_bias_ ? inputs[2].data<float>() : nullptr, repeats = repeats_,
                  result = out.data<float>(), batch = x.shape(0), height = x.shape(1), width = x.shape(2),
                  channels = x.shape(3), out_channels = weights.shape(2), size = out.size()]() {
      if (addend != nullptr && addend != result) std::memcpy(result, addend, size * sizeof(float));
      const size_t parity_weights = (size_t)out_channels * 4 * channels;
      const long line = 4L * width * out_channels, pixel = 2L * out_channels;
      for (int a = 0; a < 2; a++)
        for (int b = 0; b < 2; b++) {
          mobileo_gemm_extras extras{};
          if (repeats > 0) {
            extras.shortcut = image;
            extras.shortcut_bias = bias;
            extras.shortcut_channels = channels;
            extras.shortcut_step = shortcut_step(repeats);
            extras.shortcut_first = shortcut_first(repeats, a, b);
          }
          if (mobileo_bf16_conv(image, batch, height, width, channels, taps + (2 * a + b) * parity_weights, 2, 2,
                                out_channels, 1 - a, 1 - b, nullptr, addend != nullptr,
                                result + ((size_t)a * 2 * width + b) * out_channels, line, pixel, &extras) != 0)
            throw std::runtime_error("MobileoBf16SubpixelConv: no AVX512-BF16 here, or out of memory");
        }
    });
  }

 private:
  int repeats_;
  bool has_bias_;
};

mx::array bf16_subpixel_conv(const mx::array &x, const mx::array &weights, const std::optional<mx::array> &init,
                             const std::optional<mx::array> &bias, int repeats, const mx::StreamOrDevice &where) {
  const auto stream = cpu_stream(where, "bf16_subpixel_conv");
  require(mobileo_bf16_gemm_supported(), "mobileo bf16_subpixel_conv: this CPU has no AVX512-BF16");
  require(x.dtype() == mx::float32 && weights.dtype() == mx::float32 && (!init || init->dtype() == mx::float32) &&
              (!bias || bias->dtype() == mx::float32),
          "mobileo bf16_subpixel_conv: float32 only");
  require(x.ndim() == 4 && x.size() > 0, "mobileo bf16_subpixel_conv: x [B, H, W, C]");
  const int out_channels = weights.ndim() == 6 ? weights.shape(2) : 0;
  require(weights.ndim() == 6 && weights.shape(0) == 2 && weights.shape(1) == 2 && weights.shape(3) == 2 &&
              weights.shape(4) == 2 && weights.shape(5) == x.shape(3) && out_channels > 0,
          "mobileo bf16_subpixel_conv: weights [2, 2, O, 2, 2, C]");
  const mx::Shape shape = {x.shape(0), 2 * x.shape(1), 2 * x.shape(2), out_channels};
  require(init.has_value() != (repeats > 0), "mobileo bf16_subpixel_conv: init, or the shortcut's repeats");
  require(!init || init->shape() == shape, "mobileo bf16_subpixel_conv: init [B, 2H, 2W, O]");
  require(!bias || repeats > 0, "mobileo bf16_subpixel_conv: a bias comes with the shortcut");
  require(repeats == 0 || (4 % repeats == 0 && x.shape(3) * repeats == 4 * out_channels),
          "mobileo bf16_subpixel_conv: repeats dividing 4, and C * repeats == 4 O");
  require(!bias || (bias->ndim() == 1 && bias->shape(0) == out_channels), "mobileo bf16_subpixel_conv: bias [O]");
  Arrays inputs = {mx::contiguous(x, false, stream), mx::contiguous(weights, false, stream)};
  if (init) inputs.push_back(mx::contiguous(*init, false, stream));
  if (bias) inputs.push_back(mx::contiguous(*bias, false, stream));
  return mx::array(shape, mx::float32, std::make_shared<Bf16SubpixelConv>(stream, repeats, bias.has_value()),
                   std::move(inputs));
}

void register_bf16_conv(nb::module_ &m) {
  m.def("bf16_conv", &bf16_conv, nb::arg("x"), nb::arg("weight"), nb::arg("bias").none(), nb::arg("padding"),
        nb::kw_only(), nb::arg("init").none() = nb::none(), nb::arg("silu") = false,
        nb::arg("norm_weight").none() = nb::none(), nb::arg("norm_bias").none() = nb::none(),
        nb::arg("norm_eps") = 0.0f, nb::arg("residual").none() = nb::none(), nb::arg("stream") = nb::none());
  m.def("bf16_subpixel_conv", &bf16_subpixel_conv, nb::arg("x"), nb::arg("weights"),
        nb::arg("init").none() = nb::none(), nb::kw_only(), nb::arg("bias").none() = nb::none(),
        nb::arg("repeats") = 0, nb::arg("stream") = nb::none());
}

}  // namespace

NB_MODULE(primitives_ext, m) {
  m.doc() = "mobileo-mlx's native CPU kernels as MLX graph nodes (see kernels/primitives.py)";
  m.attr("BUILT_FOR_MLX") = nb::str(BUILT_FOR_MLX);
  // Fails with TypeError when this module's nanobind does not share mlx.core's type registry.
  m.def("ndim", [](const mx::array &a) { return a.ndim(); });
  m.def("bf16_supported", []() { return mobileo_bf16_gemm_supported() != 0; });
  m.def("bf16_products_done", []() { return mobileo_bf16_products_done(); });
  m.def("bf16_amx_products_done", []() { return mobileo_bf16_amx_products_done(); });
  m.def("bf16_amx_available", []() { return mobileo_bf16_amx_available() != 0; });
  m.def("bf16_kernel", []() { return std::string(mobileo_bf16_gemm_kernel()); });
  m.def("bf16_release", []() { mobileo_bf16_release(); });
  m.def("gelu", &gelu, nb::arg("x"), nb::kw_only(), nb::arg("stream") = nb::none());
  m.def("depthwise_conv2d", &depthwise_conv2d, nb::arg("x"), nb::arg("weight"), nb::arg("bias").none(),
        nb::arg("stride"), nb::arg("padding"), nb::kw_only(), nb::arg("stream") = nb::none());
  m.def("quantized_gemv", &quantized_gemv, nb::arg("x"), nb::arg("packed"), nb::arg("scales"), nb::arg("biases"),
        nb::arg("bits"), nb::arg("group_size"), nb::kw_only(), nb::arg("stream") = nb::none());
  m.def("dequantize", &dequantize, nb::arg("packed"), nb::arg("scales"), nb::arg("biases"), nb::arg("bits"),
        nb::arg("group_size"), nb::kw_only(), nb::arg("stream") = nb::none());
  m.def("bf16_matmul", &bf16_matmul, nb::arg("a"), nb::arg("b"), nb::kw_only(), nb::arg("c").none() = nb::none(),
        nb::arg("stream") = nb::none());
  m.def("bf16_matmul_q8", &bf16_matmul_q8, nb::arg("x"), nb::arg("values"), nb::arg("scales"), nb::arg("biases"),
        nb::arg("group_size"), nb::kw_only(), nb::arg("bias").none() = nb::none(),
        nb::arg("norm_shift").none() = nb::none(), nb::arg("norm_scale").none() = nb::none(),
        nb::arg("norm_eps") = 0.0f, nb::arg("residual").none() = nb::none(), nb::arg("gate").none() = nb::none(),
        nb::arg("stream") = nb::none());
  m.def("bf16_matmul_q4", &bf16_matmul_q4, nb::arg("x"), nb::arg("packed"), nb::arg("scales"), nb::arg("biases"),
        nb::arg("group_size"), nb::kw_only(), nb::arg("bias").none() = nb::none(), nb::arg("stream") = nb::none());
  register_gated_depthwise(m);
  register_elementwise(m);
  register_attention(m);
  register_bf16_conv(m);
}
