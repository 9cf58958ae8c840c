"""Golden outputs of the demo pipeline: refactoring must not change a byte.

The demo model's picture bytes (generate and edit) and answer tokens (ask, a two-turn chat) are
recorded in ``tests/data/golden.json``, for the default path, for ``MOBILEO_MLX_KERNELS=reference``
(the plain models), with every CPU size threshold lowered so that the demo's small tensors take
each CPU path the full-size model takes (stream splits, bands, native kernels), and the same with
bfloat16 CPU products (``bf16``: where the CPU has AVX512-BF16; by the AVX512-BF16 kernel also where
the CPU has AMX, whose tiles sum in another order). Code changes that leave the computation unchanged
must reproduce them exactly; a change that is meant to change the numbers updates the file in the
same commit, saying why:

    .venv/bin/python -m tests.test_golden --update

The pipeline runs in a child process with float32 CPU matmuls (but in ``bf16``) and OpenBLAS held
to one kernel family (``OPENBLAS_CORETYPE=Haswell``: AVX2), so every x86-64 machine sums in the same
order. Elsewhere (another BLAS) the bytes legitimately differ and the test says so instead of
comparing.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

GOLDEN = Path(__file__).resolve().parent / "data" / "golden.json"
MODES = ("auto", "reference", "small-thresholds", "bf16")

# The CPU's size thresholds, lowered for the "small-thresholds" mode: module -> {name: value}.
# Where a threshold moves, move it here too (same value): the recorded outputs must not change.
SMALL_THRESHOLDS = {
    "mobileo_mlx.backends.tuning": {
        "ACTIVATION_CHUNK": 256, "ATTENTION_CHUNK": 64, "ATTENTION_ROWS_CHUNK": 64, "BAND_PIXELS": 512,
        "SPLIT_MIN_WEIGHTS": 0, "DEPTHWISE_SPLIT_MIN_MACS": 0, "DEPTHWISE_NATIVE_MIN_MACS": 0,
        "LINEAR_ATTENTION_SPLIT_MIN_ELEMENTS": 0, "FFN_BAND_MIN_VALUES": 0, "FFN_BAND_ROWS": 48,
        "ATTENTION_NATIVE_MIN_MACS": 0, "GROUPED_POINTWISE_NATIVE_MIN_MACS": 0,
    },
}
# bf16: the small thresholds, and every product of the picture components in bfloat16.
BF16_THRESHOLDS = {"mobileo_mlx.backends.tuning": {**SMALL_THRESHOLDS["mobileo_mlx.backends.tuning"],
                                                   "BF16_MIN_PRODUCT": 0}}

RUN = r"""
import hashlib, importlib, json, os, sys
import numpy as np
import mobileo_mlx
from mobileo_mlx.processing import Message

for module, values in json.loads(os.environ.get("GOLDEN_THRESHOLDS", "{}")).items():
    module = importlib.import_module(module)
    for name, value in values.items():
        assert hasattr(module, name), f"{module.__name__}.{name} is gone: update SMALL_THRESHOLDS"
        setattr(module, name, value)

model = mobileo_mlx.load("demo")
out = {}
picture = model.generate("a red bicycle leaning on a wall", steps=3, guidance=1.5, seed=7, size=96)
out["generate"] = hashlib.sha256(np.asarray(picture).tobytes()).hexdigest()
edited = model.edit(picture, "make it blue", steps=3, guidance=1.5, seed=8, size=64)
out["edit"] = hashlib.sha256(np.asarray(edited).tobytes()).hexdigest()
out["ask"] = [r.token for r in model.ask(picture, "What is in this picture?", max_tokens=12, stream=True)]
turns = [Message("user", "Hello, who are you?"), Message("assistant", "A model."),
         Message("user", "Describe the picture.", images=(picture,))]
out["chat"] = [r.token for r in model.chat(turns, max_tokens=12, stream=True)]
print(json.dumps(out))
"""


def _comparable(mode: str) -> str | None:
    """Why the recorded bytes cannot be compared here, or None."""
    if not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "AMD64"):
        return f"recorded on Linux x86-64 with OpenBLAS; this is {sys.platform} {platform.machine()}"
    if mode == "bf16":
        from mobileo_mlx import backends

        reason = backends.bf16_unavailable_reason()
        if reason is not None:
            return f"bf16 CPU products need AVX512-BF16 and the native kernels: {reason}"
    return None


def run_pipeline(mode: str, cache: Path) -> dict:
    env = {**os.environ, "MOBILEO_MLX_CACHE": str(cache), "OPENBLAS_CORETYPE": "Haswell",
           "MOBILEO_MLX_CPU_MATMUL": "bf16" if mode == "bf16" else "fp32"}
    env.pop("MOBILEO_MLX_KERNELS", None)
    env.pop("MOBILEO_MLX_BF16_GEMM", None)
    if mode == "bf16":  # recorded with the AVX512-BF16 kernel; AMX sums in another order
        env["MOBILEO_MLX_BF16_GEMM"] = "avx512"
    if mode == "reference":
        env["MOBILEO_MLX_KERNELS"] = mode
    if mode in ("small-thresholds", "bf16"):
        env["GOLDEN_THRESHOLDS"] = json.dumps(SMALL_THRESHOLDS if mode == "small-thresholds" else BF16_THRESHOLDS)
    result = subprocess.run([sys.executable, "-c", RUN], capture_output=True, text=True, env=env, timeout=600,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", MODES)
def test_demo_pipeline_outputs_are_unchanged(mode, tmp_path):
    reason = _comparable(mode)
    if reason:
        pytest.skip(reason)
    recorded = json.loads(GOLDEN.read_text())[mode]
    assert run_pipeline(mode, tmp_path / "cache") == recorded, (
        "the demo pipeline's outputs changed; if that is intended, run "
        "`.venv/bin/python -m tests.test_golden --update` and say why in the commit")


def _update() -> None:
    import tempfile

    reasons = [r for r in map(_comparable, MODES) if r]
    if reasons:
        sys.exit(f"cannot record every mode here: {reasons[0]}")
    with tempfile.TemporaryDirectory() as tmp:
        recorded = {mode: run_pipeline(mode, Path(tmp) / "cache") for mode in MODES}
    GOLDEN.write_text(json.dumps(recorded, indent=1) + "\n")
    digest = hashlib.sha256(GOLDEN.read_bytes()).hexdigest()[:12]
    print(f"wrote {GOLDEN} ({digest})")


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        sys.exit("usage: python -m tests.test_golden --update")
    _update()
