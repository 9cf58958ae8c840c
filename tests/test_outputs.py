"""The files generate and edit write: bad options refused before the model loads, each image
written atomically under a name no other run takes, `-o FOLDER`, `--force`, and nothing
unfinished left behind by success, errors, Ctrl-C or SIGTERM (SIGKILL: only hidden
temporaries, which the next run removes)."""

from __future__ import annotations

import errno
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from mobileo_mlx import cli, outputs
from mobileo_mlx.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return {**os.environ, "MOBILEO_MLX_CACHE": str(cache), "MOBILEO_MLX_MODEL": "demo", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def converted(env, tmp_path_factory):
    """The demo model converted into the module's cache (the later runs' timing excludes it)."""
    result = run(env, "generate", "warm up", "--steps", "1", "-o", str(tmp_path_factory.mktemp("warm")))
    assert result.returncode == 0, result.stderr
    return env


def run(env, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", "mobileo_mlx", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout)


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def picture(colour) -> Image.Image:
    return Image.fromarray(np.full((16, 16, 3), colour, np.uint8))


def colour_of(path: Path) -> tuple:
    with Image.open(path) as image:
        return tuple(int(c) for c in np.asarray(image.convert("RGB"))[0, 0])


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- bad options: refused before any work ------------------------------------------------------

BAD_OPTIONS = [
    (["--seed", "-1"], "seed must be between 0 and 2**64 - 1"),
    (["--seed", str(2**64)], "seed must be between 0 and 2**64 - 1"),
    (["--seed", str(2**70)], "seed must be between 0 and 2**64 - 1"),
    (["--seed", str(2**64 - 1), "-n", "2"], "and seed + 1 for 2 images"),
    (["--steps", "0"], "steps must be between 1 and 1000"),
    (["--steps", "100000"], "steps must be between 1 and 1000"),
    (["-n", "0"], "number of images must be between 1 and 100"),
    (["-n", "1000"], "number of images must be between 1 and 100"),
    (["--size", "100000"], "size must be a multiple of 32 between 32 and 1024"),
    (["--size", "33"], "size must be a multiple of 32"),
    (["--size", "0"], "size must be a multiple of 32"),
    (["--guidance", "nan"], "guidance must be a finite number"),
    (["--guidance", "inf"], "guidance must be a finite number"),
    (["--guidance", "-1"], "guidance must be in [0, 30]"),
    (["--scheduler", "heun"], "unknown sampler 'heun'"),
    (["--cpu-matmul", "fp8"], "expected one of auto, fp32, bf16"),
    (["-o", "OUT/x.txt"], "cannot write .txt images"),
    (["-o", "OUT/x.docx"], "cannot write .docx images"),
    (["-o", "OUT/a-file.png/x.png"], "is a file, not a folder"),
    (["-o", "OUT/" + "a" * 300 + ".png"], "the file name is too long"),
]


@pytest.mark.parametrize("command, options, fragment",
                         [("generate", *case) for case in BAD_OPTIONS]
                         + [("generate", ["--preview-every", "0"], "--preview-every must be between 1")]
                         + [("edit", *case) for case in BAD_OPTIONS])
def test_bad_options_are_refused_before_the_model_loads(tmp_path, monkeypatch, command, options, fragment):
    cache, out = tmp_path / "cache", tmp_path / "out"
    out.mkdir()
    (out / "a-file.png").write_bytes(b"not a folder")
    source = tmp_path / "source.png"
    picture(90).save(source)

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(cli, "_load_model", no_model)
    options = [o.replace("OUT", str(out)) for o in options]
    if "-o" not in options:
        options += ["-o", str(out / "x.png")]
    head = ["generate", "a kite"] if command == "generate" else ["edit", str(source), "make it red"]
    result = CliRunner().invoke(cli.app, [*head, *options],
                                env={"MOBILEO_MLX_CACHE": str(cache), "MOBILEO_MLX_MODEL": "demo"})
    assert result.exit_code == 2, result.output
    assert fragment in one_error_line(result.stderr)
    assert result.stdout == ""
    assert not cache.exists()  # nothing converted
    assert listing(out) == ["a-file.png"]  # nothing written, not even a hidden probe


@pytest.mark.parametrize("options, fragment", [BAD_OPTIONS[0], BAD_OPTIONS[8], BAD_OPTIONS[16]])
def test_a_real_process_refuses_them_at_once(tmp_path, options, fragment):
    """As a user runs it: one line, exit 2, and no conversion into the (empty) cache."""
    cache = tmp_path / "cache"
    env = {**os.environ, "MOBILEO_MLX_CACHE": str(cache), "MOBILEO_MLX_MODEL": "demo"}
    options = [o.replace("OUT", str(tmp_path)) for o in options]
    result = run(env, "generate", "a kite", *options, *([] if "-o" in options else ["-o", str(tmp_path / "x.png")]),
                 timeout=60)
    assert result.returncode == 2
    assert fragment in one_error_line(result.stderr)
    assert not cache.exists()
    assert listing(tmp_path) == []


def _writable(folder: Path) -> bool:
    """Whether this user can create a file in ``folder``: the permission bits, then a real try."""
    if not os.access(folder, os.W_OK):
        return False
    try:
        descriptor, name = tempfile.mkstemp(dir=folder)
    except OSError:
        return False
    os.close(descriptor)
    os.unlink(name)
    return True


@pytest.fixture
def read_only_folder(tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    yield folder if not _writable(folder) else None
    folder.chmod(0o755)


@pytest.mark.parametrize("where", ["read-only", "read-only/missing", "/proc", "/proc/missing"])
def test_a_folder_that_takes_no_files_is_refused_up_front(read_only_folder, monkeypatch, tmp_path, where):
    """A read-only folder (skipped where this user can write anyway, as root can) and /proc
    (where not even root can create files), also when -o names a missing folder inside."""
    if where.startswith("read-only"):
        if read_only_folder is None:
            pytest.skip("this user can write into a read-only folder (root)")
        folder = tmp_path / where
    else:
        if not sys.platform.startswith("linux") or _writable(Path("/proc")):
            pytest.skip("needs Linux's /proc")
        folder = Path(where)
    monkeypatch.setattr(cli, "_load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    result = CliRunner().invoke(cli.app, ["generate", "a kite", "-o", str(folder / "x.png")],
                                env={"MOBILEO_MLX_CACHE": str(tmp_path / "cache")})
    assert result.exit_code == 2
    assert "cannot create files in" in one_error_line(result.stderr)
    assert not (tmp_path / "cache").exists()


# --- -o: formats, folders and names ------------------------------------------------------------


def test_plan_outputs(tmp_path):
    (tmp_path / "folder").mkdir()
    plan = outputs.plan_outputs(tmp_path / "folder", "mobileo.png")
    assert plan.targets == (tmp_path / "folder" / "mobileo.png",) and plan.format == "PNG"
    plan = outputs.plan_outputs(f"{tmp_path / 'new'}{os.sep}", "mobileo-edit.png", count=2)
    assert plan.targets == (tmp_path / "new" / "mobileo-edit-0.png", tmp_path / "new" / "mobileo-edit-1.png")
    assert not (tmp_path / "new").exists()  # created at the first write, not by the check
    assert outputs.plan_outputs(tmp_path / "pic", "m.png").targets == (tmp_path / "pic.png",)
    assert outputs.plan_outputs(tmp_path / "pic.JPG", "m.png").format == "JPEG"
    assert outputs.plan_outputs(tmp_path / "pic.tif", "m.png").format == "TIFF"
    plan = outputs.plan_outputs(tmp_path / "a" / "b" / "pic.webp", "m.png", count=3)
    assert [p.name for p in plan.targets] == ["pic-0.webp", "pic-1.webp", "pic-2.webp"]
    with pytest.raises(InputError, match=r"cannot write \.txt images \(x\.txt\); use one of .*\.png"):
        outputs.plan_outputs(tmp_path / "x.txt", "m.png")
    assert listing(tmp_path) == ["folder"]


def test_every_listed_format_is_written(tmp_path):
    formats = outputs.writable_formats()
    assert {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"} <= set(formats)
    for extension in formats:
        path = outputs.write_image(picture(200), tmp_path / f"p{extension}")
        assert path == tmp_path / f"p{extension}" and path.stat().st_size > 0
    for extension in (".png", ".bmp", ".tif", ".webp"):
        if extension in formats:
            assert colour_of(tmp_path / f"p{extension}") == (200, 200, 200)
    assert [name for name in listing(tmp_path) if name.startswith(".")] == []


# --- writing: atomic, exclusive, --force -------------------------------------------------------


@pytest.mark.parametrize("hard_links", [True, False])
def test_concurrent_writers_to_one_name_get_one_file_each(tmp_path, monkeypatch, hard_links):
    if not hard_links:  # a file system without them (FAT, some shares): the O_EXCL fallback
        def no_link(source, target):
            raise OSError(errno.EPERM, "Operation not permitted")
        monkeypatch.setattr(os, "link", no_link)
    (tmp_path / "pic.png").write_bytes(b"someone else's file")
    writers = 8
    start = threading.Barrier(writers)
    written = {}

    def writer(number):
        start.wait()
        written[number] = outputs.write_image(picture(10 * number), tmp_path / "pic.png")

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(written.values())) == writers
    assert sorted(listing(tmp_path)) == sorted(["pic.png"] + [f"pic-{n}.png" for n in range(1, writers + 1)])
    assert (tmp_path / "pic.png").read_bytes() == b"someone else's file"
    for number, path in written.items():
        assert colour_of(path) == (10 * number,) * 3  # each writer's own picture under its name


def test_force_replaces_a_file_but_never_a_folder(tmp_path):
    target = tmp_path / "pic.png"
    outputs.write_image(picture(1), target)
    assert outputs.write_image(picture(2), target, force=True) == target
    assert colour_of(target) == (2, 2, 2) and listing(tmp_path) == ["pic.png"]
    (tmp_path / "dir.png").mkdir()
    assert outputs.write_image(picture(3), tmp_path / "dir.png", force=True) == tmp_path / "dir-1.png"
    assert listing(tmp_path / "dir.png") == []


def test_a_failed_write_leaves_nothing(tmp_path):
    class Broken:
        def save(self, file, format):
            file.write(b"half a picture")
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        outputs.write_image(Broken(), tmp_path / "pic.png")
    assert listing(tmp_path) == []


def test_run_files_clean_up_what_is_unfinished(tmp_path):
    files = outputs.RunFiles()
    first, second = tmp_path / "new" / "deeper" / "a.png", tmp_path / "new" / "deeper" / "b.png"
    files.save_preview(picture(1), first, "PNG")
    files.save_preview(picture(2), first, "PNG")  # the same preview file, replaced
    assert listing(first.parent) == ["a.preview.png"] and colour_of(first.parent / "a.preview.png") == (2, 2, 2)
    assert files.save(picture(3), first, "PNG") == first
    files.drop_preview(first)
    assert listing(first.parent) == ["a.png"]
    files.save_preview(picture(4), second, "PNG")
    assert files.clean_up() == [second.parent / "b.preview.png"]  # the folders hold a.png: kept
    assert listing(first.parent) == ["a.png"]
    assert files.report() == f"kept 1 finished image: {first}; removed the unfinished {second.parent / 'b.preview.png'}"

    unfinished = outputs.RunFiles()
    unfinished.save_preview(picture(5), tmp_path / "other" / "c.png", "PNG")
    unfinished.clean_up()
    assert not (tmp_path / "other").exists()
    assert unfinished.report() == (f"no image was finished; removed the unfinished {tmp_path / 'other' / 'c.preview.png'}; "
                                   f"removed the folder {tmp_path / 'other'} it had created")
    assert outputs.RunFiles().report() == "nothing was written"


@pytest.mark.parametrize("stop, code, word", [(KeyboardInterrupt(), 130, "interrupted"),
                                               (cli._Terminated(), 143, "terminated"),
                                               (OSError(errno.ENOSPC, "No space left on device"), 2, "error")])
def test_every_way_out_cleans_up_and_says_what_it_kept(tmp_path, capsys, stop, code, word):
    files = outputs.RunFiles()
    files.save(picture(1), tmp_path / "a.png", "PNG")
    files.save_preview(picture(2), tmp_path / "b.png", "PNG")
    with pytest.raises(typer.Exit) as exit_info:
        with cli._user_errors(files):
            raise stop
    assert exit_info.value.exit_code == code
    assert listing(tmp_path) == ["a.png"]
    line, = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"{word}: ")
    assert line.endswith(f"kept 1 finished image: {tmp_path / 'a.png'}; removed the unfinished {tmp_path / 'b.preview.png'}"
                         + (")" if word == "error" else ""))


def test_signals_wait_until_a_name_is_claimed(monkeypatch):
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    try:
        finished = []
        with pytest.raises(KeyboardInterrupt):
            with outputs.deferred_signals():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.1)  # a handler left in place would have raised by now
                finished.append(True)
        assert finished == [True]
    finally:
        signal.signal(signal.SIGINT, previous)


def test_only_dead_runs_temporaries_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = outputs._HOST
    names = {
        f".pic.png.{host}-{dead.pid}-0123abcd.partial": False,  # its run is gone: removed
        f".pic.png.{host}-{os.getppid()}-0123abcd.partial": True,  # a live run's
        f".pic.png.otherhost-{dead.pid}-0123abcd.partial": True,  # another machine's (a shared folder)
        ".pic.png.partial": True,  # not ours
        "pic.png": True,
    }
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    removed = outputs.remove_stale_temporaries(tmp_path)
    assert [p.name for p in removed] == [name for name, kept in names.items() if not kept]
    # The names this process gives its own temporaries are of that form, and kept while it lives.
    descriptor, own = outputs._create_temporary(tmp_path, "pic.png")
    os.close(descriptor)
    assert outputs._TEMPORARY.match(own.name)["pid"] == str(os.getpid())
    assert outputs.remove_stale_temporaries(tmp_path) == []
    own.unlink()
    assert listing(tmp_path) == sorted(name for name, kept in names.items() if kept)


# --- the commands ------------------------------------------------------------------------------


def invoke(env, *args):
    result = CliRunner().invoke(cli.app, list(args), env={k: env[k] for k in ("MOBILEO_MLX_CACHE", "MOBILEO_MLX_MODEL")})
    assert result.exit_code == 0, result.output
    return [Path(line.split("  (seed")[0]) for line in result.stdout.splitlines()]


def test_output_folders_names_formats_and_force(converted, tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    assert invoke(converted, "generate", "a kite", "--steps", "1", "-o", str(folder)) == [folder / "mobileo.png"]
    assert invoke(converted, "generate", "a kite", "--steps", "1", "-o", str(folder)) == [folder / "mobileo-1.png"]
    assert invoke(converted, "generate", "a kite", "--steps", "1", "-o", str(folder), "--force", "--seed", "9") \
        == [folder / "mobileo.png"]
    assert invoke(converted, "generate", "a kite", "--steps", "1", "-o", str(folder), "--seed", "9", "-n", "2",
                  "--force") == [folder / "mobileo-0.png", folder / "mobileo-1.png"]
    assert colour_of(folder / "mobileo.png") == colour_of(folder / "mobileo-0.png")  # seed 9 both: replaced
    assert listing(folder) == ["mobileo-0.png", "mobileo-1.png", "mobileo.png"]
    new = tmp_path / "new" / "deeper"
    assert invoke(converted, "edit", str(folder / "mobileo.png"), "make it red", "--steps", "1", "-o", f"{new}/") \
        == [new / "mobileo-edit.png"]
    assert invoke(converted, "generate", "a kite", "--steps", "1", "-o", str(tmp_path / "bare")) == [tmp_path / "bare.png"]
    assert invoke(converted, "generate", "a kite", "--steps", "1", "-o", str(tmp_path / "pic.tif")) == [tmp_path / "pic.tif"]
    with Image.open(tmp_path / "pic.tif") as image:
        assert image.format == "TIFF"
    assert [name for name in listing(tmp_path) if name.startswith(".")] == []


def test_two_runs_at_once_on_one_name_write_two_files(converted, tmp_path):
    target = tmp_path / "race.png"
    runs = [subprocess.Popen([sys.executable, "-m", "mobileo_mlx", "generate", "a race", "--steps", "2", "--seed",
                              str(seed), "-o", str(target)], env=converted, cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for seed in (1, 2)]
    reported = []
    for process in runs:
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
        reported.append(Path(stdout.split("  (seed")[0]))
    assert sorted(reported) == [tmp_path / "race-1.png", tmp_path / "race.png"]
    assert listing(tmp_path) == ["race-1.png", "race.png"]


# --- killed runs -------------------------------------------------------------------------------

IMAGE_NAME = re.compile(r"^pic-[01](-\d+)?\.png$")
PREVIEW_NAME = re.compile(r"^pic-[01](-\d+)?\.preview(-\d+)?\.png$")


def _start(env, folder: Path):
    # A run started in the background inherits SIGINT ignored; a terminal's Ctrl-C reaches a
    # process that has it: reset it, as a shell does.
    process = subprocess.Popen(
        [sys.executable, "-m", "mobileo_mlx", "generate", "a kite", "--steps", "20", "-n", "2", "--preview-every", "1",
         "--seed", "0", "-o", str(folder / "pic.png")],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    stderr = bytearray()
    started = threading.Event()

    def read():
        for chunk in iter(lambda: process.stderr.read1(4096), b""):
            stderr.extend(chunk)
            if b"prompt:" in stderr:
                started.set()
        started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return process, stderr, started, reader


def _assert_only_complete_images(folder: Path, killed: bool) -> list[str]:
    images = []
    for path in folder.iterdir():
        if path.name.startswith("."):
            assert killed and outputs._TEMPORARY.match(path.name), path.name  # hidden, never an image name
            continue
        assert IMAGE_NAME.match(path.name) or (killed and PREVIEW_NAME.match(path.name)), path.name
        with Image.open(path) as image:
            image.load()  # complete and decodable
        if IMAGE_NAME.match(path.name):
            images.append(path.name)
    return sorted(images)


@pytest.mark.parametrize("seed", range(5))
def test_killed_runs_leave_only_complete_images(converted, tmp_path, seed):
    """SIGINT (seeds 0-2) or SIGKILL (3-4) at a random moment of denoising, previewing and writing
    two images; then a normal run into the same folder."""
    rng = random.Random(seed)
    kill = signal.SIGINT if seed < 3 else signal.SIGKILL
    process, stderr, started, reader = _start(converted, tmp_path)
    assert started.wait(120)
    time.sleep(rng.uniform(0.0, 2.5))  # the two images take about that long here
    process.send_signal(kill)
    stdout = process.stdout.read().decode()
    process.wait(timeout=60)
    reader.join(timeout=10)
    text = stderr.decode(errors="replace")
    finished = _assert_only_complete_images(tmp_path, killed=kill == signal.SIGKILL)
    reported = sorted(Path(line.split("  (seed")[0]).name for line in stdout.splitlines() if line)
    if kill == signal.SIGINT:
        assert "Traceback" not in text, text
        assert reported == finished  # every image kept was announced
        if process.returncode == 130:
            said = text.replace("\r", "\n").strip().splitlines()[-1]
            assert said.startswith("interrupted: "), said
            for name in finished:
                assert str(tmp_path / name) in said
            assert ("kept" in said) == bool(finished)
        else:  # the work was done when the signal came (during Python's own shutdown: -SIGINT)
            assert process.returncode in (0, -signal.SIGINT), text
            assert finished == ["pic-0.png", "pic-1.png"] and "peak memory" in text
    else:
        assert process.returncode == -signal.SIGKILL
        assert set(reported) <= set(finished)
    # The next run succeeds, and removes the dead run's temporaries as it writes there.
    after = run(converted, "generate", "a kite", "--steps", "2", "-n", "2", "-o", str(tmp_path / "pic.png"))
    assert after.returncode == 0, after.stderr
    assert [name for name in listing(tmp_path) if name.startswith(".")] == []
    assert len(_assert_only_complete_images(tmp_path, killed=True)) == len(finished) + 2
