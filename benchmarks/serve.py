"""``python -m benchmarks.serve``: `mobileo-mlx serve` under load, and mlx-lm's server beside it.

What it measures, on the full-size model (``--recipe``, the cached conversion of
``benchmarks.inputs``) unless ``--model`` names another (``--model demo`` checks the harness
in seconds):

* chat with 1, 4 and 8 concurrent clients (``--clients``): time to first token p50/p95 (a
  1-token request from each client at once), then ``--rounds`` streamed greedy requests from
  each, one after the other, every prompt distinct: latency p50/p95, aggregate tokens/s (all
  completion tokens / the phase's wall time) and the tokens/s of one request;
* a chat with a 1024x1024 picture; an image generation and an edit (512x512, ``--steps``);
  then an image generation while 4 chat clients stream (how much chat slows an image, and an
  image chat);
* the server's peak RSS (``VmHWM``) after it served all of that;
* the same chat load on ``mlx_lm.server`` serving the same language weights (the converted LM
  exported as an mlx-lm model folder: same parameter names, the per-layer quantization in its
  config); ``--sides`` picks the servers.

Both servers run as child processes on 127.0.0.1 with a free port, driven with the official
openai client; the machine's load average is printed beside the results.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks import inputs, measure, report

REPO = Path(__file__).resolve().parents[1]
LISTENING = re.compile(r"serving \S+ on http://127\.0\.0\.1:(\d+)")
# The qwen_2 chat template (ChatML) for mlx-lm's server, the one our prompts follow.
CHATML = ("{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TOPICS = ["harbours", "glaciers", "violins", "bridges", "orchards", "comets", "deserts", "lanterns", "rivers",
          "castles", "forests", "islands", "markets", "volcanoes", "gardens", "trains"]


class Child:
    """A server process; ``ready`` is a regex whose group 1 is the port, or a port to poll."""

    def __init__(self, command: list[str], env: dict, port: int | None = None, timeout: float = 600):
        self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True)
        self.lines: list[str] = []
        self.port = port
        found = threading.Event()

        def read():
            for line in self.process.stdout:
                self.lines.append(line.rstrip("\n"))
                match = LISTENING.search(line)
                if match and self.port is None:
                    self.port = int(match.group(1))
                    found.set()
            found.set()

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + timeout
        if port is None:
            found.wait(timeout)
        while self.port is None or not _accepts(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit("the server did not start:\n" + "\n".join(self.lines[-30:]))
            time.sleep(0.2)

    def peak_rss_gb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1e6
        return float("nan")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def _accepts(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def client(port: int):
    import openai

    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=1800)


def stream_chat(port: int, model: str, messages: list, max_tokens: int) -> dict:
    """One streamed greedy request: seconds to the first text and to the end, completion tokens."""
    started = time.perf_counter()
    first = None
    tokens = 0
    stream = client(port).chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                  temperature=0.0, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - started
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    total = time.perf_counter() - started
    return {"ttft": first if first is not None else total, "latency": total, "tokens": tokens}


def chat_phase(port: int, model: str, clients: int, rounds: int, max_tokens: int, offset: int = 0) -> dict:
    """``clients`` threads at once. First each sends one 1-token request: its latency is the
    time to the first token (prefill included; measured so because the full-size benchmark
    model is random, and most of its tokens have no text to stream). Then each sends
    ``rounds`` ``max_tokens`` requests one after the other. Every prompt is distinct."""
    def prompt(number: int) -> list:
        topic = TOPICS[number % len(TOPICS)]
        return [{"role": "user", "content": f"Write a long essay about {topic}, request {number}."}]

    with ThreadPoolExecutor(clients) as pool:
        first = list(pool.map(lambda number: stream_chat(port, model, prompt(offset + 1000 + number), 1),
                              range(clients)))

    def one_client(number: int) -> list[dict]:
        return [stream_chat(port, model, prompt(offset + number * rounds + round_), max_tokens)
                for round_ in range(rounds)]

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [result for batch in pool.map(one_client, range(clients)) for result in batch]
    wall = time.perf_counter() - started
    tokens = sum(result["tokens"] for result in results)
    return {
        "clients": clients,
        "requests": len(results),
        "wall_s": wall,
        "tokens": tokens,
        "aggregate_tok_s": tokens / wall,
        "request_tok_s": statistics.median(r["tokens"] / r["latency"] for r in results),
        "latency_p50": _percentile([r["latency"] for r in results], 50),
        "latency_p95": _percentile([r["latency"] for r in results], 95),
        "ttft_p50": _percentile([r["latency"] for r in first], 50),
        "ttft_p95": _percentile([r["latency"] for r in first], 95),
    }


def _percentile(values: list[float], percent: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(percent / 100 * (len(ordered) - 1))))
    return ordered[index]


def picture_png(size: int) -> bytes:
    buffer = io.BytesIO()
    inputs.picture(size).save(buffer, "PNG")
    return buffer.getvalue()


def image_request(port: int, model: str, steps: int, size: int, edit_png: bytes | None = None) -> float:
    started = time.perf_counter()
    api = client(port)
    extra = {"seed": 0, "steps": steps}
    if edit_png is None:
        api.images.generate(model=model, prompt=inputs.PROMPT, size=f"{size}x{size}", extra_body=extra)
    else:
        api.images.edit(model=model, image=("picture.png", edit_png, "image/png"), prompt="make it night time",
                        size=f"{size}x{size}", extra_body=extra)
    return time.perf_counter() - started


def export_for_mlx_lm(folder: Path, target: Path) -> Path:
    """The converted language model as an mlx-lm model folder: its weights as they are (the
    runtime names are mlx-lm's Qwen2 names), its config with the per-layer quantization in
    mlx-lm's form, the tokenizer files, and the chat template our prompts follow."""
    config = json.loads((folder / "config.json").read_text())
    quantization = config.get("quantization") or {}
    layers = (quantization.get("layers") or {}).get("language") or {}
    language = dict(config["language"])
    if layers:
        language["quantization"] = {"group_size": quantization.get("group_size", 64), "bits": 4, **layers}
    target.mkdir(parents=True, exist_ok=True)
    (target / "config.json").write_text(json.dumps(language, indent=1))
    shutil.copy(folder / "language.safetensors", target / "model.safetensors")
    for name in ("tokenizer.json", "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json"):
        if (folder / name).exists():
            shutil.copy(folder / name, target / name)
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config.setdefault("chat_template", CHATML)
    (target / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=1))
    return target


