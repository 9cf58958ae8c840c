"""The bf16 GEMM's AMX path (kernels/native/bf16_gemm.c): the kernel is chosen once per process
(``MOBILEO_MLX_BF16_GEMM=auto|amx|avx512``), so each choice runs in a child process. Pinned to AMX,
the node equals the float64 product of the bf16-rounded operands for every tail the tiles have
(M, N, K not multiples of 16 / 32, K odd, K < 32, one row, a transposed ``b`` as the Linear layers
pass ``W.T``, a transposed ``a``, the accumulating ``c`` form, several B panel blocks), and agrees
with the AVX512-BF16 kernel; the choice is what ``primitives.bf16_kernel`` and the products
counter say. The 8-bit node (``bf16_matmul_q8``) and the conv node (``bf16_conv``: its A packed from
the windows of the map, in both kernels' packings) are checked on both kernels the same way."""

import mobileo_mlx  # noqa: F401  (BLAS routing before mlx.core)

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mobileo_mlx.kernels import primitives as prim
from tests.test_primitives import (CONV_CASES, SUBPIXEL_CASES, bf16_conv_exact, bf16_conv_operands, bf16_conv_tolerance,
                                   bf16_rounded, conv_case_id, q8_exact, q8_operands, q8_twin, relative_error,
                                   subpixel_exact, subpixel_operands)

ROOT = Path(__file__).resolve().parents[1]


def _no_amx_reason() -> str | None:
    if mx.default_device() != mx.cpu:
        return "the graph nodes serve MLX's CPU backend"
    if prim.extension() is None:
        return f"graph nodes {prim.unavailable_reason()}"
    if not prim.bf16_supported():
        return "this CPU has no AVX512-BF16 (the bf16 GEMM does not run)"
    if not prim.extension().bf16_amx_available():
        return "this CPU has no AMX-BF16 / AMX-TILE, or Linux does not grant the tile state"
    return None


pytestmark = pytest.mark.skipif(_no_amx_reason() is not None, reason=f"no AMX path: {_no_amx_reason()}")

# (rows of a, K, N, layout, addend)
CASES = [
    (1, 1, 1, "plain", None),
    (1, 64, 48, "b transposed", None),          # one row: a tile of 15 padding rows
    (16, 32, 32, "plain", None),                # exactly one A tile, one 32-k chunk, one panel
    (32, 64, 64, "b transposed", "full"),       # whole 32 x 32 blocks: C loaded into the tiles
    (33, 129, 45, "plain", None),               # every dimension a tail, K odd
    (70, 129, 45, "b transposed", None),
    (17, 31, 17, "b transposed", "full"),       # K < 32 and odd
    (64, 64, 64, "plain", "bias row"),
    (100, 7, 200, "b transposed", "full"),
    (5, 700, 300, "b transposed", None),
    (48, 1152, 96, "b transposed", None),       # the DiT's K
    (513, 3, 77, "plain", "full"),
    (96, 160, 1100, "b transposed", None),      # 35 panels: more than one block per thread
    (40, 2500, 520, "plain", None),             # a long K: 6 panels per block, 17 panels
    (37, 50, 33, "a transposed", None),
    (200, 130, 45, "plain", "full"),            # many rows, a small B: the parts split the rows
    (161, 33, 70, "b transposed", None),        # the same, an odd last tile
]


# The 8-bit node (rows of x, K, N, bias): M and N tails, one row, the DiT's shapes
Q8_CASES = [
    (1, 64, 1, False),
    (1, 1152, 1152, True),
    (17, 192, 45, True),
    (70, 1152, 100, False),
    (512, 1152, 1152, True),     # the DiT's attention at a CFG pair of 256 tokens
    (200, 128, 96, True),        # many rows, a small B: the AMX parts split the rows
    (2048, 2880, 40, True),      # the DiT's FFN out K, 2048 rows
    (2048, 256, 520, False),     # 17 panels: more than one block
]


def case_operands(index: int):
    """The operands of CASES[index] as NumPy float32 (a, b, c or None), the same in every process."""
    m, k, n, _, addend = CASES[index]
    rng = np.random.default_rng(100 + index)
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    c = None if addend is None else rng.standard_normal((m, n) if addend == "full" else (n,)).astype(np.float32)
    return a, b, c


