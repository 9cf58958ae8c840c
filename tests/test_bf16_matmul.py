"""bfloat16 CPU matmuls (kernels/native/bf16_gemm.c behind MLX's cblas_sgemm): the kernel
against float64 products of bf16-rounded operands, its scoping, and the choice of precision."""

import mobileo_mlx  # noqa: F401  (BLAS routing before mlx.core)

import threading

import mlx.core as mx
import numpy as np
import pytest
from tests.helpers import relative_error

from mobileo_mlx.kernels import bf16_matmul

needs_bf16 = pytest.mark.skipif(not bf16_matmul.available(),
                                reason=f"bf16 CPU matmuls unavailable: {bf16_matmul.unavailable_reason()}")


def bf16(x) -> np.ndarray:
    """Round float32 to bfloat16 (nearest even), returned as float64."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)
    return rounded.view(np.float32).astype(np.float64)


@pytest.fixture
def every_size():
    """Let the kernel take products of any size (small test shapes), restored afterwards."""
    before = bf16_matmul.min_product()
    bf16_matmul.min_product(0)
    yield
    bf16_matmul.min_product(before)


@needs_bf16
@pytest.mark.parametrize("m,k,n", [(1, 2, 1), (37, 301, 45), (12, 64, 32), (150, 1000, 97), (512, 288, 256)])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("alpha,beta", [(1.0, 0.0), (0.5, 1.5)])
def test_kernel_matches_bf16_rounded_products(m, k, n, trans_b, alpha, beta, every_size):
    rng = np.random.default_rng(m * 1000 + k)
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    c = rng.standard_normal((m, n)).astype(np.float32)
    before = c.copy()
    if beta == 0.0:
        c[:] = np.nan  # beta = 0: C must not be read
    assert bf16_matmul.sgemm(a, b, c, alpha=alpha, beta=beta, trans_b=trans_b) == 0
    product = bf16(a) @ (bf16(b).T if trans_b else bf16(b))
    expected = alpha * product + (beta * before if beta else 0.0)
    assert relative_error(c, expected) < 2e-6
    if k >= 64 and beta == 0.0:  # and the rounding is really bf16's: float32 operands give another result
        assert relative_error(c, alpha * (a.astype(np.float64) @ (b.T if trans_b else b))) > 1e-4


@needs_bf16
def test_declined_products_are_left_to_openblas():
    a = np.ones((64, 64), np.float32)
    c = np.zeros((64, 64), np.float32)
    assert 64 ** 3 < bf16_matmul.min_product()  # small: not worth waking threads
    assert bf16_matmul.sgemm(a, a, c) == -1
    big = np.ones((256, 256), np.float32)
    out = np.zeros((256, 256), np.float32)
    assert bf16_matmul.sgemm(big, big, out, trans_a=True) == -1  # transposed A: left to OpenBLAS
    assert not out.any()


@needs_bf16
def test_mlx_matmuls_use_the_kernel_only_inside_the_context(every_size):
    x = mx.random.normal((96, 200), key=mx.random.key(0))
    w = mx.random.normal((200, 72), key=mx.random.key(1))
    fp32 = x @ w
    mx.eval(fp32)
    done = bf16_matmul.products_done()
    with bf16_matmul.bf16_products() as active:
        assert active
        inside = x @ w
        mx.eval(inside)
        addmm = mx.addmm(fp32, x, w, alpha=2.0, beta=0.5)  # MLX's beta / alpha reach the kernel
        mx.eval(addmm)
    assert bf16_matmul.products_done() == done + 2
    exact = bf16(np.array(x)) @ bf16(np.array(w))
    assert relative_error(inside, exact) < 2e-6
    assert relative_error(addmm, 2.0 * exact + 0.5 * np.array(fp32)) < 2e-6
    after = x @ w
    mx.eval(after)
    assert mx.array_equal(after, fp32)  # OpenBLAS again, bit for bit
    assert bf16_matmul.products_done() == done + 2


@needs_bf16
def test_contexts_nest_and_can_be_disabled(every_size):
    x = mx.random.normal((64, 64), key=mx.random.key(2))

    def bf16_ran() -> bool:
        done = bf16_matmul.products_done()
        mx.eval(x @ x)
        return bf16_matmul.products_done() > done

    with bf16_matmul.bf16_products():
        with bf16_matmul.bf16_products():
            assert bf16_ran()
        assert bf16_ran()  # the outer context is still open
        with bf16_matmul.bf16_products(enabled=False) as active:
            assert not active
    assert not bf16_ran()


@needs_bf16
def test_products_from_several_threads(every_size):
    """Concurrent products: each either runs in the kernel or (pool busy) in OpenBLAS, and
    either way is right."""
    rng = np.random.default_rng(5)
    pairs = [(rng.standard_normal((128, 160)).astype(np.float32), rng.standard_normal((160, 96)).astype(np.float32))
             for _ in range(4)]
    errors = []

    def work(a, b):
        for _ in range(10):
            c = np.empty((128, 96), np.float32)
            if bf16_matmul.sgemm(a, b, c) == 0:
                errors.append(relative_error(c, bf16(a) @ bf16(b)))

    threads = [threading.Thread(target=work, args=pair) for pair in pairs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors and max(errors) < 2e-6


def test_resolve_reads_the_choice_and_the_environment(monkeypatch):
    monkeypatch.delenv(bf16_matmul.ENV, raising=False)
    assert bf16_matmul.resolve("fp32") == "fp32"
    assert bf16_matmul.resolve("auto") == ("bf16" if bf16_matmul.available() else "fp32")
    monkeypatch.setenv(bf16_matmul.ENV, "fp32")
    assert bf16_matmul.resolve() == "fp32"
    assert bf16_matmul.resolve("auto") == ("bf16" if bf16_matmul.available() else "fp32")  # the argument wins
    with pytest.raises(ValueError, match="expected one of auto, fp32, bf16"):
        bf16_matmul.resolve("fp8")
    monkeypatch.setattr(bf16_matmul, "unavailable_reason", lambda: "this CPU has no AVX512-BF16")
    assert bf16_matmul.resolve("auto") == "fp32"
    with pytest.raises(ValueError, match="no AVX512-BF16"):
        bf16_matmul.resolve("bf16")
