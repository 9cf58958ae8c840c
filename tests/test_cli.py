"""The real `mobileo-mlx` commands on the demo model, in subprocesses as a user runs them; and,
in-process with a stand-in model, that each option of the shared option groups reaches it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from mobileo_mlx import cli
from mobileo_mlx.pipeline import DenoiseStep, MobileO

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    # A private cache: the first command converts the demo checkpoint into it.
    cache = tmp_path_factory.mktemp("cache")
    return {**os.environ, "MOBILEO_MLX_CACHE": str(cache), "MOBILEO_MLX_MODEL": "demo", "PYTHONUNBUFFERED": "1"}


def run(env, *args, input_text=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "mobileo_mlx", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, input=input_text, timeout=timeout)


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_generate_writes_numbered_images_and_reports(env, tmp_path):
    out = tmp_path / "pic.png"
    result = run(env, "generate", "a red bicycle", "-o", str(out), "-n", "2", "--seed", "3", "--steps", "3")
    assert result.returncode == 0, result.stderr
    written = [tmp_path / "pic-0.png", tmp_path / "pic-1.png"]
    for path in written:
        assert str(path) in result.stdout
        assert Image.open(path).size == (128, 128)  # the demo model's native size
    assert "seed 3" in result.stdout and "seed 4" in result.stdout
    assert "peak memory" in result.stderr and "LLM + MCP" in result.stderr
    # Never overwrite silently: a second run picks new names.
    again = run(env, "generate", "a red bicycle", "-o", str(written[0]), "--seed", "3", "--steps", "3")
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "pic-0-1.png").exists()
    # Same seed, same picture.
    np.testing.assert_array_equal(np.asarray(Image.open(written[0])), np.asarray(Image.open(tmp_path / "pic-0-1.png")))


def test_generate_previews_and_size(env, tmp_path):
    out = tmp_path / "big.png"
    result = run(env, "generate", "boats", "-o", str(out), "--size", "64", "--steps", "4", "--preview-every", "2",
                 "--scheduler", "euler", "--seed", "1")
    assert result.returncode == 0, result.stderr
    assert Image.open(out).size == (64, 64)
    assert not (tmp_path / "big.preview.png").exists()  # previews are replaced by the final image


def test_ask_streams_an_answer(env, tmp_path):
    image = tmp_path / "in.png"
    Image.fromarray(np.full((40, 60, 3), 128, np.uint8)).save(image)
    result = run(env, "ask", str(image), "What is this?", "--max-tokens", "8")
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("\n")


def test_chat_one_shot_and_interactive(env, tmp_path):
    result = run(env, "chat", "hello there", "--max-tokens", "5")
    assert result.returncode == 0, result.stderr
    image = tmp_path / "c.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(image)
    session = f"hi\n/image {image}\nwhat is it?\n/image {tmp_path / 'missing.png'}\n/reset\nbye\n/exit\n"
    result = run(env, "chat", "--max-tokens", "4", input_text=session)
    assert result.returncode == 0, result.stderr
    assert "picture attached" in result.stderr
    assert "image not found" in result.stderr
    assert "history cleared" in result.stderr


def test_edit_writes_an_image(env, tmp_path):
    image = tmp_path / "in.png"
    Image.fromarray(np.full((30, 50, 3), 200, np.uint8)).save(image)
    out = tmp_path / "edited.png"
    result = run(env, "edit", str(image), "make it blue", "-o", str(out), "--steps", "2", "--seed", "0")
    assert result.returncode == 0, result.stderr
    assert Image.open(out).size == (128, 128)


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["ask", "missing.png", "what?"], ["image not found"]),
        (["ask", "NOT_IMAGE", "what?"], ["not an image"]),
        (["generate", "  "], ["prompt is empty"]),
        (["generate", "x", "--steps", "0"], ["steps must be between 1 and 1000"]),
        (["generate", "x", "--size", "100"], ["multiple of 32"]),
        (["generate", "x", "--scheduler", "heun"], ["unknown sampler"]),
        (["generate", "x", "--model", "/no/such/folder"], []),
        (["edit", "missing.png", "x"], ["image not found"]),
        (["generate", "x", "--cpu-matmul", "fp8"], ["expected one of auto, fp32, bf16"]),
    ],
)
def test_bad_input_is_one_clear_line(env, tmp_path, args, fragments):
    (tmp_path / "not_image.txt").write_text("plain text")
    args = [str(tmp_path / "not_image.txt") if a == "NOT_IMAGE" else a for a in args]
    result = run(env, *args, "-o", str(tmp_path / "o.png")) if args[0] == "generate" else run(env, *args)
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "o.png").exists()


def test_cpu_matmul_choices(env, tmp_path):
    """--cpu-matmul fp32 and bf16 (where the CPU has AVX512-BF16) both draw the picture; the
    demo model's products are too small for the bf16 kernel, so both give the same one."""
    from mobileo_mlx import backends

    pictures = {}
    for choice in ("fp32", "bf16"):
        out = tmp_path / f"{choice}.png"
        result = run(env, "generate", "a kite", "-o", str(out), "--seed", "5", "--steps", "2", "--cpu-matmul", choice)
        if choice == "bf16" and backends.bf16_unavailable_reason() is not None:
            assert_one_line_error(result, "bf16 CPU matmuls are not available")
            continue
        assert result.returncode == 0, result.stderr
        pictures[choice] = np.asarray(Image.open(out))
    if len(pictures) == 2:
        np.testing.assert_array_equal(pictures["fp32"], pictures["bf16"])


