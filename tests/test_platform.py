"""Foundation: BLAS routing on every entry point, backend facts, doctor, --version."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mobileo_mlx
from mobileo_mlx import _blas, platform

ROOT = Path(__file__).resolve().parents[1]
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="BLAS routing is Linux-only")


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {key: value for key, value in {**os.environ, **env}.items() if value is not None}  # None: unset
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=full_env, timeout=120
    )


@linux_only
def test_mlx_sgemm_resolves_to_openblas_in_this_process():
    # conftest imports mobileo_mlx before mlx, like every entry point must.
    assert _blas.status().routed, _blas.status()
    answering = _blas.global_symbol_library("cblas_sgemm")
    assert answering is not None and ("blas_shim" in answering or "openblas" in answering), answering


@linux_only
@pytest.mark.parametrize(
    "entry",
    ["import mobileo_mlx", "import mobileo_mlx.convert.from_torch", "import mobileo_mlx.kernels.depthwise",
     "import mobileo_mlx.convert.mapping"],
)
def test_every_entry_point_routes_blas_before_mlx(entry):
    code = f"{entry}\nfrom mobileo_mlx import _blas\nimport mlx.core\nprint(_blas.global_symbol_library())"
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert "blas_shim" in result.stdout or "openblas" in result.stdout, result.stdout


@linux_only
def test_importing_mlx_first_warns_once_with_the_fix():
    result = run_python("import mlx.core\nimport mobileo_mlx\nimport mobileo_mlx.convert.from_torch\nprint('ok')")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("mlx.core was imported before mobileo_mlx") == 1, result.stderr
    assert "Import mobileo_mlx" in result.stderr


@linux_only
def test_opt_out_keeps_reference_blas():
    result = run_python(
        "import mobileo_mlx\nfrom mobileo_mlx import _blas\nprint(_blas.status().routed, _blas.global_symbol_library())",
        MOBILEO_MLX_BLAS="reference",
    )
    assert result.stdout.split() == ["False", "None"], result.stdout + result.stderr


IDLE_CPU_AFTER_MATMUL = """
import os, resource, time
import mobileo_mlx, mlx.core as mx
a = mx.random.normal((1024, 1024)); mx.eval(a)
def idle_cpu():  # CPU seconds the process burns in the 0.3 s after a threaded matmul
    mx.eval(a @ a)
    start = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
    time.sleep(0.3)
    return sum(resource.getrusage(resource.RUSAGE_SELF)[:2]) - start
