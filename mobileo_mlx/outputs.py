"""Image files written so that none is lost, overwritten by accident or left half-written.

* :func:`plan_outputs` checks ``-o`` before any work: the format (by extension, any that Pillow
  can write; none means PNG), the folder (missing folders are created at the first write, so
  the nearest existing one must take new files) and the names of ``-n`` images.
* :class:`RunFiles` writes them: each image goes to a hidden temporary in the target folder,
  which then takes its name without overwriting anything (``os.link``, which fails when the name
  exists: the next number is tried, ``name-1.png``, ``name-2.png``...), or with ``os.replace``
  under ``--force``. The number is chosen at that moment, so two runs writing to one name get two
  files. Previews are written the same way and removed when their image is done.
  :meth:`RunFiles.clean_up` removes what the run started and did not finish.
* A killed run (SIGKILL, power cut) can only leave hidden ``.NAME.HOST-PID-TOKEN.partial``
  files: never an image name. A later run writing into that folder on the same machine
  removes them once the process that made them is gone.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import secrets
import signal
import socket
import threading
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .errors import InputError

TEMPORARY_SUFFIX = ".partial"
NAME_MAX = 255  # bytes in one file name on Linux, macOS and Windows file systems
PREVIEW_TAG = ".preview"
_HOST = re.sub(r"[^A-Za-z0-9-]", "", socket.gethostname())[:32] or "host"
_TEMPORARY = re.compile(r"^\..*\.(?P<host>[A-Za-z0-9-]+)-(?P<pid>\d+)-[0-9a-f]{8}" + re.escape(TEMPORARY_SUFFIX) + "$")
# Errors of os.link on file systems without hard links (FAT, some network shares, Android storage).
_NO_HARD_LINKS = {errno.EPERM, errno.EACCES, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS}


# --- formats -------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _can_write(format_name: str) -> bool:
    """Whether Pillow writes an RGB picture as ``format_name`` here (some formats are stubs,
    some need optional libraries, some take only other modes, some are deprecated): tried on a
    tiny picture."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)
            Image.new("RGB", (8, 8)).save(io.BytesIO(), format=format_name)
    except Exception:
        return False
    return True


def writable_formats() -> dict[str, str]:
    """Extension (``.png``) -> Pillow format name, for every format this Pillow can write."""
    from PIL import Image

    Image.init()
    return {ext: name for ext, name in sorted(Image.registered_extensions().items())
            if name in Image.SAVE and _can_write(name)}


def image_format(path: Path) -> str:
    """Pillow's format name for the extension of ``path``, or InputError with the choices."""
    formats = writable_formats()
    extension = path.suffix.lower()
    if extension not in formats:
        raise InputError(f"cannot write {extension or 'extensionless'} images ({path.name}); "
                         f"use one of {' '.join(formats)}")
    return formats[extension]


# --- checking -o before the work ---------------------------------------------------------


@dataclass(frozen=True)
class OutputPlan:
    folder: Path
    targets: tuple[Path, ...]  # the name wanted for each image (numbered further if taken)
    format: str  # Pillow's format name
    force: bool


def plan_outputs(output: str | os.PathLike, default_name: str, count: int = 1, force: bool = False) -> OutputPlan:
    """Where ``count`` images asked for with ``-o output`` go. An existing folder, or a path that
    ends with a separator, means "into that folder" under ``default_name``; a name without an
    extension gets ``.png``. ``count > 1`` numbers them ``name-0.png``, ``name-1.png``...
    Raises InputError when the format cannot be written or the folder cannot take files."""
    text = os.fspath(output)
    path = Path(text) if text else Path(".")
    separators = tuple(s for s in (os.sep, os.altsep) if s)
    if text.endswith(separators) or _is_dir(path):
        folder, name = path, default_name
    else:
        folder, name = path.parent, path.name
        if not Path(name).suffix:
            name += ".png"
    first = folder / name
    fmt = image_format(first)
    if count == 1:
        targets = (first,)
    else:
        targets = tuple(first.with_name(f"{first.stem}-{number}{first.suffix}") for number in range(count))
    # Room for a number added when the name is taken (-1 ... -999999); 255 bytes is the usual limit.
    if max(len(os.fsencode(target.name)) for target in targets) + 7 > NAME_MAX:
        raise InputError(f"the file name is too long ({len(os.fsencode(name))} bytes); "
                         f"-o takes names up to {NAME_MAX - 7 - (len(str(count - 1)) + 1 if count > 1 else 0)}")
    check_folder(folder)
    return OutputPlan(folder, targets, fmt, force)


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # a name too long, a loop of links: not a folder we can use
        return False