def test_ctrl_c_stops_cleanly_and_leaves_nothing_unfinished(env, tmp_path):
    out = tmp_path / "never.png"
    run(env, "generate", "warm", "--steps", "1", "-o", str(tmp_path / "warm.png"))  # conversion done beforehand
    # A terminal's Ctrl-C reaches a process whose SIGINT is not ignored. A test run started in the
    # background (`nohup ... &`) inherits SIGINT ignored, and so would the command: reset it, as a shell does.
    process = subprocess.Popen([sys.executable, "-m", "mobileo_mlx", "generate", "a long run", "--steps", "1000",
                                "-n", "100", "--preview-every", "1", "-o", str(out)], env=env, cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(8)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    said = stderr.replace("\r", "\n").strip().splitlines()[-1]
    assert said.startswith("interrupted: ")
    # Finished images stay and are named; previews and temporaries are gone.
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != "warm.png")
    assert all(str(tmp_path / name) in said for name in left)
    assert not [name for name in left if "preview" in name or name.startswith(".")]


# --- the option groups: each option reaches the model (a stand-in, in-process) ------------------


class StandInModel:
    """Records what a command asks of the model; its pictures are flat."""

    STAGES = MobileO.STAGES

    def __init__(self):
        self.loads, self.calls = [], []

    def check_size(self, size):
        return 128 if size is None else size

    def caption_conditioning(self, text, source=None):
        self.calls.append(("conditioning", text, None if source is None else source.size))
        return SimpleNamespace(prompt_tokens=3)

    def release(self, *names):
        pass

    @contextlib.contextmanager
    def picture_session(self):
        self.calls.append(("session",))
        yield

    def generate_latents(self, conditioning, **options):
        self.calls.append(("denoise", options))
        for index in range(options["steps"]):
            yield DenoiseStep(index, options["steps"], 999.0, None)

    def decode(self, latents):
        return [Image.new("RGB", (8, 8), "gray")]

    def ask(self, image, question, **options):
        self.calls.append(("ask", question, image.size, options))
        return iter([SimpleNamespace(text="an answer")])

    def chat(self, messages, **options):
        self.calls.append(("chat", [(m.role, m.content, len(m.images)) for m in messages], options))
        return iter([SimpleNamespace(text="a reply")])