def run_ours(args, folder: Path, env: dict) -> dict:
    command = [sys.executable, "-m", "mobileo_mlx", "serve", "--model", str(folder), "--port", "0",
               "--max-queue", "64", "--max-tokens", str(args.tokens)]
    started = time.perf_counter()
    server = Child(command, env)
    results = {"start_s": time.perf_counter() - started, "chat": []}
    model = client(server.port).models.list().data[0].id
    try:
        stream_chat(server.port, model, [{"role": "user", "content": "warm up"}], 4)
        for count in args.clients:
            measure.log(f"ours: chat with {count} client(s)")
            results["chat"].append(chat_phase(server.port, model, count, args.rounds, args.tokens, offset=count * 10))
        if not args.no_images:
            measure.log("ours: chat with a 1024x1024 picture")
            url = "data:image/png;base64," + base64.b64encode(picture_png(1024)).decode()
            picture = [{"role": "user", "content": [{"type": "text", "text": inputs.QUESTION},
                                                    {"type": "image_url", "image_url": {"url": url}}]}]
            results["picture_chat"] = stream_chat(server.port, model, picture, args.tokens)
            measure.log(f"ours: image generation ({args.steps} steps)")
            results["generation_s"] = image_request(server.port, model, args.steps, args.size)
            measure.log("ours: image edit")
            results["edit_s"] = image_request(server.port, model, args.steps, args.size, picture_png(args.size))
            measure.log("ours: an image generation while 4 chat clients stream")
            with ThreadPoolExecutor(1) as pool:
                image = pool.submit(image_request, server.port, model, args.steps, args.size)
                time.sleep(1.0)
                results["chat_during_image"] = chat_phase(server.port, model, 4, args.rounds, args.tokens, offset=500)
                results["generation_with_chat_s"] = image.result()
        results["peak_rss_gb"] = server.peak_rss_gb()
    finally:
        server.stop()
    results["log_tail"] = server.lines[-5:]
    return results


