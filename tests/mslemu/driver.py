"""Driver of the Metal emulator: ``metal_kernel(...)`` with MLX's constructor and call.

The kernel source is generated exactly as MLX generates it (``generate_source``,
checked byte for byte against MLX in tests/test_mslemu.py), compiled with g++
against ``include/mslemu.h`` + ``include/mlx_prelude.h``, cached by hash, and run
through ctypes (or, with ``sanitize=True``, as a separate ASan/UBSan executable).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

try:  # the project's rule: mobileo_mlx (BLAS routing) before mlx.core
    import mobileo_mlx  # noqa: F401
except ImportError:  # pragma: no cover - the emulator also works outside the project
    pass
import mlx.core as mx  # noqa: E402

INCLUDE_DIR = Path(__file__).resolve().parent / "include"
SCHEDULES = ("forward", "reverse", "random", "eager")
_SCHED_ID = {name: i for i, name in enumerate(SCHEDULES)}
MAX_CONSTANT_ARRAY_SIZE = 8  # MLX: inputs with fewer elements go to the constant address space
MAX_THREADS_PER_THREADGROUP = 1024
CXX_FLAGS = ["-std=c++20", "-O2", "-march=native", "-fwrapv", "-fno-strict-aliasing",
             "-Wno-attributes", "-Wno-literal-suffix", "-Wno-unused-variable", "-Wno-unused-but-set-variable"]
SAN_FLAGS = ["-std=c++20", "-O1", "-g", "-fno-omit-frame-pointer", "-fwrapv", "-fno-strict-aliasing",
             "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
             "-Wno-attributes", "-Wno-literal-suffix", "-Wno-unused-variable", "-Wno-unused-but-set-variable"]

# MLX's attribute table: (name, type), in the order MLX writes them into the signature.
ATTRIBUTES = (
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
)

# MLX dtype -> (type string in generated Metal, numpy dtype holding the raw values)
_TYPES: dict[Any, tuple[str, Any]] = {
    mx.bool_: ("bool", np.bool_),
    mx.uint8: ("uint8_t", np.uint8),
    mx.uint16: ("uint16_t", np.uint16),
    mx.uint32: ("uint32_t", np.uint32),
    mx.uint64: ("uint64_t", np.uint64),
    mx.int8: ("int8_t", np.int8),
    mx.int16: ("int16_t", np.int16),
    mx.int32: ("int32_t", np.int32),
    mx.int64: ("int64_t", np.int64),
    mx.float16: ("float16_t", np.float16),
    mx.bfloat16: ("bfloat16_t", np.uint16),  # raw bits
    mx.float32: ("float", np.float32),
    mx.complex64: ("complex64_t", np.complex64),
}
_NP_TO_MX = {np.dtype(np.bool_): mx.bool_, np.dtype(np.uint8): mx.uint8, np.dtype(np.uint16): mx.uint16,
             np.dtype(np.uint32): mx.uint32, np.dtype(np.uint64): mx.uint64, np.dtype(np.int8): mx.int8,
             np.dtype(np.int16): mx.int16, np.dtype(np.int32): mx.int32, np.dtype(np.int64): mx.int64,
             np.dtype(np.float16): mx.float16, np.dtype(np.float32): mx.float32}

_SYNC_RE = re.compile(r"\b(threadgroup_barrier|simdgroup_barrier|simd_\w+|quad_\w+)\s*\(")
# `threadgroup T name[dims];` (one declaration per statement; no initialiser)
_TG_DECL_RE = re.compile(
    r"\bthreadgroup\s+(?P<type>[A-Za-z_][\w:]*(?:\s*<[^;{}]*?>)?)\s+(?P<name>[A-Za-z_]\w*)\s*"
    r"(?P<dims>(?:\[[^\];]+\]\s*)*);")
_LINT = (
    (re.compile(r"\bsimd_lane_id\b|\bsimd_group_id\b"),
     "MLX declares no `simd_lane_id`/`simd_group_id`; use thread_index_in_simdgroup / simdgroup_index_in_threadgroup"),
    (re.compile(r"\bdouble\b"), "Metal has no `double`"),
    (re.compile(r"\bstd::"), "`std::` is not available in Metal"),
)


class MslemuError(RuntimeError):
    """A kernel failed to compile, failed at run time, or broke a rule the emulator checks."""


def type_string(dtype) -> str:
    try:
        return _TYPES[dtype][0]
    except KeyError:
        raise MslemuError(f"unsupported dtype {dtype}") from None


# ---------------------------------------------------------------------------
# Source generation: MLX's rules (mlx/backend/common/metal_kernel.cpp)
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class InputMeta:
    dtype: Any
    ndim: int
    size: int


def _template_def(template: Sequence[tuple[str, Any]]) -> str:
    parts = []
    for _, arg in template:
        if isinstance(arg, bool):
            parts.append("1" if arg else "0")
        elif isinstance(arg, int):
            parts.append(str(arg))
        else:
            parts.append(type_string(arg))
    return "<" + ", ".join(parts) + ">"


def kernel_name(name: str, inputs: Sequence[InputMeta], output_dtypes: Sequence[Any],
                template: Sequence[tuple[str, Any]] = ()) -> str:
    out = "custom_kernel_" + name
    if template:
        h = re.sub(r"<|>|, ", "_", _template_def(template))[:-1]
        out += "_" + h
    for m in inputs:
        out += "_" + type_string(m.dtype)
        if m.ndim == 0:
            out += "s"
        elif m.size < MAX_CONSTANT_ARRAY_SIZE:
            out += "c"
    for dt in output_dtypes:
        out += "_" + type_string(dt)
    return out


def shape_infos(input_names: Sequence[str], source: str) -> list[tuple[bool, bool, bool]]:
    return [(f"{n}_shape" in source, f"{n}_strides" in source, f"{n}_ndim" in source) for n in input_names]


def attributes(source: str) -> list[tuple[str, str]]:
    return [(a, t) for a, t in ATTRIBUTES if a in source]


@dataclasses.dataclass
class Generated:
    kernel_name: str
    source: str            # exactly what MLX generates (and prints with verbose=True)
    header: str
    signature: str         # template line + signature up to and including ") {\n"
    body: str
    tail: str              # "\n}\n" + explicit instantiation
    template_def: str
    buffers: list[tuple[str, str, str]]  # (kind, c_type, name) in buffer order
    attrs: list[tuple[str, str]]


def generate_source(name: str, input_names: Sequence[str], output_names: Sequence[str], source: str,
                    header: str, inputs: Sequence[InputMeta], output_dtypes: Sequence[Any],
                    template: Sequence[tuple[str, Any]] = (), atomic_outputs: bool = False) -> Generated:
    kname = kernel_name(name, inputs, output_dtypes, template)
    infos = shape_infos(input_names, source)
    attrs = attributes(source)
    sig = ""
    if template:
        kinds = []
        for tname, arg in template:
            kind = "bool" if isinstance(arg, bool) else ("int" if isinstance(arg, int) else "typename")
            kinds.append(f"{kind} {tname}")
        sig += "template <" + ", ".join(kinds) + ">\n"
    sig += f"[[kernel]] void {kname}(\n"
    buffers: list[tuple[str, str, str]] = []
    index = 0
    for iname, meta, info in zip(input_names, inputs, infos):
        ts = type_string(meta.dtype)
        location = "constant" if meta.size < MAX_CONSTANT_ARRAY_SIZE else "device"
        ref = "&" if meta.ndim == 0 else "*"
        sig += f"  const {location} {ts}{ref} {iname} [[buffer({index})]],\n"
        buffers.append(("scalar" if meta.ndim == 0 else "input", ts, iname))
        index += 1
        if meta.ndim > 0:
            if info[0]:
                sig += f"  const constant int* {iname}_shape [[buffer({index})]],\n"
                buffers.append(("shape", "int", iname))
                index += 1
            if info[1]:
                sig += f"  const constant int64_t* {iname}_strides [[buffer({index})]],\n"
                buffers.append(("strides", "int64_t", iname))
                index += 1
            if info[2]:
                sig += f"  const constant int& {iname}_ndim [[buffer({index})]],\n"
                buffers.append(("ndim", "int", iname))
                index += 1
    for oname, dt in zip(output_names, output_dtypes):
        ts = type_string(dt)
        ptype = f"atomic<{ts}>" if atomic_outputs else ts
        sig += f"  device {ptype}* {oname} [[buffer({index})]]"
        buffers.append(("output", ptype, oname))
        # (sic) MLX compares the running buffer index with the number of inputs + outputs
        if index < len(inputs) + len(output_names) - 1 or len(attrs) > 0:
            sig += ",\n"
        else:
            sig += ") {\n"
        index += 1
    for i, (attr, atype) in enumerate(attrs):
        sig += f"  {atype} {attr} [[{attr}]]"
        sig += ",\n" if i < len(attrs) - 1 else ") {\n"
    tail = "\n}\n"
    tdef = ""
    if template:
        tdef = _template_def(template)
        full = kname + tdef
        tail += f'\ntemplate [[host_name("{kname}")]] [[kernel]] decltype({full}) {full};\n'
    src = header + sig + source + tail
    return Generated(kname, src, header, sig, source, tail, tdef, buffers, attrs)


def lint(source: str, header: str = "") -> list[str]:
    text = header + "\n" + source
    return [msg for rx, msg in _LINT if rx.search(text)]


# ---------------------------------------------------------------------------
# Compilation (cached by hash)
# ---------------------------------------------------------------------------
def cache_dir() -> Path:
    root = os.environ.get("MSLEMU_CACHE")
    path = Path(root) if root else Path(tempfile.gettempdir()) / f"mslemu-cache-{os.getuid()}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _cxx() -> str:
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise MslemuError(
            f"the Metal emulator needs a C++20 compiler: `{cxx}` was not found "
            "(install g++ >= 12, or set CXX)")
    return cxx


def _rewrite_threadgroup(body: str) -> str:
    """`threadgroup T a[N];` -> a reference to per-threadgroup heap storage (same line)."""

    def repl(m: re.Match) -> str:
        t, n, dims = m.group("type"), m.group("name"), re.sub(r"\s+", "", m.group("dims"))
        alias = f"mslemu_tg_{n}_t"
        return (f"using {alias} = {t}{dims}; {alias}& {n} = "
                f"*::mslemu::tg_array<{alias}>([]() -> const void* {{ static char k_; return &k_; }}());")

    return _TG_DECL_RE.sub(repl, body)


def _translation_unit(gen: Generated, template: Sequence[tuple[str, Any]]) -> str:
    parts = ['#include "mslemu_pch.h"\n']
    if gen.header:
        parts.append('#line 1 "header"\n')
        parts.append(gen.header)
    # (a header that does not end its last line runs into the signature, as in MLX: no directive there)
    if not gen.header or gen.header.endswith("\n"):
        parts.append('#line 1 "signature"\n')
    parts.append(gen.signature)
    parts.append('#line 1 "source"\n')
    parts.append(_rewrite_threadgroup(gen.body))
    parts.append(gen.tail)
    # launcher
    lines = ["", "#line 1 \"mslemu_launcher\"",
             'extern "C" int mslemu_launch(void** b, const mslemu::LaunchCfg* cfg, char* msg, int cap) {']
    args = []
    for i, (kind, ctype, name) in enumerate(gen.buffers):
        var = f"a{i}"
        if kind == "input":
            lines.append(f"  auto* {var} = static_cast<const {ctype}*>(b[{i}]);")
        elif kind == "scalar":
            lines.append(f"  const {ctype}& {var} = *static_cast<const {ctype}*>(b[{i}]);")
        elif kind == "shape":
            lines.append(f"  auto* {var} = static_cast<const int*>(b[{i}]);")
        elif kind == "strides":
            lines.append(f"  auto* {var} = static_cast<const int64_t*>(b[{i}]);")
        elif kind == "ndim":
            lines.append(f"  const int& {var} = *static_cast<const int*>(b[{i}]);")
        else:
            lines.append(f"  auto* {var} = static_cast<{ctype}*>(b[{i}]);")
        args.append(var)
    args += [f"c.{a}" for a, _ in gen.attrs]
    targs = gen.template_def if template else ""
    lines.append(f"  auto fn = [&](const mslemu::ThreadCtx& c) {{ {gen.kernel_name}{targs}({', '.join(args)}); }};")
    lines.append("  return mslemu::launch(*cfg, fn, msg, cap);")
    lines.append("}")
    return "".join(parts) + "\n".join(lines) + "\n"


_SANITIZE_MAIN = r"""
// sanitizer executable: buffers from files into exact-size heap blocks, run, write outputs back
int main(int argc, char** argv) {
  if (argc < 2) return 4;
  std::FILE* spec = std::fopen(argv[1], "r");
  if (!spec) return 4;
  void* bufs[256];
  char* out_ptr[256];
  size_t out_size[256];
  char out_path[256][1024];
  int nbuf = 0, nout = 0;
  mslemu::LaunchCfg cfg{};
  char kind[16];
  while (std::fscanf(spec, "%15s", kind) == 1) {
    if (std::strcmp(kind, "cfg") == 0) {
      unsigned long long seed;
      if (std::fscanf(spec, "%u %u %u %u %u %u %d %d %llu %d %d", &cfg.grid[0], &cfg.grid[1], &cfg.grid[2],
                      &cfg.tg[0], &cfg.tg[1], &cfg.tg[2], &cfg.sched, &cfg.workers, &seed, &cfg.fiber_mode,
                      &cfg.stack_kb) != 11) return 4;
      cfg.seed = seed;
      continue;
    }
    size_t nbytes, offset;
    char path[1024];
    if (std::fscanf(spec, "%zu %zu %1023s", &nbytes, &offset, path) != 3 || nbuf == 256) return 4;
    char* p = static_cast<char*>(std::malloc(nbytes ? nbytes : 1));  // exact size
    std::FILE* f = std::fopen(path, "rb");
    if (!f || (nbytes && std::fread(p, 1, nbytes, f) != nbytes)) return 3;
    std::fclose(f);
    bufs[nbuf++] = p + offset;
    if (std::strcmp(kind, "out") == 0) {
      out_ptr[nout] = p;
      out_size[nout] = nbytes;
      std::strcpy(out_path[nout++], path);
    }
  }
  std::fclose(spec);
  static char msg[1 << 16];
  int errors = mslemu_launch(bufs, &cfg, msg, int(sizeof(msg)));
  std::fputs(msg, stdout);
  for (int i = 0; i < nout; ++i) {
    std::FILE* f = std::fopen(out_path[i], "wb");
    std::fwrite(out_ptr[i], 1, out_size[i], f);
    std::fclose(f);
  }
  return errors ? 2 : 0;
}
"""

_compile_lock = threading.Lock()


def _header_digest() -> str:
    h = hashlib.sha256()
    for p in sorted(INCLUDE_DIR.iterdir()):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _rt_san_obj(cxx: str) -> Path:
    """The runtime compiled with the sanitizer flags (an object file linked into each sanitizer build)."""
    digest = _header_digest()
    obj = cache_dir() / f"mslemu_rt_san-{digest}-{hashlib.sha256(' '.join(SAN_FLAGS).encode()).hexdigest()[:8]}.o"
    if obj.exists():
        return obj
    tmp = obj.with_name(obj.name + f".{os.getpid()}.tmp")
    cmd = [cxx, *SAN_FLAGS, "-c", f"-I{INCLUDE_DIR}", str(INCLUDE_DIR / "mslemu_rt.cpp"), "-o", str(tmp)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise MslemuError("building the emulator runtime (sanitizer) failed:\n" + res.stderr)
    os.replace(tmp, obj)
    return obj


def _rt_lib(cxx: str) -> Path:
    """The runtime (mslemu_rt.cpp) as a shared library, built once per header version."""
    digest = _header_digest()
    d = cache_dir() / f"rt-{digest}-{hashlib.sha256(' '.join(CXX_FLAGS).encode()).hexdigest()[:8]}"
    name = f"libmslemu_rt_{digest}.so"
    lib = d / name
    if lib.exists():
        return lib
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f"{name}.{os.getpid()}.tmp"
    cmd = [cxx, *CXX_FLAGS, "-fPIC", "-shared", f"-Wl,-soname,{name}", f"-I{INCLUDE_DIR}",
           str(INCLUDE_DIR / "mslemu_rt.cpp"), "-o", str(tmp), "-lpthread"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise MslemuError("building the emulator runtime failed:\n" + res.stderr)
    os.replace(tmp, lib)
    return lib


def _pch_dir(cxx: str) -> Path:
    """Precompiled shim + prelude for the in-process flags (built once per header version)."""
    d = cache_dir() / f"pch-{_header_digest()}-{hashlib.sha256(' '.join(CXX_FLAGS).encode()).hexdigest()[:8]}"
    gch = d / "mslemu_pch.h.gch"
    if gch.exists():
        return d
    d.mkdir(parents=True, exist_ok=True)
    hdr = d / "mslemu_pch.h"
    hdr.write_text('#pragma once\n#include "mslemu.h"\n#include "mlx_prelude.h"\n')
    tmp = d / f"mslemu_pch.h.gch.{os.getpid()}"
    cmd = [cxx, *CXX_FLAGS, "-fPIC", "-x", "c++-header", f"-I{INCLUDE_DIR}", str(hdr), "-o", str(tmp)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise MslemuError("building the emulator's precompiled header failed:\n" + res.stderr)
    os.replace(tmp, gch)
    return d


def compile_unit(tu: str, sanitize: bool = False) -> tuple[Path, float]:
    """Compile a translation unit to a shared library (or a sanitizer executable); cached."""
    cxx = _cxx()
    flags = SAN_FLAGS if sanitize else CXX_FLAGS
    key = hashlib.sha256("\0".join([_header_digest(), cxx, " ".join(flags), tu,
                                    _SANITIZE_MAIN if sanitize else ""]).encode()).hexdigest()[:24]
    out = cache_dir() / (f"{key}.san" if sanitize else f"{key}.so")
    if out.exists():
        return out, 0.0
    with _compile_lock:
        if out.exists():
            return out, 0.0
        t0 = time.perf_counter()
        src = cache_dir() / f"{key}.cpp"
        tmp = out.with_name(out.name + f".{os.getpid()}.tmp")
        if sanitize:
            pch_include = cache_dir() / "san-include"
            pch_include.mkdir(exist_ok=True)
            (pch_include / "mslemu_pch.h").write_text('#pragma once\n#include "mslemu.h"\n#include "mlx_prelude.h"\n')
            src.write_text(tu + _SANITIZE_MAIN)
            cmd = [cxx, *flags, f"-I{pch_include}", f"-I{INCLUDE_DIR}", str(src), str(_rt_san_obj(cxx)),
                   "-o", str(tmp), "-lpthread"]
        else:
            pch = _pch_dir(cxx)
            rt = _rt_lib(cxx)
            src.write_text(tu)
            cmd = [cxx, *flags, "-fPIC", "-shared", f"-I{pch}", f"-I{INCLUDE_DIR}", str(src), "-o", str(tmp),
                   str(rt), f"-Wl,-rpath,{rt.parent}"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise MslemuError(f"kernel failed to compile (g++, {src}):\n{_trim_compiler(res.stderr)}")
        os.replace(tmp, out)
        return out, time.perf_counter() - t0


def _trim_compiler(err: str, limit: int = 6000) -> str:
    keep = [ln for ln in err.splitlines() if "mslemu.h" not in ln or "error" in ln]
    text = "\n".join(keep)
    return text if len(text) <= limit else text[:limit] + "\n..."


_libs: dict[Path, Any] = {}


def _load(path: Path):
    lib = _libs.get(path)
    if lib is None:
        lib = ctypes.CDLL(str(path))
        fn = lib.mslemu_launch
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
        _libs[path] = lib
    return lib


class _LaunchCfg(ctypes.Structure):
    _fields_ = [("grid", ctypes.c_uint32 * 3), ("tg", ctypes.c_uint32 * 3), ("sched", ctypes.c_int32),
                ("workers", ctypes.c_int32), ("seed", ctypes.c_uint64), ("fiber_mode", ctypes.c_int32),
                ("stack_kb", ctypes.c_int32)]


# ---------------------------------------------------------------------------
# Settings, records
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class Settings:
    schedule: str = "forward"
    seed: int = 0
    workers: int = 0          # 0: os.cpu_count()
    sanitize: bool = False
    strict: bool = True       # raise on warnings, unwritten outputs and lint findings


_settings = threading.local()
_records: list[list[dict]] = []


def current_settings() -> Settings:
    s = getattr(_settings, "value", None)
    if s is None:
        s = _settings.value = Settings()
    return s


@contextlib.contextmanager
def settings(**kw):
    """Temporarily change how emulated kernels run (schedule, seed, workers, sanitize, strict)."""
    old = current_settings()
    new = dataclasses.replace(old, **kw)
    if new.schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}")
    _settings.value = new
    try:
        yield new
    finally:
        _settings.value = old


@contextlib.contextmanager
def record():
    """Collect the report of every emulated kernel call made inside the block."""
    calls: list[dict] = []
    _records.append(calls)
    try:
        yield calls
    finally:
        _records.remove(calls)


# ---------------------------------------------------------------------------
# Buffers
# ---------------------------------------------------------------------------
def _raw_numpy(a, row_contiguous: bool) -> tuple[np.ndarray, Any]:
    """An input as (numpy array of raw values, MLX dtype). Keeps MLX's strides unless asked not to."""
    if isinstance(a, mx.array):
        dt = a.dtype
        if dt == mx.bfloat16:
            a = a.view(mx.uint16)
        arr = np.asarray(a)
    else:
        arr = np.asarray(a)
        if arr.dtype not in _NP_TO_MX:
            raise MslemuError(f"unsupported numpy dtype {arr.dtype}")
        dt = _NP_TO_MX[arr.dtype]
    if row_contiguous and not arr.flags["C_CONTIGUOUS"]:
        arr = np.ascontiguousarray(arr)
    return arr, dt


