"""The native CPU kernels as nodes of MLX's graph, beside their plain-MLX twins.

``native/primitives.cpp`` (built by setup.py into ``native/primitives_ext*.so``, linked to
the C kernels' library) defines one MLX ``Primitive`` per kernel. Calling a function here
only adds a node to the graph, exactly like an MLX operation: nothing is evaluated, the
output is a new array MLX allocates when it evaluates the node on the CPU stream it was
built on, and the node composes with ``mx.compile``, streams (``with mx.stream(s)``) and
the rest of the graph. ``mx.grad`` / ``mx.jvp`` / ``mx.vmap`` work too: they transform the
kernel's plain-MLX formula (the C has no derivative of its own).

Each kernel has a plain-MLX twin beside it (``gelu_reference``, ``kernels.depthwise.shift_add``,
``mx.quantized_matmul``, ``bf16_matmul_reference``, ``bf16_matmul_q8_reference``,
``bf16_conv_reference``) and a ``*_supported`` check of the dtypes and shapes it takes; the CPU
backend (``mobileo_mlx.backends.cpu``) chooses between them, and takes the twin under
``MOBILEO_MLX_KERNELS=twin``, and where the extension is missing (no C++ compiler when the
package was built) or was built against another MLX (its C++ ABI is not stable between
releases): :func:`unavailable_reason` says which.
"""

from __future__ import annotations

import importlib
import sys

import mlx.core as mx

_MODULE = "mobileo_mlx.kernels.native.primitives_ext"
_extension = None
_error: str | None = None


def _release(version: str) -> tuple[int, ...]:
    parts = []
    for part in version.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def extension():
    """The compiled module, or None (see :func:`unavailable_reason`)."""
    global _extension, _error
    if _extension is not None or _error is not None:
        return _extension
    try:
        module = importlib.import_module(_MODULE)
    except ModuleNotFoundError:
        _error = ("not built (no C++ compiler, or no C kernels, when the package was installed?)"
                  if sys.platform.startswith("linux") else "built on Linux only (MLX computes on the GPU here)")
        return None
    except ImportError as error:  # built, but the loader refused it (a missing symbol, say)
        _error = f"not loadable: {error}"
        return None
    if _release(module.BUILT_FOR_MLX) != _release(mx.__version__):
        _error = f"built for mlx {module.BUILT_FOR_MLX}, this is mlx {mx.__version__}: reinstall mobileo-mlx"
        return None
    try:
        module.ndim(mx.array(0.0))
    except TypeError:  # another nanobind ABI than mlx.core's: mx.array is not the type it knows
        _error = "built with a nanobind that does not share mlx's types: reinstall mobileo-mlx"
        return None
    _extension = module
    return module


def unavailable_reason() -> str | None:
    """None when the graph nodes can run here, else why not (one line)."""
    extension()
    return _error


def available() -> bool:
    """Whether the graph nodes can be built here (the extension is loaded)."""
    return extension() is not None


def _float32(*arrays) -> bool:
    return all(a is None or a.dtype == mx.float32 for a in arrays)


# ---------------------------------------------------------------------------------------- GELU
def gelu_reference(x: mx.array) -> mx.array:
    """The exact GELU, x * Phi(x), in MLX operations."""
    return x * (1 + mx.erf(x * 0.7071067811865476)) * 0.5


def gelu_supported(x: mx.array) -> bool:
    return available() and _float32(x)


def gelu(x: mx.array) -> mx.array:
    """Exact (erf) GELU by the native kernel, float32: bit for bit the CPU backend's MLX form
    (``backends.cpu.activations.gelu``), whose algorithm it vectorises."""
    return extension().gelu(x)


# ------------------------------------------------------------------------------ depthwise conv
def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def depthwise_supported(x: mx.array, weight: mx.array, bias: mx.array | None, stride, padding) -> bool:
    """Whether :func:`depthwise_conv2d` takes this conv natively (else: the twin)."""
    if not (available() and x.ndim == 4 and weight.ndim == 4 and _float32(x, weight, bias)):
        return False
    channels = x.shape[-1]
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    kh, kw = weight.shape[1], weight.shape[2]
    return (weight.shape[0] == channels and weight.shape[3] == 1 and channels % 8 == 0 and channels > 0
            and (bias is None or bias.shape == (channels,)) and sh >= 1 and sw >= 1 and ph >= 0 and pw >= 0
            and x.shape[1] + 2 * ph >= kh and x.shape[2] + 2 * pw >= kw and x.size > 0)


def depthwise_conv2d(x: mx.array, weight: mx.array, bias: mx.array | None = None, stride=1,
                     padding=None) -> mx.array:
    """Depthwise conv (``groups = C``), NHWC: x [B,H,W,C], weight [C,kh,kw,1], bias [C] or None;
    ``padding`` defaults to ``kh // 2``; float32, C a multiple of 8 (:func:`depthwise_supported`).
    Its twin: ``kernels.depthwise.shift_add``."""
    pad = weight.shape[1] // 2 if padding is None else padding
    return extension().depthwise_conv2d(x, weight, bias, _pair(stride), _pair(pad))


# ------------------------------------------------------------------------------ quantized GEMV
MAX_ROWS = 8  # the kernel keeps one accumulator per row in registers