@pytest.fixture
def stand_in(monkeypatch):
    model = StandInModel()
    monkeypatch.setattr(cli, "_load_model", lambda *args: model.loads.append(args) or model)
    return model


def invoke(*args):
    result = CliRunner().invoke(cli.app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_generate_and_edit_pass_every_option_on(stand_in, tmp_path):
    source = tmp_path / "in.png"
    Image.new("RGB", (20, 10), "red").save(source)
    out = tmp_path / "out"
    shared = ["-o", out / "x.png", "-n", "2", "--seed", "5", "--steps", "3", "--guidance", "2.5", "--size", "64",
              "--scheduler", "euler", "--force", "--low-memory", "--cpu-matmul", "fp32", "--model", "some/model"]
    denoise = [("denoise", {"steps": 3, "guidance": 2.5, "size": 64, "seed": seed, "scheduler": "euler"})
               for seed in (5, 6)]
    for head, conditioning in [(["generate", "a kite", "--preview-every", "2"], ("conditioning", "a kite", None)),
                               (["edit", source, "make it red"], ("conditioning", "make it red", (20, 10)))]:
        stand_in.loads.clear(), stand_in.calls.clear()
        result = invoke(*head, *shared)
        assert stand_in.loads == [("some/model", True, "fp32")]
        assert stand_in.calls == [("session",), conditioning, *denoise]  # the stages in one session
        assert "seed 5" in result.stdout and "seed 6" in result.stdout
        assert sorted(p.name for p in out.iterdir()) == ["x-0.png", "x-1.png"]  # --force: edit replaced them


def test_generate_and_edit_defaults(stand_in, tmp_path):
    source = tmp_path / "in.png"
    Image.new("RGB", (20, 10), "red").save(source)
    invoke("generate", "a kite", "-o", f"{tmp_path}/")
    invoke("edit", source, "make it red", "-o", f"{tmp_path}/")
    assert stand_in.loads == [(None, False, None)] * 2
    denoise = [options for kind, *rest in stand_in.calls if kind == "denoise" for options in rest]
    assert [{k: v for k, v in options.items() if k != "seed"} for options in denoise] == [
        {"steps": 20, "guidance": 1.5, "size": 128, "scheduler": "dpm"}] * 2
    assert all(isinstance(options["seed"], int) for options in denoise)  # a fresh one, printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png", "mobileo-edit.png", "mobileo.png"]


def test_ask_and_chat_pass_every_option_on(stand_in, tmp_path):
    source = tmp_path / "in.png"
    Image.new("RGB", (20, 10), "red").save(source)
    shared = ["--max-tokens", "7", "-t", "0.5", "--top-p", "0.9", "--top-k", "3", "--repetition-penalty", "1.2",
              "--system", "Be brief.", "--cpu-matmul", "fp32", "-m", "some/model"]
    options = {"system": "Be brief.", "stream": True, "max_tokens": 7, "temperature": 0.5, "top_p": 0.9,
               "top_k": 3, "repetition_penalty": 1.2}
    assert invoke("ask", source, "What is it?", *shared).stdout == "an answer\n"
    assert invoke("chat", "hello", "--image", source, *shared).stdout == "a reply\n"
    assert stand_in.loads == [("some/model", True, "fp32"), ("some/model", False, "fp32")]
    assert stand_in.calls == [("ask", "What is it?", (20, 10), options), ("chat", [("user", "hello", 1)], options)]
    stand_in.calls.clear()
    invoke("ask", source, "What is it?")
    invoke("chat", "hello")
    defaults = {"system": cli.DEFAULT_SYSTEM, "stream": True, "max_tokens": 256, "temperature": 0.0, "top_p": 1.0,
                "top_k": 0, "repetition_penalty": None}
    assert stand_in.calls == [("ask", "What is it?", (20, 10), defaults), ("chat", [("user", "hello", 0)], defaults)]
