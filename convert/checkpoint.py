"""Reading an original Mobile-O checkpoint, tensor by tensor.

* :class:`Checkpoint` finds the released layout (the repo root or its
  ``final_merged_model_23620/`` subfolder), reads ``config.json``, indexes the
  tensors of one ``model.safetensors``, sharded safetensors with an index, or a
  PyTorch ``.bin`` (loaded with ``weights_only``), and loads one tensor at a time
  as float32 numpy (:meth:`Checkpoint.get`).
* Safetensors headers are parsed here and each tensor is memory-mapped on its
  own and unmapped after use, so reading a 3.3 GB file keeps only one tensor in
  memory. numpy has no bfloat16: bf16 data is read as uint16 and widened.
* :class:`SafetensorsWriter` writes an output file whose layout is known up
  front (the MLX model's parameter shapes, or the demo checkpoint's tensors):
  header first, then each tensor at its offset as it arrives, in any order.
* :func:`resolve_diffusion_configs` finds the DiT / VAE / scheduler configs,
  :func:`build_fast_tokenizer` turns ``vocab.json`` + ``merges.txt`` into the
  equivalent fast ``tokenizer.json``.

Every user-facing problem is raised as :class:`ConversionError` with a
one-line message.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np

from mobileo_mlx.convert.defaults import DIFFUSION_CONFIGS
from mobileo_mlx.convert.download import hub_config_files
from mobileo_mlx.convert.layout import (
    DEFAULT_DIFFUSION_REPO,
    DIFFUSION_CONFIG_FILES,
    MERGED_SUBFOLDER,
    MOBILEO_MODEL_TYPES,
    SAFETENSORS_INDEX,
    SAFETENSORS_SINGLE,
    TORCH_INDEX,
    TORCH_SINGLE,
    looks_like_hub_id,
)
from mobileo_mlx.errors import ConversionError
from mobileo_mlx.weights import safetensors_entries


# ---------------------------------------------------------------------------
# tensors


# safetensors dtype code -> (numpy storage dtype, is floating point)
_STORAGE = {
    "BF16": (np.uint16, True),
    "F16": (np.float16, True),
    "F32": (np.float32, True),
    "F64": (np.float64, True),
    "I64": (np.int64, False),
    "I32": (np.int32, False),
    "I16": (np.int16, False),
    "I8": (np.int8, False),
    "U8": (np.uint8, False),
    "U16": (np.uint16, False),
    "U32": (np.uint32, False),
    "U64": (np.uint64, False),
    "BOOL": (np.bool_, False),
}

_TORCH_DTYPES = {
    "torch.bfloat16": "BF16",
    "torch.float16": "F16",
    "torch.float32": "F32",
    "torch.float64": "F64",
    "torch.int64": "I64",
    "torch.int32": "I32",
    "torch.int16": "I16",
    "torch.int8": "I8",
    "torch.uint8": "U8",
    "torch.bool": "BOOL",
}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: a byte range of a safetensors file, or a key of a torch file."""

    name: str
    dtype: str  # safetensors code: "BF16", "F32", ...
    shape: tuple[int, ...]
    path: Path
    start: int = 0  # absolute byte offsets (safetensors only)
    end: int = 0

    @property
    def is_float(self) -> bool:
        return _STORAGE.get(self.dtype, (None, False))[1]


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 stored as uint16 -> float32 (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounding to nearest even; NaN stays NaN."""
    bits = np.array(values, dtype=np.float32, order="C").view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors header (:func:`mobileo_mlx.weights.safetensors_entries`:
    well-formed entries, byte counts that match shapes and dtypes, tensors that cover the data
    exactly, without overlaps or gaps); no tensor data is read."""
    tensors: dict[str, TensorInfo] = {}
    for name, entry in safetensors_entries(path, ConversionError).items():
        if entry.dtype not in _STORAGE:
            raise ConversionError(f"{path}: tensor {name!r} has an unsupported dtype {entry.dtype}")
        tensors[name] = TensorInfo(name, entry.dtype, entry.shape, path, entry.start, entry.end)
    return tensors


CHUNK_ELEMENTS = 1 << 22  # 4 Mi values: the unit of widening, narrowing and writing


def read_safetensors_tensor(info: TensorInfo) -> np.ndarray:
    """One tensor as float32 (integers are converted too).

    The tensor's bytes are memory-mapped on their own and widened chunk by
    chunk into the result; each mapped chunk is released right after, so the
    memory cost is the float32 result alone.
    """
    storage, _ = _STORAGE[info.dtype]
    count = int(np.prod(info.shape, dtype=np.int64))
    result = np.empty(count, np.float32)
    if count == 0:
        return result.reshape(info.shape)
    page = mmap.ALLOCATIONGRANULARITY
    start = info.start - info.start % page
    lead = info.start - start
    try:
        with open(info.path, "rb") as f, mmap.mmap(
            f.fileno(), lead + info.end - info.start, offset=start, access=mmap.ACCESS_READ
        ) as mapped:
            itemsize = np.dtype(storage).itemsize
            for first in range(0, count, CHUNK_ELEMENTS):
                n = min(CHUNK_ELEMENTS, count - first)
                chunk = np.frombuffer(mapped, dtype=storage, count=n, offset=lead + first * itemsize)
                if info.dtype == "BF16":
                    widened = result[first : first + n].view(np.uint32)
                    widened[:] = chunk
                    widened <<= 16
                else:
                    result[first : first + n] = chunk
                del chunk
                if hasattr(mapped, "madvise"):  # drop the pages just read from this process's RSS
                    done = (lead + (first + n) * itemsize) // page * page
                    if done:
                        mapped.madvise(mmap.MADV_DONTNEED, 0, done)
    except (OSError, ValueError) as error:
        raise ConversionError(f"cannot read tensor {info.name!r} from {info.path}: {error}") from None
    return result.reshape(info.shape)


class TorchFile:
    """A PyTorch pickle checkpoint, loaded with ``weights_only=True`` (and
    memory-mapped when the file is in the zip format)."""

    def __init__(self, path: Path):
        try:
            import torch
        except ImportError:
            raise ConversionError(
                f"{path.name} is a PyTorch checkpoint; reading it needs PyTorch (pip install torch), "
                "or convert it to safetensors first"
            ) from None
        self.path = path
        try:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as error:
                if "mmap" not in str(error):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # UnpicklingError, zip errors, EOFError, ...
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ConversionError(f"{path} is not a loadable PyTorch checkpoint: {reason}") from None
        if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
            state = state["state_dict"]
        if not isinstance(state, Mapping):
            raise ConversionError(f"{path} does not hold a state dict")
        self._state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        self.tensors = {
            name: TensorInfo(name, _TORCH_DTYPES.get(str(t.dtype), "F32"), tuple(t.shape), path)
            for name, t in self._state.items()
        }

    def read(self, name: str) -> np.ndarray:
        return self._state[name].detach().float().numpy().copy()


# ---------------------------------------------------------------------------
# the checkpoint folder


def _candidate_folders(path: Path) -> list[Path]:
    folders = [path, path / MERGED_SUBFOLDER, *sorted(path.glob("final_merged_model_*"))]
    seen: list[Path] = []
    for folder in folders:
        if folder.is_dir() and folder not in seen:
            seen.append(folder)
    return seen


def _weight_files(folder: Path) -> list[Path] | None:
    """The weight files of ``folder`` in order of preference, or None."""
    if (folder / SAFETENSORS_INDEX).is_file():
        return [folder / SAFETENSORS_INDEX]
    if (folder / SAFETENSORS_SINGLE).is_file():
        return [folder / SAFETENSORS_SINGLE]
    shards = sorted(folder.glob("model-*.safetensors"))
    if shards:
        return shards
    if (folder / TORCH_INDEX).is_file():
        return [folder / TORCH_INDEX]
    if (folder / TORCH_SINGLE).is_file():
        return [folder / TORCH_SINGLE]
    shards = sorted(folder.glob("pytorch_model-*.bin"))
    return shards or None


class Checkpoint:
    """An original Mobile-O checkpoint: config, tensor index and tokenizer files.

    ``path`` may be the repo root, its ``final_merged_model_23620/`` subfolder,
    or a weights file (``.safetensors``, ``.bin`` or an index) inside either.
    """

    def __init__(self, path: str | os.PathLike):
        path = Path(path).expanduser()
        if not path.exists():
            raise ConversionError(f"checkpoint not found: {path}")
        if path.is_file():
            self.root = path.parent
            weights = [path]
        else:
            self.root = path
            weights = None
            for folder in _candidate_folders(path):
                weights = _weight_files(folder)
                if weights:
                    break
            if not weights:
                raise ConversionError(
                    f"not a Mobile-O checkpoint: no {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX} or {TORCH_SINGLE} "
                    f"in {path} or {path / MERGED_SUBFOLDER}"
                )
        self.weights_folder = weights[0].parent
        self.folders = [self.weights_folder] + [f for f in _candidate_folders(self.root) if f != self.weights_folder]
        self.weight_files = weights
        self.config_path = self._find("config.json")
        if self.config_path is None:
            raise ConversionError(f"not a Mobile-O checkpoint: config.json is missing in {self.weights_folder}")
        self.config = self._read_config(self.config_path)
        self._torch_files: dict[Path, TorchFile] = {}
        self.tensors: dict[str, TensorInfo] = self._index(weights)

    # -- files ------------------------------------------------------------

    def _find(self, name: str) -> Path | None:
        for folder in self.folders:
            if (folder / name).is_file():
                return folder / name
        return None

    @staticmethod
    def _read_config(path: Path) -> dict:
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise ConversionError(f"{path} is not valid JSON: {error}") from None
        if not isinstance(config, dict):
            raise ConversionError(f"{path} is not a JSON object")
        model_type = config.get("model_type")
        if model_type not in MOBILEO_MODEL_TYPES:
            raise ConversionError(
                f"not a Mobile-O checkpoint: {path.name} has model_type {model_type!r}, "
                f"expected {' or '.join(MOBILEO_MODEL_TYPES)}"
            )
        return config

    def _index(self, weights: list[Path]) -> dict[str, TensorInfo]:
        tensors: dict[str, TensorInfo] = {}
        for file in weights:
            if file.name.endswith(".index.json"):
                tensors.update(self._index_sharded(file))
            elif file.suffix == ".safetensors":
                tensors.update(read_safetensors_header(file))
            elif file.suffix in (".bin", ".pt", ".pth"):
                tensors.update(self._torch(file).tensors)
            else:
                raise ConversionError(f"unsupported weights file {file.name} (expected .safetensors, .bin or an index)")
        if not tensors:
            raise ConversionError(f"not a Mobile-O checkpoint: {weights[0]} holds no tensors")
        return tensors

    def _index_sharded(self, index: Path) -> dict[str, TensorInfo]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ConversionError(f"{index} is not a valid shard index ({error})") from None
        if not isinstance(weight_map, dict) or not all(
            isinstance(shard, str) and shard and Path(shard).name == shard for shard in weight_map.values()
        ):
            raise ConversionError(f"{index} is not a valid shard index (weight_map must map names to shard files)")
        tensors: dict[str, TensorInfo] = {}
        for shard_name in sorted(set(weight_map.values())):
            shard = index.parent / shard_name
            if not shard.is_file():
                raise ConversionError(f"shard {shard_name} listed in {index.name} is missing")
            if shard.suffix == ".safetensors":
                shard_tensors = read_safetensors_header(shard)
            else:
                shard_tensors = self._torch(shard).tensors
            for name, info in shard_tensors.items():
                if weight_map.get(name) == shard_name:
                    tensors[name] = info
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise ConversionError(
                f"{index.name} lists {len(missing)} tensor(s) its shards lack: {', '.join(missing[:5])}"
            )
        return tensors

    def _torch(self, path: Path) -> TorchFile:
        if path not in self._torch_files:
            self._torch_files[path] = TorchFile(path)
        return self._torch_files[path]

    # -- tensors ----------------------------------------------------------

    def get(self, name: str) -> np.ndarray:
        """One tensor as float32 numpy."""
        info = self.tensors.get(name)
        if info is None:
            raise MissingTensor(name)
        if info.path.suffix == ".safetensors":
            return read_safetensors_tensor(info)
        return self._torch(info.path).read(name)

    def shapes(self, names: Iterable[str]) -> dict[str, tuple[int, ...]]:
        return {name: self.tensors[name].shape for name in names}

    def float_dtype(self, names: Iterable[str]) -> str:
        """The widest storage precision among ``names``: "BF16", "F16" or "F32"."""
        dtypes = {self.tensors[n].dtype for n in names if self.tensors[n].is_float}
        if dtypes & {"F32", "F64"}:
            return "F32"
        if "BF16" in dtypes:
            return "BF16"
        if "F16" in dtypes:
            return "F16"
        return "F32"

    def fingerprint(self) -> str:
        """Names, sizes and modification times of the weight and config files."""
        files = [self.config_path, *self.weight_files]
        files += sorted({info.path for info in self.tensors.values()} - set(files))
        parts = []
        for file in files:
            stat = file.stat()
            parts.append(f"{file.resolve()}:{stat.st_size}:{int(stat.st_mtime)}")
        return "|".join(parts)

    # -- side files -------------------------------------------------------

    def tokenizer_folder(self) -> Path:
        for folder in self.folders:
            if (folder / "tokenizer.json").is_file() or (
                (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
            ):
                return folder
        raise ConversionError(
            f"not a Mobile-O checkpoint: no tokenizer (vocab.json + merges.txt, or tokenizer.json) in {self.weights_folder}"
        )


class MissingTensor(KeyError):
    """A tensor the conversion needs is not in the checkpoint."""


# ---------------------------------------------------------------------------
# DiT / VAE / scheduler configs


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ConversionError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise ConversionError(f"{path} is not a JSON object")
    return value


def resolve_diffusion_configs(
    checkpoint: Checkpoint,
    override_dir: str | os.PathLike | None = None,
    builtin: Mapping[str, dict] = DIFFUSION_CONFIGS,
    hub_files: Callable[[str, Iterable[str]], dict[str, Path]] = hub_config_files,
) -> tuple[dict[str, dict], dict[str, str]]:
    """``({"transformer": {...}, "vae": {...}, "scheduler": {...}}, {section: source})``.

    Each file is taken from the first place that has it: the checkpoint folder
    (diffusers layout), ``override_dir``, the repo named by the checkpoint's
    ``diffusion_name_or_path`` (a local folder, or the hub: json files only),
    then ``builtin`` (the Sana_600M_512px_diffusers values of :mod:`mobileo_mlx.convert.defaults`).
    """
    configs: dict[str, dict] = {}
    sources: dict[str, str] = {}

    def take_from_folder(folder: Path, label: str) -> None:
        for section, (subfolder, filename) in DIFFUSION_CONFIG_FILES.items():
            file = folder / subfolder / filename
            if section not in configs and file.is_file():
                configs[section] = _read_json(file)
                sources[section] = f"{label}/{subfolder}/{filename}"

    for folder in checkpoint.folders:
        take_from_folder(folder, f"checkpoint {folder.name}")
    if override_dir is not None:
        override = Path(override_dir).expanduser()
        if not override.is_dir():
            raise ConversionError(f"--diffusion-config: not a folder: {override}")
        take_from_folder(override, str(override))
    repo = checkpoint.config.get("diffusion_name_or_path") or DEFAULT_DIFFUSION_REPO
    missing = [s for s in DIFFUSION_CONFIG_FILES if s not in configs]
    if missing:
        local = Path(str(repo)).expanduser()
        if local.is_dir():
            take_from_folder(local, str(local))
        elif looks_like_hub_id(str(repo)):
            for section, file in hub_files(str(repo), missing).items():
                configs[section] = _read_json(file)
                subfolder, filename = DIFFUSION_CONFIG_FILES[section]
                sources[section] = f"hub {repo}/{subfolder}/{filename}"
    for section in DIFFUSION_CONFIG_FILES:
        if section not in configs:
            configs[section] = dict(builtin.get(section) or {})
            sources[section] = "built-in Sana_600M_512px_diffusers values"
    return configs, sources


# ---------------------------------------------------------------------------
# output


_OUTPUT_STORAGE = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "U32": np.uint32, "I64": np.int64}


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: str  # "F32", "F16", "BF16", "U32", "I64"
    shape: tuple[int, ...]

    @property
    def itemsize(self) -> int:
        return np.dtype(_OUTPUT_STORAGE[self.dtype]).itemsize

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.itemsize


class SafetensorsWriter:
    """Writes a safetensors file whose tensors are all known in advance.

    The header is written first; :meth:`write` then places each tensor at its
    offset, in any order, so nothing but the current tensor is held in memory.
    :meth:`close` checks that every planned tensor was written.

    Tensors are laid out by name; with ``widest_first`` the wider dtypes come
    first, then names, so every tensor starts at a multiple of its item size
    (``safetensors.torch.save_file``'s layout where no two dtypes share a width).
    """

    def __init__(
        self,
        path: Path,
        plan: Iterable[PlannedTensor],
        metadata: Mapping[str, str] | None = None,
        widest_first: bool = False,
    ):
        self.path = path
        order = (lambda t: (-t.itemsize, t.name)) if widest_first else (lambda t: t.name)
        self.plan = {t.name: t for t in sorted(plan, key=order)}
        header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "mlx"})}
        offset = 0
        self._offsets: dict[str, int] = {}
        for t in self.plan.values():
            header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
            self._offsets[t.name] = offset
            offset += t.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self._data_start = 8 + len(encoded)
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(encoded)) + encoded)
        self._file.truncate(self._data_start + offset)
        self.written: set[str] = set()

    def write(self, name: str, values: np.ndarray) -> None:
        """Write a whole tensor (converted to its planned dtype chunk by chunk)."""
        planned = self.plan[name]
        if tuple(values.shape) != planned.shape:
            raise ConversionError(f"internal: {name} has shape {values.shape}, planned {planned.shape}")
        self._write_at(name, 0, values)
        self.written.add(name)

    def write_rows(self, name: str, first_row: int, rows: np.ndarray, last: bool) -> None:
        """Write ``rows`` of a tensor starting at row ``first_row``; ``last``
        marks the tensor complete."""
        planned = self.plan[name]
        if tuple(rows.shape[1:]) != planned.shape[1:] or first_row + rows.shape[0] > planned.shape[0]:
            raise ConversionError(f"internal: rows {first_row}+{rows.shape} do not fit {name} {planned.shape}")
        self._write_at(name, first_row * (planned.nbytes // planned.shape[0]), rows)
        if last:
            self.written.add(name)

    def write_chunks(self, name: str, chunks: Iterable[np.ndarray]) -> None:
        """Write a whole tensor from consecutive pieces of its flattened values (a tensor too
        large to hold at once streams through)."""
        planned = self.plan[name]
        count = int(np.prod(planned.shape, dtype=np.int64))
        done = 0
        for chunk in chunks:
            if done + chunk.size > count:
                raise ConversionError(f"internal: more than {count} values for {name} {planned.shape}")
            self._write_at(name, done * planned.itemsize, chunk)
            done += chunk.size
        if done != count:
            raise ConversionError(f"internal: {done} of {count} values written for {name} {planned.shape}")
        self.written.add(name)

    def _write_at(self, name: str, byte_offset: int, values: np.ndarray) -> None:
        planned = self.plan[name]
        flat = values.reshape(-1)
        position = self._data_start + self._offsets[name] + byte_offset
        for first in range(0, flat.size, CHUNK_ELEMENTS):
            chunk = flat[first : first + CHUNK_ELEMENTS]
            if planned.dtype == "BF16":
                raw = float32_to_bf16_bits(chunk)
            else:
                raw = np.array(chunk, dtype=_OUTPUT_STORAGE[planned.dtype], order="C")
            view = memoryview(raw).cast("B")
            while view:  # pwrite may write less than asked
                written = os.pwrite(self._file.fileno(), view, position)
                view, position = view[written:], position + written

    def missing(self) -> list[str]:
        return sorted(set(self.plan) - self.written)

    def close(self) -> None:
        self._file.close()


# ---------------------------------------------------------------------------
# tokenizer

# Qwen2's pre-tokenizer split (transformers' Qwen2Tokenizer PRETOKENIZE_REGEX).
QWEN2_SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def _added_tokens(folder: Path) -> list[dict]:
    """The added tokens with their ids and matching flags, from
    tokenizer_config.json (``added_tokens_decoder``) and added_tokens.json."""
    tokens: dict[int, dict] = {}
    config_file = folder / "tokenizer_config.json"
    if config_file.is_file():
        decoder = _read_json(config_file).get("added_tokens_decoder") or {}
        for token_id, entry in decoder.items():
            tokens[int(token_id)] = {
                "content": entry["content"],
                "single_word": bool(entry.get("single_word", False)),
                "lstrip": bool(entry.get("lstrip", False)),
                "rstrip": bool(entry.get("rstrip", False)),
                "normalized": bool(entry.get("normalized", False)),
                "special": bool(entry.get("special", False)),
            }
    added_file = folder / "added_tokens.json"
    if added_file.is_file():
        special = set()
        special_map = folder / "special_tokens_map.json"
        if special_map.is_file():
            for value in _read_json(special_map).values():
                for item in value if isinstance(value, list) else [value]:
                    special.add(item["content"] if isinstance(item, dict) else item)
        for content, token_id in _read_json(added_file).items():
            tokens.setdefault(
                int(token_id),
                {
                    "content": content,
                    "single_word": False,
                    "lstrip": False,
                    "rstrip": False,
                    "normalized": content not in special,
                    "special": content in special,
                },
            )
    return [{"id": token_id, **tokens[token_id]} for token_id in sorted(tokens)]


def build_fast_tokenizer(folder: Path):
    """A ``tokenizers.Tokenizer`` equal to transformers' slow Qwen2Tokenizer
    built from ``folder``'s vocab.json + merges.txt and added tokens: byte-level
    BPE, NFC normalisation, Qwen2's split regex, added tokens at their ids."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab = _read_json(vocab_file)
    merges = []
    try:
        lines = merges_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ConversionError(f"cannot read {merges_file}: {error}") from None
    for line in lines:
        if line.startswith("#version") or not line.strip():
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise ConversionError(f"{merges_file}: malformed merge line {line!r}")
        merges.append((parts[0], parts[1]))
    # Added tokens go into the model vocabulary too: that pins their ids even
    # where they do not follow vocab.json contiguously.
    added = _added_tokens(folder)
    ids_in_use = {token_id: token for token, token_id in vocab.items()}
    for entry in added:
        content, token_id = entry["content"], entry["id"]
        if vocab.get(content, token_id) != token_id or ids_in_use.get(token_id, content) != content:
            raise ConversionError(
                f"added token {content!r} (id {token_id}) conflicts with vocab.json"
            )
        vocab[content] = token_id
        ids_in_use[token_id] = content
    tokenizer = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)

    for entry in added:  # one at a time, in id order, keeping each token's flags
        token = AddedToken(
            entry["content"],
            single_word=entry["single_word"],
            lstrip=entry["lstrip"],
            rstrip=entry["rstrip"],
            normalized=entry["normalized"],
            special=entry["special"],
        )
        if entry["special"]:
            tokenizer.add_special_tokens([token])
        else:
            tokenizer.add_tokens([token])
    for entry in added:
        if tokenizer.token_to_id(entry["content"]) != entry["id"]:
            raise ConversionError(
                f"added token {entry['content']!r} cannot keep id {entry['id']} (vocab.json maps it elsewhere)"
            )
    return tokenizer