def check_folder(folder: Path) -> None:
    """InputError unless files can be created in ``folder``, or in its nearest existing ancestor
    when it is missing (the missing part is created at the first write)."""
    existing = folder
    try:
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
    except OSError as error:
        raise InputError(f"cannot write into {folder}: {(error.strerror or str(error)).lower()}") from None
    if not _is_dir(existing):
        raise InputError(f"cannot write into {folder}: {existing} is a file, not a folder")
    problem = None
    if not os.access(existing, os.W_OK | os.X_OK):
        problem = "permission denied"
    else:  # the permission bits can say yes on a read-only file system or a special folder
        try:
            probe = _create_temporary(existing, "probe")
        except OSError as error:
            problem = error.strerror or type(error).__name__
        else:
            os.close(probe[0])
            probe[1].unlink()
    if problem:
        where = folder if existing == folder else f"{existing} (to create {folder})"
        raise InputError(f"cannot create files in {where}: {problem.lower()}; choose another -o")


# --- writing -------------------------------------------------------------------------------


def _create_temporary(folder: Path, name: str, register=None) -> tuple[int, Path]:
    """An exclusive new hidden file in ``folder``: (open descriptor, path). Its name says which
    process on which machine made it, so a later run can tell a dead run's leftovers."""
    while True:
        path = folder / f".{name[:80]}.{_HOST}-{os.getpid()}-{secrets.token_hex(4)}{TEMPORARY_SUFFIX}"
        if register is not None:
            register(path)
        try:
            # 0o666 less the umask, as for any new file: the picture keeps these permissions.
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), path
        except FileExistsError:
            continue


def _write_temporary(image, folder: Path, name: str, fmt: str, register=None) -> Path:
    descriptor, path = _create_temporary(folder, name, register)
    try:
        with os.fdopen(descriptor, "wb") as file:
            image.save(file, format=fmt)
            file.flush()
            os.fsync(file.fileno())  # the bytes are on disk before the name points at them
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def _numbered(target: Path):
    yield target
    number = 1
    while True:
        yield target.with_name(f"{target.stem}-{number}{target.suffix}")
        number += 1


def _claim(temporary: Path, target: Path, force: bool) -> Path:
    """Give the finished ``temporary`` the name ``target`` (replacing a file there when
    ``force``), or the first free numbered name; the temporary is gone afterwards."""
    if force and not target.is_dir():
        os.replace(temporary, target)
        return target
    links = True
    for candidate in _numbered(target):
        if links:
            try:
                os.link(temporary, candidate)
            except FileExistsError:
                continue
            except OSError as error:
                if error.errno not in _NO_HARD_LINKS:
                    raise
                links = False
            else:
                temporary.unlink()
                return candidate
        try:  # without hard links: reserve the name exclusively, then move the picture onto it
            os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        try:
            os.replace(temporary, candidate)
        except BaseException:
            candidate.unlink(missing_ok=True)  # never leave the empty reservation behind
            raise
        return candidate
    raise AssertionError("unreachable")  # pragma: no cover - _numbered never ends


def write_image(image, target: Path, fmt: str | None = None, force: bool = False) -> Path:
    """Write ``image`` to ``target`` (or the next free numbered name; replaced with ``force``)
    atomically: the name holds nothing but a complete picture. Returns the path written."""
    target = Path(target)
    temporary = _write_temporary(image, target.parent, target.name, fmt or image_format(target))
    try:
        return _claim(temporary, target, force)
    finally:
        temporary.unlink(missing_ok=True)


def preview_name(target: Path) -> Path:
    return target.with_name(f"{target.stem}{PREVIEW_TAG}{target.suffix}")


# --- one run's files -------------------------------------------------------------------------


@contextlib.contextmanager
def deferred_signals(signals=(signal.SIGINT, signal.SIGTERM)):
    """Ctrl-C / SIGTERM arriving inside are delivered at its end, so a file's name and the run's
    record of it change together. Only the main thread receives Python signals: a no-op elsewhere."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {}
    for number in signals:
        handler = signal.getsignal(number)
        if handler is not None:  # None: installed outside Python, cannot be put back
            previous[number] = handler
            signal.signal(number, lambda received, frame: caught.append(received))
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if caught:
            signal.raise_signal(caught[0])  # the handler put back runs now


@contextlib.contextmanager
def ignored_signals(signals=(signal.SIGINT, signal.SIGTERM)):
    """A second Ctrl-C while a run cleans up does not stop the clean-up halfway."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.getsignal(number) for number in signals}
    for number, handler in previous.items():
        if handler is not None:
            signal.signal(number, signal.SIG_IGN)
    try:
        yield
    finally:
        for number, handler in previous.items():
            if handler is not None:
                signal.signal(number, handler)