print(max(idle_cpu() for _ in range(3)), os.environ.get("OPENBLAS_THREAD_TIMEOUT"))
"""


@linux_only
def test_openblas_threads_sleep_after_a_matmul_and_the_environment_is_left_alone():
    # OpenBLAS's idle threads spin for ~0.1 s after each call unless told otherwise; the
    # second CPU stream (platform.cpu_pieces) needs that core. The user's setting wins.
    if (os.cpu_count() or 1) < 2:
        pytest.skip("OpenBLAS runs no worker thread on one core")
    spinning = run_python(IDLE_CPU_AFTER_MATMUL, OPENBLAS_THREAD_TIMEOUT="28")
    assert spinning.returncode == 0, spinning.stderr
    spun, setting = spinning.stdout.split()
    # The measurement sees spinning (less of it when other processes hold the cores).
    assert float(spun) > 0.02 and setting == "28", spinning.stdout
    ours = run_python(IDLE_CPU_AFTER_MATMUL, OPENBLAS_THREAD_TIMEOUT=None)
    assert ours.returncode == 0, ours.stderr
    burnt, setting = ours.stdout.split()
    assert float(burnt) < min(0.03, float(spun) / 3), (ours.stdout, spinning.stdout)
    assert setting == "None"  # set only while OpenBLAS loaded: child processes see no change


@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 13, 5), (64, 33, 129), (200, 96, 300)])
def test_routed_matmul_is_correct(shape, transpose_a, transpose_b):
    # The shim forwards every argument (order, transposes, leading dims, alpha/beta):
    # a wrong one shows up as a wrong product on some of these layouts.
    m, k, n = shape
    rng = np.random.default_rng(0)
    a = rng.standard_normal((k, m) if transpose_a else (m, k)).astype(np.float32)
    b = rng.standard_normal((n, k) if transpose_b else (k, n)).astype(np.float32)
    ma, mb = mx.array(a), mx.array(b)
    got = (ma.T if transpose_a else ma) @ (mb.T if transpose_b else mb)
    expected = (a.T if transpose_a else a).astype(np.float64) @ (b.T if transpose_b else b).astype(np.float64)
    np.testing.assert_allclose(np.array(got), expected, rtol=1e-4, atol=1e-4 * np.sqrt(k))


def test_addmm_uses_alpha_and_beta():
    rng = np.random.default_rng(1)
    c, a, b = (rng.standard_normal(s).astype(np.float32) for s in [(9, 11), (9, 6), (6, 11)])
    got = mx.addmm(mx.array(c), mx.array(a), mx.array(b), alpha=0.5, beta=2.0)
    np.testing.assert_allclose(np.array(got), 2.0 * c + 0.5 * (a @ b), rtol=1e-5, atol=1e-5)


def test_backend_facts():
    assert platform.backend() in {"cpu", "metal", "cuda"}
    assert platform.compute_dtype() in {mx.float32, mx.float16}
    if platform.backend() == "cpu":
        assert platform.compute_dtype() == mx.float32


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(platform.CACHE_ENV, str(tmp_path / "c"))
    assert platform.cache_dir() == tmp_path / "c"
    monkeypatch.delenv(platform.CACHE_ENV)
    assert platform.cache_dir() == Path.home() / ".cache" / "mobileo-mlx"


def cli(*args, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mobileo_mlx", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **env},
        timeout=300,
    )


def test_version():
    result = cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"mobileo-mlx {mobileo_mlx.__version__}"


def test_doctor_reports_backend_blas_and_cache(tmp_path):
    (tmp_path / "some-model").mkdir()
    (tmp_path / "some-model" / "config.json").write_text("{}")
    (tmp_path / "converted" / "other" / "vae").mkdir(parents=True)
    (tmp_path / "converted" / "other" / "config.json").write_text("{}")
    (tmp_path / "converted" / "other" / "vae" / "config.json").write_text("{}")
    result = cli("doctor", "--size", "256", MOBILEO_MLX_CACHE=str(tmp_path))
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(None, 1) if "  " not in line else [p.strip() for p in line.split("  ", 1)]
                 for line in result.stdout.strip().splitlines())
    assert lines["backend"].startswith(platform.backend())
    assert lines["cache folder"] == str(tmp_path)
    # Only converted models that pass the check are listed (tests/test_files.py lists a real one).
    assert lines["cached models"] == "none"
    assert lines["cache check"].startswith("1 broken, converted again on next use: converted/other (")
    assert lines["mlx"] == mx.__version__
    assert "GFLOP/s" in lines["fp32 matmul 256^3"]
    if sys.platform.startswith("linux"):
        assert "OpenBLAS" in lines["BLAS"]
        expected = os.environ.get("OPENBLAS_THREAD_TIMEOUT", "4")
        assert lines["OPENBLAS_THREAD_TIMEOUT"].startswith(expected + " ("), lines
        from mobileo_mlx.kernels import primitives

        kernel = primitives.bf16_kernel()  # amx or avx512-bf16 where the bf16 GEMM runs
        assert lines["native CPU kernels"] == ("MLX graph nodes" if kernel is None
                                               else f"MLX graph nodes (bf16 GEMM: {kernel})"), lines
    from mobileo_mlx import backends

    if platform.backend() == "cpu":
        expected_bf16 = "available, " if backends.bf16_unavailable_reason() is None else "unavailable ("
        assert lines["bf16 CPU matmuls"].startswith(expected_bf16), lines