def _strides_elems(arr: np.ndarray) -> list[int]:
    out = []
    for s in arr.strides:
        if s % arr.itemsize:
            raise MslemuError("input strides are not a multiple of the element size")
        out.append(s // arr.itemsize)
    return out


def _span(arr: np.ndarray) -> tuple[int, int]:
    """(lowest, one-past-highest) byte offsets of the elements relative to arr's data pointer."""
    lo = hi = 0
    for n, s in zip(arr.shape, arr.strides):
        if n == 0:
            return 0, 0
        if s < 0:
            lo += (n - 1) * s
        else:
            hi += (n - 1) * s
    return lo, hi + arr.itemsize


def _to_mx(arr: np.ndarray, dtype) -> mx.array:
    if dtype == mx.bfloat16:
        return mx.array(arr).view(mx.bfloat16)
    return mx.array(arr)


# ---------------------------------------------------------------------------
# The kernel object
# ---------------------------------------------------------------------------
class Kernel:
    def __init__(self, name: str, input_names: Sequence[str], output_names: Sequence[str], source: str,
                 header: str = "", ensure_row_contiguous: bool = True, atomic_outputs: bool = False,
                 compile_options: dict | None = None):
        if not output_names:
            raise ValueError("[metal_kernel] Must specify at least one output.")
        self.name = name
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.source = source
        self.header = header
        self.ensure_row_contiguous = ensure_row_contiguous
        self.atomic_outputs = atomic_outputs
        self.compile_options = compile_options
        self.fiber_mode = bool(_SYNC_RE.search(header + "\n" + source))
        self.lint = lint(source, header)
        self.last: dict = {}

    # MLX's call signature (+ emulator-only keywords, which default to the current settings)
    def __call__(self, *, inputs, output_shapes, output_dtypes, grid, threadgroup, template=None,
                 init_value=None, verbose=False, stream=None, schedule=None, seed=None, workers=None,
                 sanitize=None, strict=None):
        st = current_settings()
        schedule = st.schedule if schedule is None else schedule
        seed = st.seed if seed is None else seed
        workers = st.workers if workers is None else workers
        sanitize = st.sanitize if sanitize is None else sanitize
        strict = st.strict if strict is None else strict
        template = list(template or [])
        if len(inputs) != len(self.input_names):
            raise ValueError(f"[metal_kernel] Expected `inputs` to have size {len(self.input_names)} "
                             f"but got size {len(inputs)}.")
        if len(output_shapes) != len(self.output_names) or len(output_dtypes) != len(self.output_names):
            raise ValueError("[metal_kernel] output_shapes / output_dtypes must match output_names")
        grid = tuple(int(g) for g in grid)
        tg_req = tuple(int(t) for t in threadgroup)
        if len(grid) != 3 or len(tg_req) != 3:
            raise ValueError("grid and threadgroup take three sizes")
        if tg_req[0] * tg_req[1] * tg_req[2] > MAX_THREADS_PER_THREADGROUP:
            raise MslemuError(f"Thread group size ({tg_req[0] * tg_req[1] * tg_req[2]}) is greater than the "
                              f"maximum allowed threads per threadgroup ({MAX_THREADS_PER_THREADGROUP}).")
        tg = tuple(min(t, g) for t, g in zip(tg_req, grid))

        arrays = [_raw_numpy(a, self.ensure_row_contiguous) for a in inputs]
        metas = [InputMeta(dt, arr.ndim, arr.size) for arr, dt in arrays]
        gen = generate_source(self.name, self.input_names, self.output_names, self.source, self.header,
                              metas, list(output_dtypes), template, self.atomic_outputs)
        if verbose:
            print(f"Generated source code for `{self.name}`:\n```\n{gen.source}\n```")
        for _, dt in arrays:
            if dt == mx.complex64:
                raise MslemuError("complex inputs are not supported by the emulator")
        tu = _translation_unit(gen, template)
        path, compile_s = compile_unit(tu, sanitize=sanitize)

        # buffers in MLX's order
        keep: list[np.ndarray] = []
        ptrs: list[int] = []
        san_bufs: list[tuple[str, np.ndarray, int]] = []  # (kind, bytes array, offset)
        for kind, _ctype, name in gen.buffers:
            if kind in ("input", "scalar"):
                arr, _ = arrays[self.input_names.index(name)]
                keep.append(arr)
                ptrs.append(arr.ctypes.data)
                if arr.ndim == 0:
                    san_bufs.append(("in", np.frombuffer(arr.tobytes(), np.uint8), 0))
                else:  # the exact byte span the (possibly strided) view covers
                    lo, hi = _span(arr)
                    raw = np.frombuffer(ctypes.string_at(arr.ctypes.data + lo, hi - lo), np.uint8) \
                        if hi > lo else np.zeros(0, np.uint8)
                    san_bufs.append(("in", raw, -lo))
            elif kind in ("shape", "strides", "ndim"):
                arr, _ = arrays[self.input_names.index(name)]
                if kind == "shape":
                    v = np.array(arr.shape, dtype=np.int32)
                elif kind == "strides":
                    v = np.array(_strides_elems(arr), dtype=np.int64)
                else:
                    v = np.array(arr.ndim, dtype=np.int32)
                keep.append(v)
                ptrs.append(v.ctypes.data)
                san_bufs.append(("in", np.frombuffer(v.tobytes(), np.uint8), 0))
        outs: list[np.ndarray] = []
        for shape, dt in zip(output_shapes, output_dtypes):
            npdt = _TYPES[dt][1]
            o = np.empty(tuple(int(s) for s in shape), dtype=npdt)
            if init_value is None:
                o.view(np.uint8).fill(0xFF)  # poison: NaN for every float type
            elif dt == mx.bfloat16:
                o[...] = np.asarray(mx.full((1,), init_value, mx.bfloat16).view(mx.uint16))[0]
            else:
                o[...] = np.array(init_value).astype(npdt)
            outs.append(o)
            keep.append(o)
            ptrs.append(o.ctypes.data)
            san_bufs.append(("out", o, 0))

        cfg = _LaunchCfg()
        cfg.grid[:] = grid
        cfg.tg[:] = tg
        cfg.sched = _SCHED_ID[schedule]
        cfg.workers = int(workers) if workers else min(os.cpu_count() or 1, 8)
        cfg.seed = int(seed)
        cfg.fiber_mode = int(self.fiber_mode)
        cfg.stack_kb = 1024 if sanitize else 128
        t0 = time.perf_counter()
        if sanitize:
            messages = self._run_sanitized(path, cfg, san_bufs, outs)
        else:
            lib = _load(path)
            arr_t = ctypes.c_void_p * max(1, len(ptrs))
            buf = ctypes.create_string_buffer(1 << 16)
            lib.mslemu_launch(arr_t(*ptrs), ctypes.byref(cfg), buf, len(buf))
            messages = buf.value.decode(errors="replace")
        run_s = time.perf_counter() - t0

        errors, warnings = [], []
        for line in messages.splitlines():
            kind, _, rest = line.partition("|")
            text, _, count = rest.rpartition("|")
            (errors if kind == "error" else warnings).append(f"{text} (x{count})")
        unwritten = {}
        if init_value is None:
            for oname, o in zip(self.output_names, outs):
                n = _count_poison(o)
                if n:
                    unwritten[oname] = n
        report = dict(kernel=gen.kernel_name, mode="fiber" if self.fiber_mode else "plain", schedule=schedule,
                      grid=grid, threadgroup=tg, errors=errors, warnings=warnings, unwritten=unwritten,
                      lint=list(self.lint), compile_s=compile_s, run_s=run_s, sanitize=sanitize)
        self.last = report
        for calls in _records:
            calls.append(report)
        if errors:
            raise MslemuError(f"{gen.kernel_name}: " + "; ".join(errors))
        if strict and (warnings or unwritten or self.lint):
            problems = list(warnings) + list(self.lint)
            problems += [f"{n} element(s) of output `{k}` hold the poison pattern: never written, or computed "
                         "from uninitialised threadgroup memory" for k, n in unwritten.items()]
            raise MslemuError(f"{gen.kernel_name}: " + "; ".join(problems))
        return [_to_mx(o, dt) for o, dt in zip(outs, output_dtypes)]

    def _run_sanitized(self, exe: Path, cfg: _LaunchCfg, bufs, outs) -> str:
        with tempfile.TemporaryDirectory(prefix="mslemu-san-") as d:
            lines = [f"cfg {cfg.grid[0]} {cfg.grid[1]} {cfg.grid[2]} {cfg.tg[0]} {cfg.tg[1]} {cfg.tg[2]} "
                     f"{cfg.sched} 1 {cfg.seed} {cfg.fiber_mode} {cfg.stack_kb}"]
            out_paths = []
            for i, (kind, arr, offset) in enumerate(bufs):
                p = Path(d) / f"b{i}.bin"
                data = np.ascontiguousarray(arr).tobytes()
                p.write_bytes(data)
                lines.append(f"{kind} {len(data)} {offset} {p}")
                if kind == "out":
                    out_paths.append(p)
            spec = Path(d) / "spec.txt"
            spec.write_text("\n".join(lines) + "\n")
            env = dict(os.environ)
            env["ASAN_OPTIONS"] = "detect_leaks=0:detect_stack_use_after_return=0:abort_on_error=0"
            env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
            res = subprocess.run([str(exe), str(spec)], capture_output=True, text=True, env=env, timeout=600)
            if res.returncode not in (0, 2) or "ERROR: AddressSanitizer" in res.stderr or "runtime error:" in res.stderr:
                raise MslemuError(f"{self.name}: sanitizer report (exit {res.returncode}):\n"
                                  + _summarise_sanitizer(res.stderr))
            for o, p in zip(outs, out_paths):
                o.view(np.uint8).reshape(-1)[:] = np.frombuffer(p.read_bytes(), np.uint8)
            return res.stdout


def _summarise_sanitizer(err: str, limit: int = 40) -> str:
    keep = []
    for ln in err.splitlines():
        s = ln.strip()
        if ("ERROR:" in s or "runtime error" in s or "SUMMARY" in s or " source:" in s or " header:" in s
                or "is located" in s or (s.startswith("#") and len(keep) < limit)):
            keep.append(s)
    return "\n".join(keep[:limit]) or err[-4000:]


def _count_poison(o: np.ndarray) -> int:
    if o.size == 0 or o.dtype == np.bool_:
        return 0
    raw = o.view(np.dtype(f"u{o.itemsize}")) if o.itemsize in (1, 2, 4, 8) else None
    if raw is None:
        return 0
    return int(np.count_nonzero(raw == np.iinfo(raw.dtype).max))


def metal_kernel(name: str, input_names: Sequence[str], output_names: Sequence[str], source: str,
                 header: str = "", ensure_row_contiguous: bool = True, atomic_outputs: bool = False,
                 compile_options: dict | None = None) -> Kernel:
    """Drop-in for ``mx.fast.metal_kernel`` that runs the kernel on the CPU."""
    return Kernel(name, input_names, output_names, source, header, ensure_row_contiguous, atomic_outputs,
                  compile_options)


# ---------------------------------------------------------------------------
# Race detection by schedules
# ---------------------------------------------------------------------------
def _as_bytes(out) -> list[bytes]:
    if isinstance(out, mx.array):
        out = [out]
    res = []
    for o in out:
        if o.dtype == mx.bfloat16:
            o = o.view(mx.uint16)
        res.append(np.asarray(o).tobytes())
    return res


def check_schedules(fn: Callable[[], Any], schedules: Sequence[str] = SCHEDULES, seeds: Sequence[int] = (1, 2)):
    """Run ``fn()`` (which launches emulated kernels) under every schedule (random once per seed),
    one OS thread, and require bit-identical results. Returns the forward result."""
    runs = []
    for sched in schedules:
        for seed in (seeds if sched == "random" else (0,)):
            with settings(schedule=sched, seed=seed, workers=1):
                out = fn()
            runs.append((f"{sched}" + (f"(seed {seed})" if sched == "random" else ""), out, _as_bytes(out)))
    ref_name, ref_out, ref = runs[0]
    bad = [name for name, _, b in runs[1:] if b != ref]
    if bad:
        raise MslemuError(f"results differ between schedules: {ref_name} vs {', '.join(bad)} "
                          "(a data race: missing barrier, or threadgroup memory reused too early)")
    return ref_out


__all__ = ["ATTRIBUTES", "Generated", "InputMeta", "Kernel", "MslemuError", "SCHEDULES", "Settings",
           "cache_dir", "check_schedules", "compile_unit", "current_settings", "generate_source",
           "kernel_name", "lint", "metal_kernel", "record", "settings"]