def run_mlx_lm(args, folder: Path, env: dict) -> dict:
    inputs.bench_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=inputs.bench_dir()) as scratch:
        exported = export_for_mlx_lm(folder, Path(scratch) / "mlx-lm-language")
        port = _free_port()
        command = [sys.executable, "-m", "mlx_lm.server", "--model", str(exported), "--port", str(port),
                   "--max-tokens", str(args.tokens), "--log-level", "WARNING"]
        started = time.perf_counter()
        server = Child(command, env, port=port)
        results = {"start_s": time.perf_counter() - started, "chat": []}
        try:
            stream_chat(port, "default_model", [{"role": "user", "content": "warm up"}], 4)
            for count in args.clients:
                measure.log(f"mlx_lm.server: chat with {count} client(s)")
                results["chat"].append(chat_phase(port, "default_model", count, args.rounds, args.tokens,
                                                  offset=count * 10))
            results["peak_rss_gb"] = server.peak_rss_gb()
        finally:
            server.stop()
        return results


def chat_table(rows: list[dict]) -> str:
    return report.table(
        ["clients", "requests", "aggregate tok/s", "tok/s of a request", "latency p50 s", "latency p95 s",
         "TTFT p50 s", "TTFT p95 s"],
        [[r["clients"], r["requests"], report.fmt(r["aggregate_tok_s"], 1), report.fmt(r["request_tok_s"], 1),
          report.fmt(r["latency_p50"]), report.fmt(r["latency_p95"]), report.fmt(r["ttft_p50"]),
          report.fmt(r["ttft_p95"])] for r in rows])


def results_text(args, ours: dict, theirs: dict | None) -> str:
    lines = [f"model {args.model or 'full-size ' + args.recipe}, {args.tokens} tokens a request, "
             f"{args.rounds} request(s) per client, load average before: {args.load_before}, "
             f"after: {measure.load_average()}"]
    if ours is not None:
        lines += ["", f"mobileo-mlx serve (started in {ours['start_s']:.1f} s):", chat_table(ours["chat"])]
    if ours is not None and "generation_s" in ours:
        lines += ["",
                  f"picture chat (1024x1024): {ours['picture_chat']['tokens']} tokens in "
                  f"{ours['picture_chat']['latency']:.2f} s",
                  f"image generation {args.size}x{args.size}, {args.steps} steps: {ours['generation_s']:.1f} s; "
                  f"edit: {ours['edit_s']:.1f} s",
                  f"generation while 4 chat clients stream: {ours['generation_with_chat_s']:.1f} s; "
                  "the chat meanwhile:",
                  chat_table([ours["chat_during_image"]])]
    if ours is not None:
        lines += ["", f"peak RSS of the server after all of the above: {ours['peak_rss_gb']:.2f} GB"]
    if theirs is not None:
        lines += ["", f"mlx_lm.server, same language weights (started in {theirs['start_s']:.1f} s, "
                      f"peak RSS {theirs['peak_rss_gb']:.2f} GB):", chat_table(theirs["chat"])]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="mixed", choices=inputs.RECIPES)
    parser.add_argument("--model", help="a converted folder or 'demo' instead of the full-size conversion")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--rounds", type=int, default=2, help="requests each client sends in turn")
    parser.add_argument("--tokens", type=int, default=64, help="max_tokens of each chat request")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps of the image requests")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--no-images", action="store_true", help="chat only")
    parser.add_argument("--sides", nargs="+", choices=("ours", "mlx-lm"), default=["ours", "mlx-lm"],
                        help="which servers to measure")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    args.load_before = measure.load_average()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.model == "demo":
        from mobileo_mlx.hub import resolve_model

        folder = Path(resolve_model("demo"))
    elif args.model:
        folder = Path(args.model)
    else:
        folder = inputs.converted(args.recipe)
    ours = run_ours(args, folder, env) if "ours" in args.sides else None
    theirs = run_mlx_lm(args, folder, env) if "mlx-lm" in args.sides else None
    text = results_text(args, ours, theirs)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"ours": ours, "mlx_lm": theirs, "load_before": args.load_before}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