def quantized_gemv_supported(x, packed, scales, biases, bits: int, group_size: int) -> bool:
    """Whether :func:`quantized_gemv` takes this product (its twin: ``mx.quantized_matmul``)."""
    if not (available() and bits in (4, 8) and x.ndim >= 1 and packed.ndim == 2):
        return False
    per_word = 32 // bits
    k = x.shape[-1]
    rows = x.size // k if k else 0
    return (0 < rows <= MAX_ROWS and group_size > 0 and group_size % (8 * per_word) == 0 and k % group_size == 0
            and packed.dtype == mx.uint32 and packed.shape[1] * per_word == k and _float32(x, scales, biases)
            and scales.shape == biases.shape == (packed.shape[0], k // group_size))


def quantized_gemv(x: mx.array, packed: mx.array, scales: mx.array, biases: mx.array, bits: int,
                   group_size: int) -> mx.array:
    """``x @ W.T`` for ``W`` quantized in MLX's affine layout (``mx.quantize``): x [..., K] with at
    most ``MAX_ROWS`` rows, packed [N, K * bits / 32] -> [..., N]; the same products as
    ``mx.quantized_matmul``, summed in another order."""
    return extension().quantized_gemv(x, packed, scales, biases, bits, group_size)


# ------------------------------------------------------------------------------ dequantize
def dequantize_supported(packed: mx.array, scales: mx.array, biases: mx.array, bits: int, group_size: int) -> bool:
    """Whether :func:`dequantize` takes these weights (its twin: ``mx.dequantize``)."""
    if not (available() and bits in (4, 8) and packed.ndim == 2 and packed.dtype == mx.uint32):
        return False
    k = packed.shape[1] * (32 // bits)
    return (group_size > 0 and group_size % 8 == 0 and k % group_size == 0 and _float32(scales, biases)
            and scales.shape == biases.shape == (packed.shape[0], k // group_size))


def dequantize(packed: mx.array, scales: mx.array, biases: mx.array, bits: int, group_size: int) -> mx.array:
    """``mx.dequantize`` of MLX's affine 4- or 8-bit layout into float32 [N, K], every core working
    (the multiply and the add rounded separately, as MLX's formula)."""
    return extension().dequantize(packed, scales, biases, bits, group_size)


# ------------------------------------------------------------------------------ bfloat16 GEMM
def bf16_matmul_reference(a: mx.array, b: mx.array, c: mx.array | None = None) -> mx.array:
    """[c +] the products of the bfloat16-rounded operands, summed in float32, in MLX operations."""
    product = a.astype(mx.bfloat16).astype(mx.float32) @ b.astype(mx.bfloat16).astype(mx.float32)
    return product if c is None else c + product


def bf16_supported() -> bool:
    """Whether :func:`bf16_matmul` can run here (the nodes built, a CPU with AVX512-BF16)."""
    return available() and extension().bf16_supported()


def bf16_kernel() -> str | None:
    """The bf16 GEMM's kernel in this process: ``"amx"`` (AMX tiles) or ``"avx512-bf16"`` (the
    AVX512-BF16 register tile); None where :func:`bf16_matmul` cannot run. Chosen once, at the
    first product, by ``$MOBILEO_MLX_BF16_GEMM``: ``auto`` (the default) or ``amx``, AMX where the
    CPU has AMX-BF16 and Linux grants the tile state; ``avx512``, never AMX."""
    return extension().bf16_kernel() if bf16_supported() else None


def bf16_matmul_supported(a: mx.array, b: mx.array, c: mx.array | None = None) -> bool:
    """Whether :func:`bf16_matmul` takes these operands (its twin: :func:`bf16_matmul_reference`)."""
    return (bf16_supported() and _float32(a, b, c) and a.ndim >= 1 and b.ndim == 2 and a.shape[-1] == b.shape[0]
            and a.size > 0 and b.size > 0)


def bf16_matmul(a: mx.array, b: mx.array, c: mx.array | None = None) -> mx.array:
    """``[c +] a @ b`` for float32 a [..., K], b [K, N] (c broadcastable to [..., N]) with bfloat16
    products and float32 sums, by the AMX or AVX512-BF16 GEMM (:func:`bf16_kernel`); any layout of the operands (a
    transposed ``b`` such as a Linear layer's ``W.T`` is read in place), and ``c``'s buffer is
    taken over for the result when no one else holds it."""
    if c is None:
        return extension().bf16_matmul(a, b)
    return extension().bf16_matmul(a, b, c=c)


# ---------------------------------------------------------------- bfloat16 GEMM, 8-bit weights
def dequantize_k_major_reference(values: mx.array, scales: mx.array, biases: mx.array, group_size: int) -> mx.array:
    """W [K, N] = values * scales + biases for K-major 8-bit values [K, N] (uint8), scales and biases
    [K / group_size, N], in float32 MLX operations (the product, then the bias: two roundings)."""
    groups, outputs = scales.shape
    grouped = values.reshape(groups, group_size, outputs).astype(mx.float32)
    return (grouped * scales[:, None, :] + biases[:, None, :]).reshape(groups * group_size, outputs)


def bf16_matmul_q8_reference(x: mx.array, values: mx.array, scales: mx.array, biases: mx.array, group_size: int,
                             bias: mx.array | None = None, *, norm: tuple | None = None,
                             residual: mx.array | None = None, gate: mx.array | None = None) -> mx.array:
    """What :func:`bf16_matmul_q8` computes, in MLX operations: x's rows through
    :func:`modulated_layer_norm_reference` first when ``norm`` = (shift, scale, eps) is given, the
    weight dequantized, the products of the bfloat16-rounded operands summed in float32, then the
    bias, then ``residual + result`` (with ``gate``: :func:`gated_residual_reference`)."""
    if norm is not None:
        x = modulated_layer_norm_reference(x, *norm)
    product = bf16_matmul_reference(x, dequantize_k_major_reference(values, scales, biases, group_size))
    if bias is not None:
        product = product + bias
    if residual is None:
        return product
    return residual + product if gate is None else gated_residual_reference(residual, gate, product)


def bf16_matmul_q8_supported(x: mx.array, values: mx.array, scales: mx.array, biases: mx.array, group_size: int,
                             bias: mx.array | None = None, *, norm: tuple | None = None,
                             residual: mx.array | None = None, gate: mx.array | None = None) -> bool:
    """Whether :func:`bf16_matmul_q8` takes these operands (its twin: :func:`bf16_matmul_q8_reference`)."""
    if not (bf16_supported() and x.ndim >= 1 and values.ndim == 2 and values.dtype == mx.uint8
            and _float32(x, scales, biases, bias, residual, gate)):
        return False
    k, n = values.shape
    if not (x.shape[-1] == k and x.size > 0 and n > 0 and group_size > 0 and k % group_size == 0
            and scales.shape == biases.shape == (k // group_size, n) and (bias is None or bias.shape == (n,))):
        return False
    images = x.shape[0] if x.ndim == 3 else 1
    if (norm is not None or gate is not None) and x.ndim not in (2, 3):
        return False
    if norm is not None and not (_float32(*norm[:2]) and all(_per_image(v, images, k) for v in norm[:2])):
        return False
    if residual is not None and residual.shape != (*x.shape[:-1], n):
        return False
    return gate is None or (residual is not None and _per_image(gate, images, n))


def bf16_matmul_q8(x: mx.array, values: mx.array, scales: mx.array, biases: mx.array, group_size: int,
                   bias: mx.array | None = None, *, norm: tuple | None = None,
                   residual: mx.array | None = None, gate: mx.array | None = None) -> mx.array:
    """``x @ W [+ bias]`` for float32 x [..., K] and W [K, N] stored K-major in 8 bits
    (``values * scales + biases``: values [K, N] uint8, scales and biases [K / group_size, N]),
    with bfloat16 products and float32 sums, by the AMX or AVX512-BF16 GEMM: each panel of W is
    dequantized and rounded to bfloat16 as the kernel packs it (no float32 W is ever made) and
    the bias row is added as the result is stored. The bits of :func:`bf16_matmul` on the
    dequantized W followed by ``+ bias``.

    And, without a pass of their own, the operations SANA's blocks wrap around their products:
    ``norm`` = (shift, scale, eps), shift and scale [B, 1, K] for x [B, N, K]: x's rows normalised
    as :func:`modulated_layer_norm` does, as the kernel packs them (the normalised x is never
    stored); ``residual`` [..., N] (+ ``gate`` [B, 1, N]): ``residual [+ gate *] result`` as
    :func:`gated_residual` does, in the store (residual's buffer becomes the output when no one
    else holds it). The same bits as those nodes around the plain product."""
    kwargs = {} if bias is None else {"bias": bias}
    if norm is not None:
        shift, scale, eps = norm
        kwargs.update(norm_shift=shift, norm_scale=scale, norm_eps=float(eps))
    if residual is not None:
        kwargs["residual"] = residual
    if gate is not None:
        kwargs["gate"] = gate
    return extension().bf16_matmul_q8(x, values, scales, biases, group_size, **kwargs)


def bf16_matmul_q4_reference(x: mx.array, packed: mx.array, scales: mx.array, biases: mx.array, group_size: int,
                             bias: mx.array | None = None) -> mx.array:
    """What :func:`bf16_matmul_q4` computes, in MLX operations: ``mx.dequantize``'s W, the products of the
    bfloat16-rounded operands summed in float32, then the bias."""
    weight = mx.dequantize(packed, scales, biases, group_size=group_size, bits=4)
    product = bf16_matmul_reference(x, weight.T)
    return product if bias is None else product + bias


def bf16_matmul_q4_supported(x: mx.array, packed: mx.array, scales: mx.array, biases: mx.array, group_size: int,
                             bias: mx.array | None = None) -> bool:
    """Whether :func:`bf16_matmul_q4` takes these (its twin: :func:`bf16_matmul_q4_reference`)."""
    if not (bf16_supported() and x.ndim >= 1 and packed.ndim == 2 and packed.dtype == mx.uint32
            and _float32(x, scales, biases, bias)):
        return False
    n, words = packed.shape
    k = words * 8
    return (x.shape[-1] == k and x.size > 0 and n > 0 and group_size >= 32 and group_size % 32 == 0
            and k % group_size == 0 and scales.shape == biases.shape == (n, k // group_size)
            and (bias is None or bias.shape == (n,)))


def bf16_matmul_q4(x: mx.array, packed: mx.array, scales: mx.array, biases: mx.array, group_size: int,
                   bias: mx.array | None = None) -> mx.array:
    """``x @ W.T [+ bias]`` for float32 x [..., K] and W [N, K] in MLX's 4-bit affine layout (a quantized
    Linear's packed [N, K / 8] words, scales and biases [N, K / group_size]), with bfloat16 products and
    float32 sums: each panel of W dequantized (``mx.dequantize``'s two roundings) and rounded to bfloat16 as
    the GEMM packs it (no float32 W is made), the bias added in the store. The bits of :func:`bf16_matmul`
    on :func:`dequantize`'s W.T followed by ``+ bias``."""
    return extension().bf16_matmul_q4(x, packed, scales, biases, group_size, bias=bias)


def status() -> str:
    """One line for ``mobileo-mlx doctor``."""
    reason = unavailable_reason()
    if reason is not None:
        return f"unavailable: {reason}"
    kernel = bf16_kernel()
    return "MLX graph nodes" if kernel is None else f"MLX graph nodes (bf16 GEMM: {kernel})"


__all__ = [
    "MAX_ROWS", "available", "bf16_conv", "bf16_conv3x3", "bf16_conv3x3_reference", "bf16_conv3x3_supported",
    "bf16_conv_reference", "bf16_conv_supported", "bf16_kernel", "bf16_subpixel_conv", "bf16_subpixel_conv_reference",
    "bf16_subpixel_conv_supported", "subpixel_shortcut_reference", "bf16_matmul", "bf16_matmul_q4",
    "bf16_matmul_q4_reference", "bf16_matmul_q4_supported", "bf16_matmul_q8", "bf16_matmul_q8_reference",
    "bf16_matmul_q8_supported", "bf16_matmul_reference", "bf16_matmul_supported", "bf16_supported",
    "dequantize", "dequantize_k_major_reference", "dequantize_supported",
    "depthwise_conv2d", "depthwise_supported", "extension", "gated_depthwise", "gated_depthwise_reference",
    "gated_depthwise_supported", "gelu", "gelu_reference", "gelu_supported", "quantized_gemv", "quantized_gemv_supported", "status", "unavailable_reason",
]


# ------------------------------------------------------------------ GLUMBConv's gated depthwise
def gated_depthwise_reference(h: mx.array, weight: mx.array, bias: mx.array | None = None) -> mx.array:
    """GLUMBConv's middle in plain MLX: SiLU, the depthwise conv (stride 1, padding k // 2) + bias
    over 2C channels, then values * SiLU(gates): h [B, H, W, 2C], weight [2C, k, k, 1] -> [B, H, W, C]."""
    silu = lambda v: v * mx.sigmoid(v)  # noqa: E731  (nn.silu)
    k = weight.shape[1]
    d = mx.conv2d(silu(h), weight, padding=k // 2, groups=h.shape[-1])
    if bias is not None:
        d = d + bias
    values, gates = mx.split(d, 2, axis=-1)
    return values * silu(gates)


def gated_depthwise_supported(h: mx.array, weight: mx.array, bias: mx.array | None = None) -> bool:
    """Whether :func:`gated_depthwise` takes these (float32, C a multiple of 8, a square kernel
    of odd size, one output channel per input channel)."""
    if not (available() and h.ndim == 4 and weight.ndim == 4 and _float32(h, weight, bias)):
        return False
    channels, k = h.shape[-1], weight.shape[1]
    return (channels > 0 and channels % 16 == 0 and weight.shape == (channels, k, k, 1) and k % 2 == 1
            and (bias is None or bias.shape == (channels,)) and h.size > 0)


def gated_depthwise(h: mx.array, weight: mx.array, bias: mx.array | None = None) -> mx.array:
    """:func:`gated_depthwise_reference` by one native kernel (``native/gated_depthwise.c``): each
    SiLU computed once, the 2C-channel conv output never written to memory. Bit for bit the CPU
    backend's MLX form of it (``backends.cpu.layers.gated_depthwise`` under
    ``MOBILEO_MLX_KERNELS=twin``); within a few float32 ulps of the plain formula."""
    return extension().gated_depthwise(h, weight, bias)


# ------------------------------------------------------------------ grouped 1x1 conv
def grouped_pointwise_reference(x: mx.array, weight: mx.array, groups: int) -> mx.array:
    """A grouped 1x1 conv without bias in MLX operations (``dcae.GroupedPointwise``'s form): x [..., C],
    weight [C, C / groups] (row g size + o: the group's output o), a batched matmul per (row, group)."""
    *lead, channels = x.shape
    size = channels // groups
    y = x.reshape(*lead, groups, 1, size) @ weight.reshape(groups, size, size).swapaxes(1, 2)
    return y.reshape(*lead, channels)


def grouped_pointwise_supported(x: mx.array, weight: mx.array, groups: int) -> bool:
    if not (available() and _float32(x, weight) and x.ndim >= 1 and x.size > 0 and groups >= 1
            and x.shape[-1] % groups == 0):
        return False
    size = x.shape[-1] // groups
    return weight.shape == (x.shape[-1], size) and size % 16 == 0 and size <= 64


def grouped_pointwise(x: mx.array, weight: mx.array, groups: int) -> mx.array:
    """:func:`grouped_pointwise_reference` by the native kernel (``native/grouped_pointwise.c``): the rows
    split over every core, eight rows at a time against each group's weight in registers, float32 sums in
    order (not the twin's BLAS order: equal to float32 summation error)."""
    return extension().grouped_pointwise(x, weight, groups)


__all__ += ["grouped_pointwise", "grouped_pointwise_reference", "grouped_pointwise_supported"]


# ------------------------------------------------------------------------ SiLU and its gate
def silu_reference(x: mx.array) -> mx.array:
    """SiLU, x * sigmoid(x), in MLX operations (``nn.silu``)."""
    return x * mx.sigmoid(x)


def silu_supported(x: mx.array) -> bool:
    return available() and _float32(x) and x.size > 0


def silu(x: mx.array) -> mx.array:
    """SiLU by the native kernel (``native/silu.c``), float32, every core: bit for bit the CPU
    backend's MLX form (``backends.cpu.activations.silu``), whose algorithm it vectorises; within
    3e-7 relative of the float64 SiLU, as that form."""
    return extension().silu(x)


def glu_silu_reference(a: mx.array, g: mx.array) -> mx.array:
    """a * silu(g) in MLX operations."""
    return a * silu_reference(g)


def glu_silu_supported(a: mx.array, g: mx.array) -> bool:
    """float32 a and g of one shape (the CPU form broadcasts a smaller g itself, in MLX)."""
    return available() and _float32(a, g) and a.shape == g.shape and a.size > 0


def glu_silu(a: mx.array, g: mx.array) -> mx.array:
    """a * silu(g) by the native kernel: bit for bit ``backends.cpu.activations.glu_silu``."""
    return extension().glu_silu(a, g)


# ------------------------------------------------------------------- RMSNorm + bias [+ residual]
def rms_norm_residual_reference(y: mx.array, weight: mx.array, bias: mx.array, eps: float,
                                residual: mx.array | None = None) -> mx.array:
    """``[residual +] (mx.fast.rms_norm(y, weight, eps) + bias)``: the DC-AE's RMSNorm (weight and
    bias) over the last axis, with its block's residual."""
    normed = mx.fast.rms_norm(y, weight, eps) + bias
    return normed if residual is None else residual + normed


def rms_norm_residual_supported(y: mx.array, weight: mx.array, bias: mx.array,
                                residual: mx.array | None = None) -> bool:
    if not (available() and _float32(y, weight, bias, residual) and y.ndim >= 1 and y.size > 0):
        return False
    dim = y.shape[-1]
    return weight.shape == bias.shape == (dim,) and (residual is None or residual.shape == y.shape)


def rms_norm_residual(y: mx.array, weight: mx.array, bias: mx.array, eps: float,
                      residual: mx.array | None = None) -> mx.array:
    """:func:`rms_norm_residual_reference` in one pass by the native kernel (``native/norms.c``),
    float32, every core. Each row's sum of squares is taken in index order, as MLX's CPU
    reduction takes it on x86-64, so the result is the twin's bit for bit there (elsewhere a
    few ulps). ``y`` and ``residual`` are read through their row strides (a cropped view costs
    no copy); ``y``'s buffer becomes the output when no one else holds it."""
    return extension().rms_norm_residual(y, weight, bias, float(eps), residual)


# -------------------------------------------------------- SANA: modulated LayerNorm, gated residual
def modulated_layer_norm_reference(x: mx.array, shift: mx.array, scale: mx.array, eps: float) -> mx.array:
    """LayerNorm over the last axis without affine, then ``* (1 + scale) + shift`` (SANA's AdaLN
    modulation): x [B, N, D], shift and scale broadcastable to [B, 1, D]."""
    return mx.fast.layer_norm(x, None, None, eps) * (1 + scale) + shift


def _per_image(v: mx.array, batch: int, dim: int) -> bool:
    if v.ndim > 3:
        return False
    shape = (1,) * (3 - v.ndim) + tuple(v.shape)
    return shape[0] in (1, batch) and shape[1] == 1 and shape[2] in (1, dim)


def modulated_layer_norm_supported(x: mx.array, shift: mx.array, scale: mx.array) -> bool:
    if not (available() and _float32(x, shift, scale) and x.ndim == 3 and x.size > 0):
        return False
    batch, _, dim = x.shape
    return _per_image(shift, batch, dim) and _per_image(scale, batch, dim)


def modulated_layer_norm(x: mx.array, shift: mx.array, scale: mx.array, eps: float) -> mx.array:
    """:func:`modulated_layer_norm_reference` in one pass by the native kernel (``native/norms.c``),
    float32, every core; the mean and the variance summed in index order, as MLX's CPU reduction
    sums them on x86-64: bit for bit the twin there."""
    return extension().modulated_layer_norm(x, shift, scale, float(eps))


def gated_residual_reference(x: mx.array, gate: mx.array, update: mx.array) -> mx.array:
    """``x + gate * update``: x and update [B, N, D], gate broadcastable to [B, 1, D]."""
    return x + gate * update


def gated_residual_supported(x: mx.array, gate: mx.array, update: mx.array) -> bool:
    if not (available() and _float32(x, gate, update) and x.ndim == 3 and x.size > 0 and update.shape == x.shape):
        return False
    return _per_image(gate, x.shape[0], x.shape[2])


def gated_residual(x: mx.array, gate: mx.array, update: mx.array) -> mx.array:
    """:func:`gated_residual_reference` in one pass by the native kernel, every core: the same
    two roundings, so its bits; x's buffer becomes the output when no one else holds it."""
    return extension().gated_residual(x, gate, update)


__all__ += [
    "glu_silu", "glu_silu_reference", "glu_silu_supported", "gated_residual", "gated_residual_reference",
    "gated_residual_supported", "modulated_layer_norm", "modulated_layer_norm_reference",
    "modulated_layer_norm_supported", "rms_norm_residual", "rms_norm_residual_reference",
    "rms_norm_residual_supported", "silu", "silu_reference", "silu_supported",
]

# ------------------------------------------------------------- attention cores (SANA DiT, DC-AE)
# Both nodes take q, k, v [B, heads, rows, d] as the models pass them (views of their merged
# [B, rows, heads * d] projections, read in place) and store their output [B, heads, N, d_v] as
# [B, N, heads, d_v], so the models' merge of the heads back is a view, not a copy.
def attention_supported() -> bool:
    """Whether the attention nodes can run here (the nodes built, a CPU with AVX-512F)."""
    return available() and extension().attention_supported()


def _heads(q: mx.array, k: mx.array, v: mx.array) -> bool:
    return (q.ndim == k.ndim == v.ndim == 4 and _float32(q, k, v) and q.shape[:2] == k.shape[:2] == v.shape[:2]
            and k.shape[3] == q.shape[3] and v.shape[2] == k.shape[2] and q.size > 0 and k.size > 0 and v.size > 0)


def causal_mask(queries: int, keys: int) -> mx.array:
    """The additive [queries, keys] mask of causal attention whose last query is the last key
    (mlx-lm's "causal" with a prompt cache's offset): 0 where key l <= i + keys - queries, -inf
    elsewhere."""
    rows = mx.arange(keys - queries, keys)[:, None]
    return mx.where(rows >= mx.arange(keys)[None, :], 0.0, -mx.inf)


def softmax_attention_reference(q: mx.array, k: mx.array, v: mx.array, scale: float,
                                key_bias: mx.array | None = None, causal: bool = False) -> mx.array:
    """softmax(q k^T * scale + key_bias [+ causal_mask]) v in MLX operations (float32, MLX's
    precise softmax); k and v with fewer heads than q are repeated (query head h reads KV head
    h // (H / H_kv))."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = mx.repeat(k, group, axis=1), mx.repeat(v, group, axis=1)
    scores = (q * scale) @ k.swapaxes(-1, -2)
    if key_bias is not None:
        scores = scores + key_bias
    if causal:
        scores = scores + causal_mask(q.shape[2], k.shape[2])
    return mx.softmax(scores, axis=-1, precise=True) @ v


def _grouped_heads(q: mx.array, k: mx.array, v: mx.array) -> bool:
    return (q.ndim == k.ndim == v.ndim == 4 and _float32(q, k, v) and q.shape[0] == k.shape[0] == v.shape[0]
            and k.shape[1] == v.shape[1] and k.shape[1] > 0 and q.shape[1] % k.shape[1] == 0
            and k.shape[3] == q.shape[3] and v.shape[2] == k.shape[2] and q.size > 0 and k.size > 0 and v.size > 0)


def softmax_attention_supported(q: mx.array, k: mx.array, v: mx.array, key_bias: mx.array | None = None,
                                causal: bool = False) -> bool:
    """Whether :func:`softmax_attention` takes these: float32 q [B, H, N, d], k [B, H_kv, L, d],
    v [B, H_kv, L, d_v] with H_kv dividing H, key_bias None or [B or 1, 1, 1, L] (one additive
    bias per key); causal needs L >= N."""
    if not (attention_supported() and _grouped_heads(q, k, v)) or (causal and k.shape[2] < q.shape[2]):
        return False
    return key_bias is None or (_float32(key_bias) and key_bias.ndim == 4 and key_bias.shape[1:3] == (1, 1)
                                and key_bias.shape[0] in (1, q.shape[0]) and key_bias.shape[3] == k.shape[2])


def softmax_attention(q: mx.array, k: mx.array, v: mx.array, scale: float,
                      key_bias: mx.array | None = None, causal: bool = False) -> mx.array:
    """softmax(q k^T * scale + key_bias [+ causal_mask]) v for q [B, H, N, d], k [B, H_kv, L, d],
    v [B, H_kv, L, d_v] (:func:`softmax_attention_supported`; grouped-query heads read their KV
    head in place, not repeated) by one native node (``native/attention.c``): per image, head
    and block of query rows the scores stay in L1, the exponentials by the kernel's own
    vectorised exp, the normalisation one division of the output; causal: the key blocks past a
    group of rows' last key are not computed. Float32; within a few ulps of
    :func:`softmax_attention_reference` (kernels/README.md)."""
    return extension().softmax_attention(q, k, v, float(scale), key_bias, bool(causal))


def relu_linear_attention_reference(q: mx.array, k: mx.array, v: mx.array, eps: float) -> mx.array:
    """relu(q) (relu(k)^T v) / (relu(q) . sum_rows relu(k) + eps) in float32 MLX operations (the
    formula of ``models.common.relu_linear_attention``)."""
    q, k = mx.maximum(q, 0), mx.maximum(k, 0)
    kv = k.swapaxes(-1, -2) @ v
    denominator = mx.sum(q * mx.sum(k, axis=-2, keepdims=True), axis=-1, keepdims=True)
    return (q @ kv) / (denominator + eps)


def relu_linear_attention_supported(q: mx.array, k: mx.array, v: mx.array) -> bool:
    """Whether :func:`relu_linear_attention` takes these: float32 q [B, H, N, d], k [B, H, M, d],
    v [B, H, M, d_v]."""
    return attention_supported() and _heads(q, k, v)


def relu_linear_attention(q: mx.array, k: mx.array, v: mx.array, eps: float) -> mx.array:
    """:func:`relu_linear_attention_reference` by one native node (``native/attention.c``): per
    image and head relu(k)^T v and sum relu(k) in registers, then each query row; float32 sums,
    in another order than the twin's (kernels/README.md)."""
    return extension().relu_linear_attention(q, k, v, float(eps))


__all__ += ["attention_supported", "causal_mask", "relu_linear_attention", "relu_linear_attention_reference",
            "relu_linear_attention_supported", "softmax_attention", "softmax_attention_reference",
            "softmax_attention_supported"]

# ------------------------------------------------------------------ bfloat16 conv (implicit GEMM)
def bf16_conv_reference(x: mx.array, weight: mx.array, bias: mx.array | None = None, padding=(1, 1),
                        init: mx.array | None = None, silu: bool = False, norm: tuple | None = None,
                        residual: mx.array | None = None) -> mx.array:
    """What :func:`bf16_conv` computes, in MLX operations: [init +] the stride-1 conv of the
    bfloat16-rounded operands, summed in float32, whose output has the input's size (``padding``
    rows above / columns left of the map, the rest below / right) [+ bias], then [SiLU] or
    [:func:`rms_norm_residual_reference` with ``norm`` = (weight, bias, eps) and ``residual``]."""
    rounded = lambda v: v.astype(mx.bfloat16).astype(mx.float32)  # noqa: E731
    kh, kw = weight.shape[1], weight.shape[2]
    (top, left) = _pair(padding)
    y = mx.conv_general(rounded(x), rounded(weight), padding=([top, left], [kh - 1 - top, kw - 1 - left]))
    if init is not None:
        y = init + y
    y = y if bias is None else y + bias
    if norm is not None:
        return rms_norm_residual_reference(y, *norm, residual)
    return silu_reference(y) if silu else y


def bf16_conv_supported(x: mx.array, weight: mx.array, bias: mx.array | None = None, padding=(1, 1),
                        init: mx.array | None = None, silu: bool = False, norm: tuple | None = None,
                        residual: mx.array | None = None) -> bool:
    """Whether :func:`bf16_conv` takes these (its twin: :func:`bf16_conv_reference`)."""
    norm_arrays = () if norm is None else norm[:2]
    if not (bf16_supported() and x.ndim == 4 and weight.ndim == 4
            and _float32(x, weight, bias, init, residual, *norm_arrays)):
        return False
    (top, left) = _pair(padding)
    out = weight.shape[0]
    shape = (*x.shape[:3], out)
    return (x.shape[3] == weight.shape[3] and x.size > 0 and weight.size > 0 and 0 <= top < weight.shape[1]
            and 0 <= left < weight.shape[2] and all(v is None or v.shape == (out,) for v in (bias, *norm_arrays))
            and (init is None or init.shape == shape) and not (silu and norm is not None)
            and (residual is None or (norm is not None and residual.shape == shape)))


def bf16_conv(x: mx.array, weight: mx.array, bias: mx.array | None = None, padding=(1, 1),
              init: mx.array | None = None, silu: bool = False, norm: tuple | None = None,
              residual: mx.array | None = None) -> mx.array:
    """[init +] conv(x, weight) [+ bias] with bfloat16 products and float32 sums, one node: x [B, H, W, C],
    weight [O, kh, kw, C] (MLX's layout), stride 1, the output [B, H, W, O] the input's size
    (``padding``: (rows above, columns left of the map)). The bf16 GEMM (:func:`bf16_kernel`) packs
    its A straight from the windows of x, the zero padding made there (no padded copy, no
    im2col), sums K = kh kw C in its tiles and writes the output once, the bias and ``init`` (whose
    buffer it takes over when no one else holds it) added as it stores it, then with ``silu`` SiLU
    (:func:`silu`'s bits), or with ``norm`` = (weight, bias, eps) each pixel's RMSNorm + bias [+ ``residual``]
    once its row of the GEMM is whole, while it is in cache (:func:`rms_norm_residual`'s bits): the map is
    written once."""
    kwargs = {"init": init, "silu": silu, "residual": residual}
    if norm is not None:
        kwargs.update(norm_weight=norm[0], norm_bias=norm[1], norm_eps=float(norm[2]))
    return extension().bf16_conv(x, weight, bias, _pair(padding), **kwargs)


def bf16_conv3x3_reference(x: mx.array, weight: mx.array, bias: mx.array | None = None, silu: bool = False,
                           norm: tuple | None = None, residual: mx.array | None = None) -> mx.array:
    """:func:`bf16_conv3x3`'s twin: the 3x3 conv (padding 1) of the bfloat16-rounded operands, float32 sums."""
    return bf16_conv_reference(x, weight, bias, (1, 1), silu=silu, norm=norm, residual=residual)


def bf16_conv3x3_supported(x: mx.array, weight: mx.array, bias: mx.array | None = None, silu: bool = False,
                           norm: tuple | None = None, residual: mx.array | None = None) -> bool:
    return weight.ndim == 4 and weight.shape[1:3] == (3, 3) and bf16_conv_supported(
        x, weight, bias, (1, 1), silu=silu, norm=norm, residual=residual)


def bf16_conv3x3(x: mx.array, weight: mx.array, bias: mx.array | None = None, silu: bool = False,
                 norm: tuple | None = None, residual: mx.array | None = None) -> mx.array:
    """A 3x3 conv, stride 1, padding 1 (the DC-AE's) by :func:`bf16_conv`: x [B, H, W, C], weight
    [O, 3, 3, C], bias [O] or None -> [B, H, W, O] (``silu``, ``norm``, ``residual``: as there)."""
    return bf16_conv(x, weight, bias, (1, 1), silu=silu, norm=norm, residual=residual)


def subpixel_shortcut_reference(x: mx.array, out_channels: int, repeats: int) -> mx.array:
    """The DC-AE upsampler's shortcut ``pixel_shuffle(repeat_interleave(x, repeats))`` as [B, 2H, 2W, O]: output
    channel o at parity (a, b) is x's channel (4 o + 2 a + b) // repeats."""
    batch, height, width, _ = x.shape
    channel = lambda a, b: (4 * mx.arange(out_channels) + 2 * a + b) // repeats  # noqa: E731
    rows = [mx.stack([mx.take(x, channel(a, b), axis=-1) for b in (0, 1)], axis=3) for a in (0, 1)]
    return mx.stack(rows, axis=2).reshape(batch, 2 * height, 2 * width, out_channels)


def bf16_subpixel_conv_reference(x: mx.array, weights: mx.array, init: mx.array | None = None, *,
                                 bias: mx.array | None = None, repeats: int = 0) -> mx.array:
    """What :func:`bf16_subpixel_conv` computes, in MLX operations: the start (``init``, or the shortcut of
    ``repeats`` [+ ``bias``]) + the four parity convs of the bfloat16-rounded operands (float32 sums),
    interleaved."""
    batch, height, width, _ = x.shape
    out = weights.shape[2]
    parities = [[bf16_conv_reference(x, weights[a, b], None, (1 - a, 1 - b)) for b in (0, 1)] for a in (0, 1)]
    rows = mx.stack([mx.stack(columns, axis=3) for columns in parities], axis=2)  # [B, H, 2, W, 2, O]
    if init is None:
        init = subpixel_shortcut_reference(x, out, repeats)
        init = init if bias is None else init + bias
    return init + rows.reshape(batch, 2 * height, 2 * width, out)


def bf16_subpixel_conv_supported(x: mx.array, weights: mx.array, init: mx.array | None = None, *,
                                 bias: mx.array | None = None, repeats: int = 0) -> bool:
    """Whether :func:`bf16_subpixel_conv` takes these (its twin: :func:`bf16_subpixel_conv_reference`)."""
    if not (bf16_supported() and x.ndim == 4 and weights.ndim == 6 and _float32(x, weights, init, bias)
            and x.size > 0):
        return False
    batch, height, width, channels = x.shape
    out = weights.shape[2]
    if not (weights.shape == (2, 2, out, 2, 2, channels) and out > 0 and (init is None) == (repeats > 0)):
        return False
    if init is not None:
        return init.shape == (batch, 2 * height, 2 * width, out) and bias is None
    return 4 % repeats == 0 and channels * repeats == 4 * out and (bias is None or bias.shape == (out,))


def bf16_subpixel_conv(x: mx.array, weights: mx.array, init: mx.array | None = None, *,
                       bias: mx.array | None = None, repeats: int = 0) -> mx.array:
    """The sub-pixel convs of x, one node: output pixel (2y + a, 2x + b) is the 2x2 conv of
    x [B, H, W, C] by ``weights[a, b]`` ([2, 2, O, 2, 2, C]: parity a, parity b, then MLX's layout)
    reading rows y - 1 + a .. y + a and columns x - 1 + b .. x + b (zeros outside the map) -> [B, 2H,
    2W, O]: a nearest x2 upsampling then a 3x3 conv, with the taps each parity reads summed
    (``backends.cpu.layers.DCUpBlock2d``). Each parity is one :func:`bf16_conv` product stored straight
    into its pixels of the output, added to ``init`` (taken over when no one else holds it), or, with
    ``repeats`` (dividing 4, C · repeats = 4 O), to the DC-AE upsampler's shortcut
    ``pixel_shuffle(repeat_interleave(x, repeats))`` [+ ``bias``], which the stores read from x itself (as
    (shortcut + bias) + sums: the bits of the init it replaces): no map per parity, no interleaving copy,
    no shortcut map."""
    return extension().bf16_subpixel_conv(x, weights, init, bias=bias, repeats=int(repeats))