def run_cases(folder: str) -> None:
    """In the child: every case through the node, outputs saved in ``folder``; prints the kernel
    and how many AMX products each case took."""
    extension = prim.extension()
    amx_products = []
    for index, (_, _, _, layout, _) in enumerate(CASES):
        a, b, c = case_operands(index)
        a_in = mx.array(np.ascontiguousarray(a.T)).T if layout == "a transposed" else mx.array(a)
        b_in = mx.array(np.ascontiguousarray(b.T)).T if layout == "b transposed" else mx.array(b)
        before = extension.bf16_amx_products_done()
        y = prim.bf16_matmul(a_in, b_in, None if c is None else mx.array(c))
        mx.eval(y)
        amx_products.append(extension.bf16_amx_products_done() - before)
        np.save(os.path.join(folder, f"{index}.npy"), np.array(y))
    for index, (m, k, n, bias) in enumerate(Q8_CASES):
        args = [None if v is None else mx.array(v) for v in q8_operands(m, k, n, bias, seed=200 + index)]
        before = extension.bf16_amx_products_done()
        y = prim.bf16_matmul_q8(*args[:4], 64, args[4])
        twin = q8_twin(*args)
        mx.eval(y, twin)
        amx_products.append(extension.bf16_amx_products_done() - before)
        np.save(os.path.join(folder, f"q8-{index}.npy"), np.array(y))
        np.save(os.path.join(folder, f"q8-twin-{index}.npy"), np.array(twin))
    for index, case in enumerate(CONV_CASES):
        x, weight, bias, init = (None if v is None else mx.array(v) for v in bf16_conv_operands(case, seed=300 + index))
        before = extension.bf16_amx_products_done()
        y = prim.bf16_conv(x, weight, bias, case[6], init)
        mx.eval(y)
        amx_products.append(extension.bf16_amx_products_done() - before)
        np.save(os.path.join(folder, f"conv-{index}.npy"), np.array(y))
    for index, case in enumerate(SUBPIXEL_CASES):
        before = extension.bf16_amx_products_done()
        y = prim.bf16_subpixel_conv(*(mx.array(v) for v in subpixel_operands(case, seed=400 + index)))
        mx.eval(y)
        amx_products.append(extension.bf16_amx_products_done() - before)
        np.save(os.path.join(folder, f"subpixel-{index}.npy"), np.array(y))
    large = prim.bf16_matmul(mx.random.normal((256, 256)), mx.random.normal((256, 256)))
    before = extension.bf16_amx_products_done()
    mx.eval(large)
    print(json.dumps({"kernel": prim.bf16_kernel(), "amx_products": amx_products,
                      "large_on_amx": extension.bf16_amx_products_done() - before}))


def products(choice: str, folder: Path) -> dict:
    """Runs CASES in a child process with ``MOBILEO_MLX_BF16_GEMM=choice``."""
    folder.mkdir()
    env = {**os.environ, "MOBILEO_MLX_BF16_GEMM": choice}
    code = f"from tests.test_bf16_amx import run_cases; run_cases({str(folder)!r})"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    report["outputs"] = [np.load(folder / f"{index}.npy") for index in range(len(CASES))]
    report["q8"] = [np.load(folder / f"q8-{index}.npy") for index in range(len(Q8_CASES))]
    report["q8 twin"] = [np.load(folder / f"q8-twin-{index}.npy") for index in range(len(Q8_CASES))]
    report["conv"] = [np.load(folder / f"conv-{index}.npy") for index in range(len(CONV_CASES))]
    report["subpixel"] = [np.load(folder / f"subpixel-{index}.npy") for index in range(len(SUBPIXEL_CASES))]
    return report


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16-gemm")
    return {choice: products(choice, root / choice) for choice in ("amx", "avx512")}


def exact(index: int) -> np.ndarray:
    a, b, c = case_operands(index)
    product = bf16_rounded(a) @ bf16_rounded(b)
    return product if c is None else c.astype(np.float64) + product


@pytest.mark.parametrize("index", range(len(CASES)), ids=lambda i: "x".join(map(str, CASES[i][:3])) + (
    f"-{CASES[i][3]}" if CASES[i][3] != "plain" else "") + (f"-c {CASES[i][4]}" if CASES[i][4] else ""))
