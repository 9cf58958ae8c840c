"""Every threshold and size constant of every backend, each with its reason.

The backend code reads them at call time (``tuning.NAME``), so a test can lower them to
send small inputs down the paths the full-size model takes (tests/test_golden.py). What
each one bought, measured, is in benchmarks/README.md and kernels/README.md.
"""

# ----------------------------------------------------------------- MLX's CPU backend
# MLX runs matrix products through BLAS on every core and everything else on one thread
# per stream; "split" below means: two independent halves, one per CPU stream
# (backends/cpu/streams.py), which gives element-wise work the second core.

# Element-wise activations (backends/cpu/activations.py) write 3-5 full-size temporaries.
# Past MLX's buffer cache every temporary is fresh memory, page-faulted on first touch
# (more than the arithmetic costs), so inputs larger than two chunks run in chunks of
# this many values, whose temporaries stay in the cache, unless the cache holds the
# whole call's temporaries anyway (then: two halves).
ACTIVATION_CHUNK = 1 << 16
# Full-size float32 arrays alive in the longest activation kernel chain (sizes the check above).
ACTIVATION_TEMPORARIES = 6

# Softmax attention (backends/cpu/activations.attention_fast): score elements per chunk of
# heads, so the temporaries come from the buffer cache (4 MB) ...
ATTENTION_CHUNK = 1 << 20
# ... and when a chunk would hold a single head, its query rows run in blocks of this many
# scores instead (FastViTHD's 12 x 1024 x 1024 attention ran faster in 512-row blocks).
ATTENTION_ROWS_CHUNK = 1 << 19

# The attention nodes (kernels/primitives.softmax_attention, relu_linear_attention) take a call
# from this many multiply-adds (softmax: B*H*N*L*(d + d_v); linear: B*H*(N + M)*d*d_v). They beat
# the MLX forms at every size measured (down to 2 x 2 heads x 4 queries x 8 keys), so this only
# keeps calls of microseconds (the demo model's) on the MLX forms, whose bytes
# tests/test_golden.py records for the default mode (the demo LM's prefills: up to 90 tokens); the
# full-size DiT, DC-AE and LM prefill (Qwen2-0.5B, 308 tokens: 1.7e8) are far above.
ATTENTION_NATIVE_MIN_MACS = 1 << 20

# Above this many scores per image (heads x queries x keys; 64 MB in float32) the language
# model's prefill attention keeps mlx-lm's fused call: a long prompt's masks and score
# matrices would cost memory.
LANGUAGE_ATTENTION_MAX_SCORES = 1 << 24

# The DC-AE LiteMLA's grouped 1x1 conv (kernels/primitives.grouped_pointwise) takes a call from this many
# multiply-adds: smaller ones (the demo model's) stay the MLX form, whose bytes tests/test_golden.py records
# for the default mode; the full-size decoder's (6e7 and more) are far above.
GROUPED_POINTWISE_NATIVE_MIN_MACS = 1 << 20

# Depthwise convs: below this many multiply-adds the native kernel's start-up costs more
# than it saves over the shift-and-add twin ...
DEPTHWISE_NATIVE_MIN_MACS = 1 << 21
# ... and below this many the two-stream channel split of the twin costs more than it saves.
DEPTHWISE_SPLIT_MIN_MACS = 1 << 22
# Taps per compiled kernel of the shift-and-add twin: MLX's fuser cuts one long chain into
# slow kernels of its own; 4 or 5 taps a kernel measured best, 8 as slow as the long chain.
DEPTHWISE_TAPS_PER_KERNEL = 4

# FastViT's ConvFFN (1x1 up to 4C, GELU, 1x1 down) runs in bands of this many pixels when its
# hidden activations have more than FFN_BAND_MIN_VALUES values (the first stage at 1024^2:
# 65536 pixels x 384, 100 MB in float32): whole, they pass through memory three times (written by
# the product, read and written by the GELU, read by the next product) and no longer come from
# MLX's buffer cache; a band's stay in cache. The later stages (12.6 M values and fewer) gained
# nothing from bands.
FFN_BAND_MIN_VALUES = 1 << 24
FFN_BAND_ROWS = 1024

# ReLU linear attention with an even batch (SANA's CFG pair) splits the batch in two from
# this many q + k + v elements; splitting the heads of one image (the DC-AE) was slower.
LINEAR_ATTENTION_SPLIT_MIN_ELEMENTS = 1 << 18

# Quantized layers. Up to this many input rows (tokens) the packed weight is multiplied
# directly (the native GEMV, or MLX's quantized_matmul); above it, dequantize + GEMM:
# quantized_matmul against dequantize + sgemm crosses over near 10 rows for every layer
# shape measured, and the native kernel keeps one accumulator per row in registers (8 rows).
QUANTIZED_MATMUL_MAX_ROWS = 8
# quantized_matmul runs on one thread: a layer with at least this many weights computes its
# output columns in two halves, one per stream (smaller ones gain less than the join costs).
SPLIT_MIN_WEIGHTS = 1 << 19
# With few rows, dequantizing costs as much as the GEMM: without the dequantize node (it uses
# every core itself), up to this many rows a large layer's two weight halves are dequantized
# on the two streams before the product (an LM prefill).
# With more rows the GEMM dominates and the join costs what the split saves.
SPLIT_DEQUANTIZE_MAX_ROWS = 320

# bfloat16 products (the bf16_matmul graph node): below this many multiply-adds a product
# stays float32, since packing the operands and waking the kernel's threads would cost
# more than the bf16 instructions save.
BF16_MIN_PRODUCT = 1 << 22

# MLX's CPU buffer cache keeps 32 MB of freed buffers by default. The LLM prefill and the
# denoising loop reuse the same temporaries over and over: a stage runs with this much
# cached (a CFG DiT step and the LLM + MCP were measurably faster, for +0.25 GB RSS).
STAGE_CACHE_BYTES = 256 << 20

# Inside a pipeline stage glibc's malloc serves allocations below this size from its heap and keeps
# what is freed (backends/cpu/memory.py): the stages' large temporaries are reused instead of mapped
# and page-faulted afresh each time. mallopt takes an int: the trim threshold is the largest it can say.
HEAP_MMAP_THRESHOLD = 1 << 30
HEAP_TRIM_THRESHOLD = (1 << 31) - 1

# ----------------------------------------------------------------- every backend
# The DC-AE decoder's high-resolution layers run in row bands of about this many output
# pixels (64 rows of a 512-wide map): their temporaries (~1 GB in float32 at 512^2 for the
# whole map) otherwise set the decoder's peak memory (mobileo_mlx.decoding).
BAND_PIXELS = 1 << 15
