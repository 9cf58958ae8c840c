"""Prove the installed package, not only the checkout.

Builds the wheel, checks that it holds no top-level package but ``mobileo_mlx``, installs it
(not editable) into a fresh venv beside the newest transformers (which brings Hugging Face's
``kernels``), and from a folder outside the checkout runs what a user runs first: generate and
ask with the demo model, the converter's help, doctor; both ``kernels`` packages must import.

    python .ci/wheel_check.py            (or: make wheel-check)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import venv
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*command, cwd: Path, env: dict | None = None, capture: bool = False) -> str:
    print("+", " ".join(str(c) for c in command), flush=True)
    result = subprocess.run([str(c) for c in command], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE if capture else None)
    if result.returncode:
        sys.exit(f"wheel check failed: {command[0]} exited with {result.returncode}")
    return result.stdout if capture else ""


def copy_checkout(target: Path) -> Path:
    """The checkout's files as git sees them (tracked, or new and not ignored), links kept:
    a build from here cannot pick up stale build/ folders or local leftovers."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source, destination = ROOT / name, target / name
        if not source.exists() and not source.is_symlink():
            continue  # deleted in the working tree
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, destination, follow_symlinks=False)
    return target


def check_wheel_contents(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    strays = {t for t in top if t != "mobileo_mlx" and not t.endswith(".dist-info")}
    if strays:
        sys.exit(f"wheel check failed: {wheel.name} installs top-level {sorted(strays)} beside mobileo_mlx")
    needed = ["mobileo_mlx/convert/from_torch.py", "mobileo_mlx/kernels/depthwise.py", "mobileo_mlx/cli.py",
              "mobileo_mlx/server/app.py"]
    if sys.platform.startswith("linux"):
        needed += ["mobileo_mlx/kernels/native/blas_shim", "mobileo_mlx/kernels/native/cpu_kernels"]
    missing = [n for n in needed if not any(name.startswith(n) for name in names)]
    if missing:
        sys.exit(f"wheel check failed: {wheel.name} lacks {missing}")
    print(f"{wheel.name}: {len(names)} files, top level {sorted(top)}")


IMPORTS = """
import importlib.metadata, pathlib, sys
import mobileo_mlx, mobileo_mlx.kernels.depthwise, mobileo_mlx.convert.from_torch
import kernels                      # Hugging Face's, a dependency of transformers
site = pathlib.Path(mobileo_mlx.__file__).parents[1]
assert pathlib.Path(kernels.__file__).is_relative_to(site / "kernels"), kernels.__file__
assert hasattr(kernels, "get_kernel"), "not Hugging Face's kernels package"
assert pathlib.Path(mobileo_mlx.kernels.depthwise.__file__).is_relative_to(site / "mobileo_mlx"), "not the wheel's"
print("transformers", importlib.metadata.version("transformers"), "| kernels", importlib.metadata.version("kernels"),
      "| mobileo-mlx", mobileo_mlx.__version__)
"""


def main() -> None:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mobileo-wheel-") as tmp:
        tmp = Path(tmp)
        source = copy_checkout(tmp / "source")
        run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", tmp / "dist", source, cwd=tmp)
        wheel = next((tmp / "dist").glob("mobileo_mlx-*.whl"))
        check_wheel_contents(wheel)

        venv.EnvBuilder(with_pip=True).create(tmp / "venv")
        bin_dir = tmp / "venv" / "bin"
        run(bin_dir / "python", "-m", "pip", "install", "--quiet", wheel, "--upgrade", "transformers", cwd=tmp)

        user = tmp / "elsewhere"  # not the checkout: nothing of it can be imported by accident
        user.mkdir()
        env = {**os.environ, "MOBILEO_MLX_CACHE": str(tmp / "cache"), "HF_HUB_OFFLINE": "1"}
        env.pop("PYTHONPATH", None)
        cli = bin_dir / "mobileo-mlx"
        run(bin_dir / "python", "-c", IMPORTS, cwd=user, env=env)
        run(cli, "--version", cwd=user, env=env)
        run(cli, "generate", "--model", "demo", "a red bicycle", "--steps", "2", "--seed", "0", "--size", "96",
            "-o", "bicycle.png", cwd=user, env=env)
        size = run(bin_dir / "python", "-c", "from PIL import Image; print(Image.open('bicycle.png').size)",
                   cwd=user, env=env, capture=True).strip()
        if size != "(96, 96)":
            sys.exit(f"wheel check failed: generate wrote a {size} picture")
        answer = run(cli, "ask", "--model", "demo", "bicycle.png", "What is in this picture?", "--max-tokens", "8",
                     cwd=user, env=env, capture=True)
        if not answer.strip():
            sys.exit("wheel check failed: ask printed no answer")
        for command in ([cli, "convert", "--help"], [bin_dir / "python", "-m", "mobileo_mlx.convert", "--help"]):
            if "--quantize" not in run(*command, cwd=user, env=env, capture=True):
                sys.exit(f"wheel check failed: {' '.join(map(str, command))} shows no converter options")
        # Without the `server` extra, serve names the extra to install (one line, status 2).
        has_server = run(bin_dir / "python", "-c", "import importlib.util as u; print(bool(u.find_spec('fastapi')))",
                         cwd=user, env=env, capture=True).strip() == "True"
        if not has_server:
            serve = subprocess.run([str(cli), "serve", "--model", "demo"], cwd=user, env=env, text=True,
                                   capture_output=True, timeout=300)
            if serve.returncode != 2 or "mobileo-mlx[server]" not in serve.stderr:
                sys.exit(f"wheel check failed: serve without its extra exited {serve.returncode}: "
                         f"{serve.stderr[-300:]}")
        doctor = run(cli, "doctor", "--size", "256", cwd=user, env=env, capture=True)
        print(doctor)
        native = re.search(r"^native CPU kernels\s+(.*)$", doctor, re.M)
        if sys.platform.startswith("linux") and ("OpenBLAS" not in doctor or not native
                                                 or not native.group(1).startswith("MLX graph nodes")):
            sys.exit("wheel check failed: the installed wheel lacks its BLAS routing or its native kernels")
    print(f"wheel check passed in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
