"""CPU forms of the models' modules: subclasses of the plain ones with the same parameters,
swapped in at load time (``backends.cpu.table``). Each computes what its plain module
computes, in the form MLX's CPU backend runs fast:

* activations by the fast float32 forms of ``backends.cpu.activations`` (the exact GELU by the
  native kernel, a node of MLX's graph, where it is built);
* depthwise convs by the native kernel or the shift-and-add twin, large ones over two streams;
* attention cores with the fast softmax, linear attention of a CFG pair over two streams; SANA's
  cross-attention and the ReLU linear attention (SANA's, the DC-AE's) by native nodes that read
  the head views in place and write the merged layout;
* GLUMBConv's gated middle by the native node (one pass over every core), else in two pieces,
  one per stream;
* RMSNorm (+ bias, + a block's residual), SANA's AdaLN norms and gated residuals, SiLU and the
  SiLU gate as native nodes (one pass over every core, the bits of their MLX forms);
* FastViT's layer-scaled residuals in one pass each, its large FFNs in row bands;
* the DC-AE's 3x3 convs as window GEMMs (no im2col), its ResBlocks likewise, its nearest-x2
  upsampling convs in sub-pixel form; with bfloat16 products each conv one native node;
* mlx-lm's Qwen2 MLP with the fast SiLU gate, its attention with the fast softmax for a prefill;
* Linear layers of the components that multiply in bfloat16 (``matmul="bf16"``) through the
  bf16 GEMM node; the language model's only while a stage encodes a prompt (:data:`ENCODING`).

The quantized layers are in ``backends.cpu.quantized``.
"""

from __future__ import annotations

import contextlib
import contextvars

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import qwen2

from mobileo_mlx.backends import kernels_mode, tuning
from mobileo_mlx.backends.cpu import activations, streams
from mobileo_mlx.kernels import depthwise as depthwise_kernels
from mobileo_mlx.kernels import primitives
from mobileo_mlx.models import common, dcae, fastvit, sana


def use_kernels() -> bool:
    """Whether the native kernels serve (``MOBILEO_MLX_KERNELS=auto``), else their twins."""
    return kernels_mode() == "auto"