class RunFiles:
    """The files one run creates: finished images (kept), previews and temporaries (removed by
    :meth:`clean_up` unless done), and the folders it had to create (removed when left empty)."""

    def __init__(self):
        self.written: list[Path] = []
        self.removed: list[Path] = []  # unfinished files and the emptied folders this run had created
        self._temporaries: set[Path] = set()
        self._previews: dict[Path, Path] = {}  # the image's target -> its preview's claimed name
        self._created: list[Path] = []  # folders this run made that still exist
        self._created_all: set[Path] = set()
        self._ready: set[Path] = set()

    def _folder(self, folder: Path) -> None:
        """Create ``folder`` (recording what it created) and remove a dead run's temporaries there."""
        if folder in self._ready:
            return
        missing = []
        existing = folder
        while not existing.exists() and existing != existing.parent:
            missing.append(existing)
            existing = existing.parent
        for path in reversed(missing):
            with deferred_signals():
                try:
                    path.mkdir()
                except FileExistsError:  # made meanwhile by someone else: not ours to remove
                    continue
                self._created.append(path)
                self._created_all.add(path)
        remove_stale_temporaries(folder)
        self._ready.add(folder)

    def _temporary(self, image, target: Path, fmt: str) -> Path:
        self._folder(target.parent)
        return _write_temporary(image, target.parent, target.name, fmt, register=self._temporaries.add)

    def save(self, image, target: Path, fmt: str, force: bool = False) -> Path:
        """The finished picture for ``target``; returns the name it got."""
        temporary = self._temporary(image, target, fmt)
        with deferred_signals():
            path = _claim(temporary, target, force)
            self._temporaries.discard(temporary)
            self.written.append(path)
        return path

    def save_preview(self, image, target: Path, fmt: str, force: bool = False) -> Path:
        """The preview of ``target``'s image: a name of its own at the first one, replaced after."""
        temporary = self._temporary(image, target, fmt)
        with deferred_signals():
            claimed = self._previews.get(target)
            if claimed is None:
                claimed = self._previews[target] = _claim(temporary, preview_name(target), force)
            else:
                os.replace(temporary, claimed)
            self._temporaries.discard(temporary)
        return claimed

    def drop_preview(self, target: Path) -> None:
        with deferred_signals():
            claimed = self._previews.pop(target, None)
            if claimed is not None:
                claimed.unlink(missing_ok=True)

    def clean_up(self) -> list[Path]:
        """Remove every temporary and preview left, and the created folders that stayed empty;
        returns (and adds to ``removed``) what was there to remove."""
        removed = []
        with ignored_signals():
            for path in sorted(self._temporaries) + sorted(self._previews.values()):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed.append(path)
            self._temporaries.clear()
            self._previews.clear()
            for folder in reversed(self._created):
                with contextlib.suppress(OSError):  # not empty: someone else's files, or ours
                    folder.rmdir()
                    removed.append(folder)
            self._created = [folder for folder in self._created if folder.exists()]
        self.removed.extend(removed)
        return removed

    def report(self) -> str:
        """What the run left, in words: the finished images kept and what was removed."""
        if not self.written and not self.removed:
            return "nothing was written"
        words = ["no image was finished" if not self.written else
                 f"kept {len(self.written)} finished image{'s' if len(self.written) > 1 else ''}: "
                 + ", ".join(map(str, self.written))]
        files = [str(path) for path in self.removed if path not in self._created_all]
        folders = [str(path) for path in self.removed if path in self._created_all]
        if files:
            words.append("removed the unfinished " + ", ".join(files))
        if folders:
            words.append("removed the folder" + ("s " if len(folders) > 1 else " ") + ", ".join(folders)
                         + " it had created")
        return "; ".join(words)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the temporaries in ``folder`` made on this machine by processes that are gone
    (a run killed with SIGKILL). Others' and live runs' temporaries are left alone."""
    removed = []
    if os.name != "posix":  # telling a live process needs os.kill(pid, 0), POSIX only
        return removed
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        match = _TEMPORARY.match(name)
        if not match or match["host"] != _HOST or int(match["pid"]) == os.getpid():
            continue
        try:
            os.kill(int(match["pid"]), 0)
            continue  # alive (or the number was reused): keep
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError):
            continue
        with contextlib.suppress(OSError):
            (folder / name).unlink()
            removed.append(folder / name)
    return removed