def test_amx_against_float64_of_the_rounded_operands_and_the_avx512_kernel(both, index):
    amx, avx512 = both["amx"], both["avx512"]
    assert amx["amx_products"][index] == 1  # the AMX tiles computed it
    assert avx512["amx_products"][index] == 0
    want = exact(index)
    got = amx["outputs"][index]
    assert got.shape == want.shape
    # float32 sums: the error grows with K (the AVX512 kernel's running sum: 1.5e-6 at K = 2500)
    tolerance = 1e-6 if CASES[index][1] <= 1152 else 3e-6
    assert relative_error(got, want) < tolerance
    assert relative_error(avx512["outputs"][index], want) < tolerance
    assert relative_error(got, avx512["outputs"][index]) < tolerance


def test_the_choice_is_read_once_per_process_and_reported(both, tmp_path):
    assert both["amx"]["kernel"] == "amx"
    assert both["avx512"]["kernel"] == "avx512-bf16"
    assert both["avx512"]["large_on_amx"] == 0
    auto = products("auto", tmp_path / "auto")  # the default: AMX where it runs
    assert auto["kernel"] == "amx"
    assert auto["large_on_amx"] == 1


@pytest.mark.parametrize("index", range(len(Q8_CASES)), ids=lambda i: "x".join(map(str, Q8_CASES[i][:3])) + (
    "-bias" if Q8_CASES[i][3] else ""))
def test_the_8bit_node_on_both_kernels(both, index):
    """bf16_matmul_q8 pinned to each kernel: the bits of the float node on the dequantized weight
    plus the bias (its twin, the same kernel), the float64 product of the rounded operands, and the
    other kernel's result, to float32 summation error."""
    amx, avx512 = both["amx"], both["avx512"]
    assert amx["amx_products"][len(CASES) + index] == 2  # the node's product and its twin's, on the tiles
    assert avx512["amx_products"][len(CASES) + index] == 0
    m, k, n, bias = Q8_CASES[index]
    want = q8_exact(*q8_operands(m, k, n, bias, seed=200 + index))
    tolerance = 2e-6 if k <= 1152 else 4e-6  # float32 sums over K (the register tile's running sum)
    for run in (amx, avx512):
        got = run["q8"][index]
        assert got.shape == want.shape
        assert np.array_equal(got.view(np.uint32), run["q8 twin"][index].view(np.uint32))
        assert relative_error(got, want) < tolerance
    assert relative_error(amx["q8"][index], avx512["q8"][index]) < tolerance


@pytest.mark.parametrize("index", range(len(CONV_CASES)), ids=lambda i: conv_case_id(CONV_CASES[i]))
def test_the_conv_node_on_both_kernels(both, index):
    """bf16_conv pinned to each kernel: the float64 conv of the rounded operands, and the other
    kernel's result, to float32 summation error; on AMX's tiles where pinned to them."""
    amx, avx512 = both["amx"], both["avx512"]
    first = len(CASES) + len(Q8_CASES)
    assert amx["amx_products"][first + index] == 1
    assert avx512["amx_products"][first + index] == 0
    case = CONV_CASES[index]
    x, weight, bias, init = bf16_conv_operands(case, seed=300 + index)
    want = bf16_conv_exact(x, weight, bias, case[6], init)
    for run in (amx, avx512):
        assert run["conv"][index].shape == want.shape
        assert relative_error(run["conv"][index], want) < bf16_conv_tolerance(case)
    assert relative_error(amx["conv"][index], avx512["conv"][index]) < bf16_conv_tolerance(case)


@pytest.mark.parametrize("index", range(len(SUBPIXEL_CASES)), ids=lambda i: "x".join(map(str, SUBPIXEL_CASES[i])))
def test_the_subpixel_node_on_both_kernels(both, index):
    """bf16_subpixel_conv (each parity's product stored straight into the interleaved output) pinned
    to each kernel: the float64 result and the other kernel's, to float32 summation error."""
    amx, avx512 = both["amx"], both["avx512"]
    first = len(CASES) + len(Q8_CASES) + len(CONV_CASES)
    assert amx["amx_products"][first + index] == 4
    assert avx512["amx_products"][first + index] == 0
    want = subpixel_exact(*subpixel_operands(SUBPIXEL_CASES[index], seed=400 + index))
    tolerance = 1e-6 if 4 * SUBPIXEL_CASES[index][3] <= 1152 else 3e-6  # float32 sums over K = 4 C
    for run in (amx, avx512):
        assert run["subpixel"][index].shape == want.shape
        assert relative_error(run["subpixel"][index], want) < tolerance
    assert relative_error(amx["subpixel"][index], avx512["subpixel"][index]) < tolerance