# ------------------------------------------------------------------ products
class Products:
    """How a CPU form multiplies: float32 (OpenBLAS), or bfloat16 operands with float32 sums
    (the bf16 GEMM node) for products of at least ``tuning.BF16_MIN_PRODUCT`` multiply-adds."""

    def __init__(self, bf16: bool):
        self.bf16 = bf16

    def __repr__(self) -> str:
        return "BF16" if self.bf16 else "FP32"

    def takes_bf16(self, rows: int, k: int, n: int) -> bool:
        """Whether a [rows, K] @ [K, N] product runs with bfloat16 operands."""
        return self.bf16 and rows * k * n >= tuning.BF16_MIN_PRODUCT

    def matmul(self, a: mx.array, b: mx.array, c: mx.array | None = None) -> mx.array:
        """``[c +] a @ b`` for a [..., K], b [K, N]."""
        if self.takes_bf16(a.size // max(1, a.shape[-1]), b.shape[0], b.shape[1]):
            if use_kernels() and primitives.bf16_matmul_supported(a, b, c):
                return primitives.bf16_matmul(a, b, c)
            return primitives.bf16_matmul_reference(a, b, c)
        return a @ b if c is None else mx.addmm(c, a, b)


FP32, BF16 = Products(False), Products(True)

# Whether the current stage lets ENCODING products take bfloat16 (backends.stage(encoding=True)):
# a context variable, so a server thread answering a chat keeps float32 while another encodes.
_encoding = contextvars.ContextVar("mobileo_mlx_encoding", default=False)


class EncodingProducts(Products):
    """The language model's products with bf16 CPU matmuls: bfloat16 operands while a stage encodes a
    prompt for a picture (its hidden states condition the DiT; no token is chosen), float32 when it
    answers, where a token choice could flip on a rounding."""

    def __init__(self):  # no fixed choice: the stage makes it
        pass

    @property
    def bf16(self) -> bool:
        return _encoding.get()

    def __repr__(self) -> str:
        return "ENCODING"


ENCODING = EncodingProducts()


@contextlib.contextmanager
def encoding(active: bool = True):
    """Inside: :data:`ENCODING` products take bfloat16 operands (``active``), else float32."""
    token = _encoding.set(active)
    try:
        yield
    finally:
        _encoding.reset(token)


class Bf16Linear(nn.Linear):
    """``nn.Linear`` with bfloat16 products (float32 sums)."""

    products = BF16

    def __call__(self, x: mx.array) -> mx.array:
        return self.products.matmul(x, self["weight"].T, self.get("bias"))


class EncodingLinear(Bf16Linear):
    """``nn.Linear`` with :data:`ENCODING` products."""

    products = ENCODING


# ------------------------------------------------------------------ activations
class SiLU(nn.SiLU):
    def __call__(self, x: mx.array) -> mx.array:
        return activations.silu(x)


class Sigmoid(nn.Sigmoid):
    def __call__(self, x: mx.array) -> mx.array:
        return activations.sigmoid(x)


class GELU(nn.GELU):
    """The exact GELU: the native kernel (float32), else its bit-identical MLX form."""

    def __call__(self, x: mx.array) -> mx.array:
        if self._approx != "none":
            return super().__call__(x)
        if use_kernels() and primitives.gelu_supported(x):
            return primitives.gelu(x)
        return activations.gelu(x)


# ------------------------------------------------------------------ depthwise convs
def depthwise_conv2d(x: mx.array, weight: mx.array, bias: mx.array | None, stride, padding) -> mx.array:
    """A ``groups = C`` conv (weight [C*m, kh, kw, 1]) on the CPU: the native kernel for large
    float32 convs (``m`` > 1: one native conv per output phase, interleaved), else the shift-and-add twin, as
    two channel halves on the two streams when large; inside a piece of ``streams.cpu_pieces``
    the twin, whole (the other stream is busy with the other piece)."""
    kh, kw = weight.shape[1], weight.shape[2]
    (sh, sw) = stride if isinstance(stride, tuple) else (stride, stride)
    steps = sh * sw
    channels = x.shape[-1]
    m = weight.shape[0] // channels
    if (use_kernels() and streams.may_split() and x.size * m * kh * kw // steps >= tuning.DEPTHWISE_NATIVE_MIN_MACS
            and depthwise_kernels.native_supported(x, weight[::m], None if bias is None else bias[::m], stride,
                                                   padding)):
        if m == 1:
            return depthwise_kernels.native(x, weight, bias, stride, padding)
        return _multiplied_native(x, weight, bias, stride, padding, m)
    taps = tuning.DEPTHWISE_TAPS_PER_KERNEL
    if (channels < 2 or x.size * m * kh * kw // steps < tuning.DEPTHWISE_SPLIT_MIN_MACS
            or not streams.may_split()):
        return depthwise_kernels.shift_add(x, weight, bias, stride, padding, taps)

    def half(part: slice) -> mx.array:
        outputs = slice(part.start * m, part.stop * m)
        return depthwise_kernels.shift_add(x[..., part], weight[outputs], None if bias is None else bias[outputs],
                                           stride, padding, taps)

    return streams.split_in_two(half, channels, axis=-1)


def _multiplied_native(x: mx.array, weight: mx.array, bias: mx.array | None, stride, padding, m: int) -> mx.array:
    """A conv with ``m`` output channels per input channel (FastViT's downsamplers and ``conv_exp``:
    output o reads input o // m) as ``m`` native depthwise convs, output channels j, j + m, ...
    each, interleaved by one copy: the native kernel takes one output channel per input channel."""
    phases = [depthwise_kernels.native(x, weight[j::m], None if bias is None else bias[j::m], stride, padding)
              for j in range(m)]
    return mx.stack(phases, axis=-1).reshape(*phases[0].shape[:-1], -1)


class DepthwiseConv(common.DepthwiseConv):
    def __call__(self, x: mx.array) -> mx.array:
        bias = self.get("bias")
        if self.weight.ndim == 3:  # over a sequence [B, L, C]: a 1 x k conv of [B, 1, L, C]
            x4, w4 = x[:, None], self.weight[:, None]
            if not depthwise_kernels.shift_add_supported(x4, w4):
                return super().__call__(x)
            return depthwise_conv2d(x4, w4, bias, (1, self.stride), (0, self.padding))[:, 0]
        if not depthwise_kernels.shift_add_supported(x, self.weight):
            return super().__call__(x)
        return depthwise_conv2d(x, self.weight, bias, (self.stride, self.stride), (self.padding, self.padding))


# ------------------------------------------------------------------ attention
def _native_attention(macs: int) -> bool:
    """Whether an attention core of ``macs`` multiply-adds takes its native node (where the kernels
    serve, not inside a two-stream piece: the node uses every core)."""
    return use_kernels() and streams.may_split() and macs >= tuning.ATTENTION_NATIVE_MIN_MACS


def _softmax_node(q: mx.array, k: mx.array, v: mx.array, key_bias: mx.array | None = None,
                  causal: bool = False) -> bool:
    """Whether the native softmax node takes this attention core (head views [B, heads, rows, d])."""
    batch, heads, tokens, depth = q.shape
    macs = batch * heads * tokens * k.shape[2] * (depth + v.shape[-1])
    return _native_attention(macs) and primitives.softmax_attention_supported(q, k, v, key_bias, causal=causal)


class ScaledDotProductAttention(common.ScaledDotProductAttention):
    """The native softmax node (``primitives.softmax_attention``, float32) on the head views as the
    models pass them (SANA's cross-attention with its key bias, FastViT's attention), writing the
    merged layout their merge of the heads reads as a view; otherwise the fast MLX form (MLX's CPU
    fallback evaluates the softmax with its scalar ``exp``)."""

    def __call__(self, q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | None = None) -> mx.array:
        if q.ndim == 4 and k.ndim == 4 and v.ndim == 4 and _softmax_node(q, k, v, mask):
            return primitives.softmax_attention(q, k, v, scale, mask)
        return activations.attention(q, k, v, scale, mask)


class ReLULinearAttention(common.ReLULinearAttention):
    """The native node (``primitives.relu_linear_attention``, float32) on the head views as the
    models pass them (SANA's attn1, the DC-AE's LiteMLA), writing the merged layout their merge
    of the heads reads as a view. Otherwise the MLX formula: an even batch (SANA's CFG pair) as
    two halves, one per stream; splitting the heads of one image (the DC-AE's LiteMLA) was slower,
    so a single image runs whole."""

    def __call__(self, q: mx.array, k: mx.array, v: mx.array) -> mx.array:
        if q.ndim == 4 and _native_attention(q.shape[0] * q.shape[1] * (q.shape[2] + k.shape[2]) * q.shape[3]
                                             * v.shape[-1]) and primitives.relu_linear_attention_supported(q, k, v):
            return primitives.relu_linear_attention(q, k, v, self.eps)
        batch = q.shape[0]
        if (batch % 2 or q.size + k.size + v.size < tuning.LINEAR_ATTENTION_SPLIT_MIN_ELEMENTS
                or not streams.may_split()):
            return common.relu_linear_attention(q, k, v, self.eps)
        return streams.split_in_two(lambda part: common.relu_linear_attention(q[part], k[part], v[part], self.eps),
                                    batch, axis=0)


class GroupedPointwise(dcae.GroupedPointwise):
    """The native node (every core, eight rows at a time per group) where it takes the call; the plain
    module's batched matmul runs one tiny product per (pixel, group)."""

    def __call__(self, x: mx.array) -> mx.array:
        if (use_kernels() and x.size * (x.shape[-1] // self.groups) >= tuning.GROUPED_POINTWISE_NATIVE_MIN_MACS
                and primitives.grouped_pointwise_supported(x, self.weight, self.groups)):
            return primitives.grouped_pointwise(x, self.weight, self.groups)
        return super().__call__(x)


# ------------------------------------------------------------------ GLUMBConv
def gated_depthwise(h: mx.array, weight: mx.array, bias: mx.array) -> mx.array:
    """GLUMBConv's middle: SiLU -> depthwise conv (+ bias) over 2C channels -> values * SiLU(gate),
    C channels each; h [B, H, W, 2C] (before the SiLU), weight [2C, k, k, 1] -> [B, H, W, C].

    The native node (``primitives.gated_depthwise``, float32, C a multiple of 8) where the
    kernels serve, not inside a two-stream piece (no size threshold: it beat the MLX form at every
    size measured, down to 2 x 8 x 8 x 64); it computes what the MLX form below computes, bit for
    bit. The MLX form: two independent pieces, one per stream: the two halves of an even
    batch (the CFG pair), otherwise two channel halves, each with its matching value and gate
    channels. The conv runs on the value and gate channels separately (its weights sliced), so
    both come out contiguous for the fused ``glu_silu``."""
    if use_kernels() and streams.may_split() and primitives.gated_depthwise_supported(h, weight, bias):
        return primitives.gated_depthwise(h, weight, bias)
    batch, hidden = h.shape[0], h.shape[-1] // 2
    by_batch = batch % 2 == 0
    half = batch // 2 if by_batch else hidden // 2
    size = (1, 1), (weight.shape[1] // 2, weight.shape[2] // 2)

    def piece(i: int) -> mx.array:
        # Measured: SiLU over a contiguous batch half, then the channel slices, is fastest
        # for a batch split; for a channel split, SiLU on the strided slices themselves.
        if by_batch:
            h_i = activations.silu(h[i * half : (i + 1) * half])
            values, gate = h_i[..., :hidden], h_i[..., hidden:]
            value_channels, gate_channels = slice(0, hidden), slice(hidden, None)
        else:
            lo, hi = i * half, (hidden if i else half)
            value_channels, gate_channels = slice(lo, hi), slice(hidden + lo, hidden + hi)
            values, gate = activations.silu(h[..., value_channels]), activations.silu(h[..., gate_channels])
        values = depthwise_conv2d(values, weight[value_channels], bias[value_channels], *size)
        gate = depthwise_conv2d(gate, weight[gate_channels], bias[gate_channels], *size)
        return activations.glu_silu(values, gate)

    return mx.concatenate(streams.cpu_pieces(2, piece), axis=0 if by_batch else -1)


@mx.compile
def _bias_residual(normed: mx.array, bias: mx.array, x: mx.array) -> mx.array:
    return x + (normed + bias)


def _elementwise_node() -> bool:
    """Whether an element-wise native node serves: the kernels on, not inside a two-stream piece
    (the node uses every core; the other stream is busy with its piece)."""
    return use_kernels() and streams.may_split()


def norm_residual(norm: common.RMSNorm, y: mx.array, x: mx.array) -> mx.array:
    """``norm(y) + x``: float32 by the native node (``primitives.rms_norm_residual``: one pass on
    every core, y read in place through its row strides; the same bits as the MLX form, whose
    sums MLX takes in the same order), else MLX's RMSNorm, then the bias and the residual in one
    compiled pass."""
    if _elementwise_node() and primitives.rms_norm_residual_supported(y, norm.weight, norm.bias, x):
        return primitives.rms_norm_residual(y, norm.weight, norm.bias, norm.eps, x)
    return _bias_residual(mx.fast.rms_norm(y, norm.weight, norm.eps), norm.bias, x)


class RMSNorm(common.RMSNorm):
    """The DC-AE's RMSNorm with its bias (``vae.norm_out``, LiteMLA's ``norm_out``) by the native
    node where it serves (the same bits as the plain module)."""

    def __call__(self, x: mx.array) -> mx.array:
        if _elementwise_node() and primitives.rms_norm_residual_supported(x, self.weight, self.bias):
            return primitives.rms_norm_residual(x, self.weight, self.bias, self.eps)
        return super().__call__(x)


class GLUMBConv(sana.GLUMBConv):
    def __call__(self, x: mx.array) -> mx.array:
        h = self.conv_point(gated_depthwise(self.conv_inverted(x), self.conv_depth.weight, self.conv_depth.bias))
        if self.norm is not None and self.residual_connection:
            return norm_residual(self.norm, h, x)
        if self.norm is not None:
            h = self.norm(h)
        return h + x if self.residual_connection else h


# ------------------------------------------------------------------ SANA's transformer block
def modulated_norm(norm: nn.LayerNorm, x: mx.array, shift: mx.array, scale: mx.array) -> mx.array:
    """``norm(x) * (1 + scale) + shift`` (AdaLN): a LayerNorm without affine by the native node
    (``primitives.modulated_layer_norm``: one pass on every core, the same bits), else the plain
    module's norm and ``sana._modulate``."""
    if ("weight" not in norm and "bias" not in norm and _elementwise_node()
            and primitives.modulated_layer_norm_supported(x, shift, scale)):
        return primitives.modulated_layer_norm(x, shift, scale, norm.eps)
    return sana._modulate(norm(x), shift, scale)


def gated_residual(x: mx.array, gate: mx.array, update: mx.array) -> mx.array:
    """``x + gate * update``: the native node (one pass on every core, the same bits), else
    ``sana._gated_residual``."""
    if _elementwise_node() and primitives.gated_residual_supported(x, gate, update):
        return primitives.gated_residual(x, gate, update)
    return sana._gated_residual(x, gate, update)


def _q8(layer: nn.Module) -> tuple | None:
    """(values, scales, biases, group_size, bias) of an 8-bit layer stored K-major whose products take
    bfloat16 operands (``quantized.Bf16KMajorQuantizedLinear``, prepared), else None."""
    if not (getattr(layer, "k_major", False) and layer.products.bf16):
        return None
    return layer["weight"], layer["scales"], layer["biases"], layer.group_size, layer.get("bias")


class SideBySide:
    """The weights of 8-bit layers that read one input (attention's q, k, v) side by side, [K, sum of
    their outputs], so one product makes them all: the same sums per column, so the bits of the separate
    products. The layers keep views of the fused arrays (the weights are held once)."""

    def __init__(self, layers: tuple, operands: tuple, views: list):
        self.layers, self.operands, self._views = layers, operands, views

    @classmethod
    def of(cls, *layers: nn.Module) -> "SideBySide | None":
        """Lays out the layers' weights side by side (None where they are not all prepared 8-bit bf16
        layers of one group size, all biased or none)."""
        parts = [_q8(layer) for layer in layers]
        if any(part is None for part in parts) or len({part[3] for part in parts}) != 1 or (
                len({part[4] is None for part in parts}) != 1):
            return None
        fused = [mx.concatenate([part[i] for part in parts], axis=-1) for i in range(3)]
        bias = None if parts[0][4] is None else mx.concatenate([part[4] for part in parts])
        mx.eval(fused, bias)
        views, start = [], 0
        for layer, part in zip(layers, parts):
            columns = slice(start, start + part[0].shape[1])
            start = columns.stop
            layer.update({"weight": fused[0][:, columns], "scales": fused[1][:, columns],
                          "biases": fused[2][:, columns]})
            if bias is not None:
                layer.update({"bias": bias[columns]})
            views.append(cls._held(layer))
        mx.eval(views)  # views of the fused arrays (the separate ones are freed)
        return cls(layers, (*fused, parts[0][3], bias), views)

    @staticmethod
    def _held(layer: nn.Module) -> tuple:
        return layer["weight"], layer["scales"], layer["biases"], layer.get("bias")

    def still_held(self) -> bool:
        """Whether the layers still hold the views :meth:`of` gave them (no ``model.update`` since)."""
        return all(a is b for layer, then in zip(self.layers, self._views) for a, b in zip(self._held(layer), then))

    @classmethod
    def kept(cls, module: nn.Module, *layers: nn.Module) -> "SideBySide | None":
        """The layers' weights side by side, kept by ``module`` (as ``module._qkv``): laid out once, and
        again when the layers' weights were replaced since (``model.update``); None where :meth:`of` is."""
        fused = getattr(module, "_qkv", None)
        if fused is None or not fused.still_held():
            fused = module._qkv = cls.of(*layers)
        return fused


class SanaTransformerBlock(sana.SanaTransformerBlock):
    """The plain block with its AdaLN norms and gated residuals as single native nodes; the
    attentions and the Mix-FFN are its children's own (CPU) forms.

    Where every product of the block is the 8-bit GEMM node (bf16 products, 8-bit K-major weights,
    large enough), the block is six of them with the element-wise work inside
    (``primitives.bf16_matmul_q8``'s extras): each AdaLN norm made as the product that reads it packs
    its rows, attn1's q, k and v one product (their weights side by side, :meth:`prepare`), the
    gated residuals and attn2's residual added as the products store their results. The same
    operations and roundings as the separate nodes, so the same bits, with fewer passes over memory."""

    def prepare(self) -> None:
        """attn1's q, k, v weights side by side for one product (:class:`SideBySide`)."""
        self._side_by_side()

    def _side_by_side(self) -> SideBySide | None:
        return SideBySide.kept(self, self.attn1.to_q, self.attn1.to_k, self.attn1.to_v)

    def _fused_products(self, x: mx.array) -> dict | None:
        """The block's products as 8-bit GEMM nodes with their extras, when all of them serve x."""
        qkv = self._side_by_side()
        if qkv is None or not _elementwise_node():
            return None
        if any(name in norm for norm in (self.norm1, self.norm2) for name in ("weight", "bias")):
            return None  # an affine LayerNorm: not the kernel's
        layers = {"attn1_out": self.attn1.to_out[0], "attn2_q": self.attn2.to_q, "attn2_out": self.attn2.to_out[0],
                  "ff_in": self.ff.conv_inverted, "ff_out": self.ff.conv_point}
        products = {name: _q8(layer) for name, layer in layers.items()}
        if any(product is None for product in products.values()):
            return None
        rows = x.size // x.shape[-1]
        products["qkv"] = qkv.operands
        if min(rows * product[0].size for product in products.values()) < tuning.BF16_MIN_PRODUCT:
            return None
        return products

    def __call__(self, x: mx.array, height: int, width: int, modulation: mx.array, keys: mx.array,
                 values: mx.array, key_bias: mx.array | None) -> mx.array:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mx.split(
            self.scale_shift_table + modulation, 6, axis=1
        )  # each [B, 1, D]
        products = self._fused_products(x)
        if products is not None and x.ndim == 3:
            fused = self._fused(x, height, width, products, (shift_msa, scale_msa, gate_msa),
                                (shift_mlp, scale_mlp, gate_mlp), keys, values, key_bias)
            if fused is not None:
                return fused
        h = modulated_norm(self.norm1, x, shift_msa, scale_msa)
        x = gated_residual(x, gate_msa, self.attn1(h))
        # The cross-attention query is the raw stream: no norm, no modulation, no gate.
        x = x + self.attn2(x, keys, values, key_bias)
        h = modulated_norm(self.norm2, x, shift_mlp, scale_mlp)
        batch, tokens, dim = h.shape
        ff = self.ff(h.reshape(batch, height, width, dim)).reshape(batch, tokens, dim)
        return gated_residual(x, gate_mlp, ff)

    def _fused(self, x, height, width, products, msa, mlp, keys, values, key_bias) -> mx.array | None:
        """The block as six 8-bit GEMM nodes (see the class); None where the node does not take an operand."""

        def product(name, a, **extras):
            values_, scales, biases, group_size, bias = products[name]
            if not primitives.bf16_matmul_q8_supported(a, values_, scales, biases, group_size, bias, **extras):
                raise _NotFused
            return primitives.bf16_matmul_q8(a, values_, scales, biases, group_size, bias, **extras)

        (shift_msa, scale_msa, gate_msa), (shift_mlp, scale_mlp, gate_mlp) = msa, mlp
        attn1, attn2, ff = self.attn1, self.attn2, self.ff
        batch, tokens, _ = x.shape
        try:
            qkv = product("qkv", x, norm=(shift_msa, scale_msa, self.norm1.eps))
            q, k, v = (sana._split_heads(part, attn1.heads) for part in mx.split(qkv, 3, axis=-1))
            x = product("attn1_out", sana._merge_heads(attn1.attention(q, k, v)), residual=x, gate=gate_msa)
            # The cross-attention query is the raw stream: no norm, no modulation, no gate.
            q = sana._split_heads(product("attn2_q", x), attn2.heads)
            x = product("attn2_out", sana._merge_heads(attn2.attention(q, keys, values, attn2.scale, key_bias)),
                        residual=x)
            hidden = product("ff_in", x, norm=(shift_mlp, scale_mlp, self.norm2.eps))
            middle = gated_depthwise(hidden.reshape(batch, height, width, -1), ff.conv_depth.weight,
                                     ff.conv_depth.bias)
            return product("ff_out", middle.reshape(batch, tokens, -1), residual=x, gate=gate_mlp)
        except _NotFused:
            return None


class _NotFused(Exception):
    """An operand the 8-bit GEMM node's extras do not take (the block then runs its separate nodes)."""


class SanaModulatedNorm(sana.SanaModulatedNorm):
    """The DiT's output norm with its modulation as one native node."""

    def __call__(self, x: mx.array, embedding: mx.array, scale_shift_table: mx.array) -> mx.array:
        shift, scale = mx.split(scale_shift_table + embedding[:, None, :], 2, axis=1)
        return modulated_norm(self.norm, x, shift, scale)


# ------------------------------------------------------------------ FastViT's blocks
@mx.compile
def _scaled_residual(x: mx.array, scale: mx.array, y: mx.array) -> mx.array:
    return x + scale * y


def ffn_residual(x: mx.array, scale: mx.array, ffn: fastvit.ConvFFN) -> mx.array:
    """``x + scale * ffn(x)``: after the FFN's depthwise conv, its 1x1 layers, GELU and the residual
    in bands of ``tuning.FFN_BAND_ROWS`` pixels when the hidden activations are large
    (``tuning.FFN_BAND_MIN_VALUES``), so a band's temporaries stay in cache. The bf16 node computes
    each row of a product as in one call, so bf16 products give the same bits; OpenBLAS's float32
    GEMM may sum a band in another order (last bits)."""
    h = ffn.conv(x)
    *lead, channels = h.shape
    rows = h.size // channels
    band = tuning.FFN_BAND_ROWS
    if rows * ffn.fc1.weight.shape[0] <= tuning.FFN_BAND_MIN_VALUES or rows <= band:
        return _scaled_residual(x, scale, ffn.fc2(ffn.act(ffn.fc1(h))))
    h, x = h.reshape(rows, channels), x.reshape(rows, channels)
    parts = [_scaled_residual(x[i : i + band], scale, ffn.fc2(ffn.act(ffn.fc1(h[i : i + band]))))
             for i in range(0, rows, band)]
    return mx.concatenate(parts).reshape(*lead, channels)


class RepMixerBlock(fastvit.RepMixerBlock):
    """The layer-scaled residual in one pass (MLX otherwise writes ``scale * y`` out first; the same
    two roundings), the FFN in bands where large (:func:`ffn_residual`)."""

    def __call__(self, x: mx.array) -> mx.array:
        x = self.token_mixer(x)
        return ffn_residual(x, self.layer_scale, self.convffn)


class AttentionBlock(fastvit.AttentionBlock):
    """Both layer-scaled residuals in one pass each, as :class:`RepMixerBlock`."""

    def __call__(self, x: mx.array) -> mx.array:
        x = _scaled_residual(x, self.layer_scale_1, self.token_mixer(self.norm(x)))
        return ffn_residual(x, self.layer_scale_2, self.convffn)


# ------------------------------------------------------------------ the DC-AE's convolutions
# MLX's CPU conv2d lowers a 3x3 conv to one GEMM over a 9x im2col buffer (1.2 GB at
# 512^2 x 128, page-faulted every call). These forms build no im2col at all: in the
# zero-padded map flattened to rows of width W+2, the input of tap (dy, dx) for every
# output pixel is one contiguous window of the flat map, offset by dy*(W+2) + dx. So a
# 3x3 conv is nine GEMMs (K = C) on views, accumulated in place (bias first), computed on
# the padded width: the two extra columns per row are wrap-around garbage that the caller
# crops (for free, inside its next copy). Same products, summed in another order.
#
# With bfloat16 products the conv is one node instead (primitives.bf16_conv: the GEMM packs its
# A from the windows of the map itself, so no padded copy, one pass over the output, no crop);
# the window GEMMs stay its twin (MOBILEO_MLX_KERNELS=twin) and the float32 form.


def _bf16_conv_node(x: mx.array, weight: mx.array, products: Products) -> bool:
    """Whether a conv of x by weight [O, kh, kw, C] runs as the bf16 conv node: bfloat16 products
    for window GEMMs of its size (the same convs as before the node), and the node serving."""
    batch, height, width, channels = x.shape
    return (products.takes_bf16(batch * height * (width + 2), channels, weight.shape[0]) and use_kernels()
            and primitives.bf16_conv_supported(x, weight))


def _padded_rows(x: mx.array) -> mx.array:
    """[B,H,W,C] -> zero-padded [B, (H+3)*(W+2), C]: one pixel around, and a spare row at
    the bottom for the last windows' wrap-around."""
    batch, height, width, channels = x.shape
    padded = mx.pad(x, [(0, 0), (1, 2), (1, 1), (0, 0)])
    return padded.reshape(batch, (height + 3) * (width + 2), channels)


def _taps_gemm(rows: mx.array, taps, height: int, width: int, init: mx.array | None,
               products: Products) -> mx.array:
    """init + sum over (offset, weight [O, C]) of rows[:, offset : offset + H*(W+2)] @ weight.T:
    [B, H*(W+2), O] on the padded width."""
    span = height * (width + 2)
    y = init
    for offset, weight in taps:
        y = products.matmul(rows[:, offset : offset + span], weight.T, y)
    return y


def conv3x3_wide(x: mx.array, weight: mx.array, bias: mx.array | None, products: Products = FP32) -> mx.array:
    """3x3 conv, stride 1, padding 1, on the padded width: x [B,H,W,C], weight [O,3,3,C]
    (MLX layout), bias [O] -> [B, H, W+2, O] (contiguous); columns W, W+1 are garbage."""
    batch, height, width, _ = x.shape
    out = weight.shape[0]
    taps = mx.contiguous(weight.transpose(1, 2, 0, 3))  # [dy, dx, O, C], each tap row-contiguous
    offsets = [(dy * (width + 2) + dx, taps[dy, dx]) for dy in range(3) for dx in range(3)]
    y = _taps_gemm(_padded_rows(x), offsets, height, width, bias, products)
    return y.reshape(batch, height, width + 2, out)


def conv3x3(x: mx.array, weight: mx.array, bias: mx.array | None, products: Products = FP32) -> mx.array:
    """3x3 conv, stride 1, padding 1: the bf16 conv node, else a cropped view of :func:`conv3x3_wide`."""
    if _bf16_conv_node(x, weight, products):
        return primitives.bf16_conv3x3(x, weight, bias)
    return conv3x3_wide(x, weight, bias, products)[:, :, : x.shape[2]]


def _is_conv3x3(conv: nn.Conv2d) -> bool:
    return (conv.weight.shape[1:3] == (3, 3) and tuple(conv.padding) == (1, 1) and tuple(conv.stride) == (1, 1)
            and conv.groups == 1 and conv.dilation in (1, (1, 1)))


class Conv2d(nn.Conv2d):
    """A 3x3 / stride 1 / padding 1 conv as window GEMMs; other convs as MLX's."""

    products = FP32

    def __call__(self, x: mx.array) -> mx.array:
        if not _is_conv3x3(self):
            return super().__call__(x)
        return conv3x3(x, self.weight, self.get("bias"), self.products)


class ResBlock(dcae.ResBlock):
    """Both convs as window GEMMs, the first one's garbage columns cropped after the activation
    (or both as bf16 conv nodes: nothing to crop, the SiLU made as the first one stores its map,
    the norm and the residual as the second one finishes its rows)."""

    products = FP32

    def __call__(self, x: mx.array) -> mx.array:
        if _bf16_conv_node(x, self.conv1.weight, self.products):
            if isinstance(self.nonlinearity, nn.SiLU):  # in the conv's store: the bits of the SiLU node
                h = primitives.bf16_conv3x3(x, self.conv1.weight, self.conv1.bias, silu=True)
            else:
                h = self.nonlinearity(primitives.bf16_conv3x3(x, self.conv1.weight, self.conv1.bias))
            norm = (self.norm.weight, self.norm.bias, self.norm.eps)
            if _bf16_conv_node(h, self.conv2.weight, self.products) and primitives.bf16_conv3x3_supported(
                    h, self.conv2.weight, None, norm=norm, residual=x):
                # the norm, its bias and the residual made on each row of the conv as it is finished:
                # the bits of the norm_residual node
                return primitives.bf16_conv3x3(h, self.conv2.weight, None, norm=norm, residual=x)
        else:
            width = x.shape[2]
            h = self.nonlinearity(conv3x3_wide(x, self.conv1.weight, self.conv1.bias, self.products))[:, :, :width]
        return norm_residual(self.norm, conv3x3(h, self.conv2.weight, None, self.products), x)


def _subpixel_weights(weight: mx.array) -> dict:
    """Nearest x2 then a 3x3 conv equals, at each output parity (a, b), a 2x2 conv of the
    low-resolution input whose taps sum the 3x3 taps that read the same input pixel:
    parity 0 reads rows/cols (-1, 0) with taps (w0, w1 + w2), parity 1 reads (0, +1) with
    (w0 + w1, w2). Returns {(a, b): [2 (dy), 2 (dx), O, C]}, contiguous (sums in float32)."""
    w = weight.astype(mx.float32)

    def pairs(t, axis):  # the two combined taps of parity 0 and 1 along ``axis``
        take = lambda i: mx.take(t, mx.array([i]), axis=axis)  # noqa: E731
        return {0: (take(0), take(1) + take(2)), 1: (take(0) + take(1), take(2))}

    out = {}
    for a, (r0, r1) in pairs(w, 1).items():
        rows = mx.concatenate([r0, r1], axis=1)  # [O, 2, 3, C]
        for b, (c0, c1) in pairs(rows, 2).items():
            wab = mx.concatenate([c0, c1], axis=2)  # [O, 2, 2, C]
            out[a, b] = mx.contiguous(wab.transpose(1, 2, 0, 3).astype(weight.dtype))  # [dy, dx, O, C]
    return out


class SanaMultiscaleLinearAttention(dcae.SanaMultiscaleLinearAttention):
    """LiteMLA with fewer copies where its q, k, v layers are 8-bit bf16 products: q, k, v one product
    (their weights side by side, :class:`SideBySide`), so no concatenation of the three; the attention
    of the direct heads and of the multiscale branch's heads taken on each as it comes (their outputs,
    a quarter of the size, are joined instead); ``norm_out`` with the residual as one node. The same
    operations on the same values: the bits of the plain form."""

    def prepare(self) -> None:
        self._side_by_side()

    def _side_by_side(self) -> SideBySide | None:
        return SideBySide.kept(self, self.to_q, self.to_k, self.to_v)

    def __call__(self, x: mx.array) -> mx.array:
        qkv_weights = self._side_by_side()
        rows = x.size // x.shape[-1]
        if (qkv_weights is None or not use_kernels() or rows * qkv_weights.operands[0].size < tuning.BF16_MIN_PRODUCT
                or not primitives.bf16_matmul_q8_supported(x, *qkv_weights.operands)):
            return super().__call__(x)
        b, h, w, _ = x.shape
        d = self.attention_head_dim
        qkv = primitives.bf16_matmul_q8(x, *qkv_weights.operands)
        outputs = []
        for part in [qkv] + [branch(qkv) for branch in self.to_qkv_multiscale]:
            # consecutive 3d channels form one head, its thirds q, k and v (as the plain form groups them)
            q, k, v = mx.split(part.reshape(b, h * w, -1, 3 * d).transpose(0, 2, 1, 3), 3, axis=-1)
            out = self.linear_attention(q, k, v) if h * w > d else dcae.relu_quadratic_attention(q, k, v)
            outputs.append(out.transpose(0, 2, 1, 3))  # [B, N, heads, d]
        out = mx.concatenate(outputs, axis=2).reshape(b, h, w, -1) if len(outputs) > 1 else outputs[0].reshape(
            b, h, w, -1)
        return norm_residual(self.norm_out, self.to_out(out), x)


class DCUpBlock2d(dcae.DCUpBlock2d):
    """Nearest x2 -> 3x3 conv (+ bias + shortcut) as four 2x2 convs of the low-resolution input,
    one per output parity (2.25x fewer products than convolving the upsampled map), each four
    window GEMMs starting from the bias + shortcut, then one copy that interleaves the parities
    and crops. The combined taps are computed once (:meth:`prepare`), again when the conv's
    weight is replaced."""

    products = FP32

    def prepare(self) -> None:
        taps, node_weights = _subpixel_weights(self.conv.weight), None
        if self.products.bf16:
            # only the bf16 sub-pixel node's layout of them is held, [2 (a), 2 (b), O, 2 (dy), 2 (dx),
            # C]; the window GEMMs (its twin) copy theirs out of it when they run
            node_weights = mx.contiguous(mx.stack([mx.stack([taps[a, b].transpose(2, 0, 1, 3) for b in (0, 1)])
                                                   for a in (0, 1)]))
            taps = None
        self._subpixel = (self.conv.weight, taps, node_weights)

    def _window_taps(self) -> dict:
        """{(a, b): [2 (dy), 2 (dx), O, C]} (contiguous) for the window GEMMs."""
        taps, node_weights = self._subpixel[1:]
        if taps is not None:
            return taps
        return {(a, b): mx.contiguous(node_weights[a, b].transpose(1, 2, 0, 3)) for a in (0, 1) for b in (0, 1)}

    def _shortcut(self, x: mx.array, a: int, b: int, out: int) -> mx.array:
        """The channels pixel_shuffle(repeat_interleave(x, r)) puts at output parity (a, b):
        x[..., (4c + 2a + b) // r]; when r divides 4, (4 / r) c + (2a + b) // r, a strided
        slice (a view, where a gather would copy)."""
        r = self.repeats
        if 4 % r:
            return mx.take(x, (4 * mx.arange(out) + 2 * a + b) // r, axis=-1)
        step, first = 4 // r, (2 * a + b) // r
        return x[..., first : first + step * (out - 1) + 1 : step]

    def __call__(self, x: mx.array) -> mx.array:
        if not self.interpolate:
            return super().__call__(x)
        if self._subpixel[0] is not self.conv.weight:
            self.prepare()
        batch, height, width, _ = x.shape
        out = self.conv.weight.shape[0]
        if _bf16_conv_node(x, self.conv.weight, self.products):
            weights, bias = self._subpixel[2], self.conv.bias
            if primitives.bf16_subpixel_conv_supported(x, weights, bias=bias, repeats=self.repeats):
                # the shortcut and the bias read from x as the node stores: no shortcut map
                return primitives.bf16_subpixel_conv(x, weights, bias=bias, repeats=self.repeats)
            # a shortcut the node does not read itself: the plain module's, as the output's start
            init = dcae.pixel_shuffle(dcae.repeat_channels(x, self.repeats)) + bias
            if primitives.bf16_subpixel_conv_supported(x, weights, init):
                return primitives.bf16_subpixel_conv(x, weights, init)
        taps = self._window_taps()
        rows = _padded_rows(x)
        pitch = width + 2
        parts = []
        for a in (0, 1):
            for b in (0, 1):
                init = self._shortcut(x, a, b, out) + self.conv.bias
                init = mx.pad(init, [(0, 0), (0, 0), (0, 2), (0, 0)]).reshape(batch, height * pitch, out)
                # Parity 0 reads rows / columns (-1, 0) = padded offsets (0, 1); parity 1 (1, 2).
                offsets = [((a + dy) * pitch + (b + dx), taps[a, b][dy, dx]) for dy in (0, 1) for dx in (0, 1)]
                y = _taps_gemm(rows, offsets, height, width, init, self.products)
                parts.append(y.reshape(batch, height, pitch, out))
        y = mx.stack(parts, axis=1).reshape(batch, 2, 2, height, pitch, out)[:, :, :, :, :width]
        return y.transpose(0, 3, 1, 4, 2, 5).reshape(batch, 2 * height, 2 * width, out)


class Bf16Conv2d(Conv2d):
    products = BF16


class Bf16ResBlock(ResBlock):
    products = BF16


class Bf16DCUpBlock2d(DCUpBlock2d):
    products = BF16


# ------------------------------------------------------------------ Qwen2 (mlx-lm)
class Qwen2MLP(qwen2.MLP):
    """The SiLU gate by the fast form: MLX's CPU sigmoid (in mlx-lm's ``swiglu``) is a scalar loop."""

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(activations.glu_silu(self.up_proj(x), self.gate_proj(x)))


def _additive_mask(mask, queries: int, keys: int) -> mx.array | None:
    """mlx-lm's attention masks (None, "causal", boolean or additive arrays) as an additive
    float32 mask; "causal" aligns the last query with the last key (a prompt cache's offset)."""
    if mask is None:
        return None
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"unsupported attention mask {mask!r}")
        rows = mx.arange(keys - queries, keys)[:, None]
        return mx.where(rows >= mx.arange(keys)[None, :], 0.0, -mx.inf)
    if mask.dtype == mx.bool_:
        return mx.where(mask, 0.0, -mx.inf)
    return mask.astype(mx.float32)


class Qwen2Attention(qwen2.Attention):
    """mlx-lm's Qwen2 attention whose softmax over several query rows (a prefill) runs through the
    native softmax node (causal, its grouped KV heads read in place from the cache's views) or,
    below ``tuning.ATTENTION_NATIVE_MIN_MACS``, with array masks, or without the node, the fast
    MLX form: MLX's CPU ``scaled_dot_product_attention`` evaluates its exponentials with a
    scalar loop. Written out as mlx-lm's ``Attention.__call__`` is, with that one call
    replaced; one query row (decoding), quantized KV caches, batched caches (a position per
    sequence: mlx-lm's batched prefill, as the server runs it) and very long prompts
    (``tuning.LANGUAGE_ATTENTION_MAX_SCORES``) keep mlx-lm's own call."""

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        batch, length, _ = x.shape
        offset = cache.offset if cache is not None else 0
        if (length == 1 or hasattr(cache, "bits") or not isinstance(offset, int)
                or self.n_heads * length * (offset + length) > tuning.LANGUAGE_ATTENTION_MAX_SCORES):
            return super().__call__(x, mask, cache)
        queries = self.q_proj(x).reshape(batch, length, self.n_heads, -1).transpose(0, 2, 1, 3)
        keys = self.k_proj(x).reshape(batch, length, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        values = self.v_proj(x).reshape(batch, length, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        queries, keys = self.rope(queries, offset=offset), self.rope(keys, offset=offset)
        if cache is not None:
            keys, values = cache.update_and_fetch(keys, values)
        output = self._node_attention(queries, keys, values, mask)
        if output is None:
            output = self._grouped_attention(queries, keys, values, mask)
        return self.o_proj(output.transpose(0, 2, 1, 3).reshape(batch, length, -1))

    def _node_attention(self, queries, keys, values, mask) -> mx.array | None:
        """The node for mlx-lm's prefill masks (None, or "causal" aligned to the last key: a
        prompt cache's offset), or None where it does not serve. Its output's merged layout makes
        the merge of the heads a view."""
        if not (mask is None or (isinstance(mask, str) and mask == "causal")):
            return None
        causal = mask is not None
        if not _softmax_node(queries, keys, values, causal=causal):
            return None
        return primitives.softmax_attention(queries, keys, values, self.scale, causal=causal)

    def _grouped_attention(self, queries, keys, values, mask) -> mx.array:
        """Grouped-query attention as one attention per KV head: that head's query heads are
        stacked along the rows, [B, kv, rep * L, d], so keys and values are not repeated."""
        batch, heads, length, depth = queries.shape
        kv_heads, keys_length = keys.shape[1], keys.shape[2]
        repeats = heads // kv_heads
        additive = _additive_mask(mask, length, keys_length)
        if additive is not None:  # [B or 1, H, L, S] -> [B or 1, kv, rep * L, S], as the stacked rows
            lead = batch if additive.ndim == 4 and additive.shape[0] == batch else 1
            additive = mx.broadcast_to(additive, (lead, heads, length, keys_length))
            additive = additive.reshape(lead, kv_heads, repeats * length, keys_length)
        stacked = queries.reshape(batch, kv_heads, repeats * length, depth)
        output = activations.attention(stacked, keys, values, self.scale, additive)
        return output.reshape(batch, heads, length, -1)
