"""The benchmark harness (benchmarks/): the cost model's FLOP counts against PyTorch's own counter
on the reference networks, the parent -> worker hand-over of options, and the comparison tables.

The benchmarks themselves never run here on the full-size model; these are the parts whose
mistakes would silently skew every reported number, and the serving benchmark's harness on the
demo model (it drives two servers: drift there shows only when it is run).
"""

import mobileo_mlx  # noqa: F401  (BLAS routing before mlx.core)

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import ask, cli, cost_model, generate, quality, report


REPO = Path(__file__).resolve().parents[1]


def _counted_flops(run) -> int:
    # The math attention backend: the CPU's fused kernel is invisible to the counter.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


def test_dit_flops_equal_torch_count_of_diffusers_sana():
    from diffusers import SanaTransformer2DModel

    config = dict(in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=8, num_layers=2,
                  num_cross_attention_heads=4, cross_attention_head_dim=8, cross_attention_dim=32,
                  caption_channels=24, mlp_ratio=2.5, sample_size=8, patch_size=1, interpolation_scale=None,
                  norm_elementwise_affine=False, attention_bias=False)
    dit = SanaTransformer2DModel(**config).eval()
    latents, caption = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 24)
    counted = _counted_flops(lambda: dit(latents, encoder_hidden_states=caption, timestep=torch.tensor([500.0] * 2)))
    assert cost_model.dit_forward_flops(config, batch=2, tokens=64, caption=7) == counted


def test_vae_decode_flops_equal_torch_count_of_diffusers_dcae():
    from diffusers import AutoencoderDC

    widths, types, layers, scales = [8, 16, 32], ["ResBlock", "ResBlock", "EfficientViTBlock"], [1, 1, 2], [[], [], [5]]
    vae = AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=8, upsample_block_type="interpolate",
        decoder_block_out_channels=widths, decoder_block_types=types, decoder_layers_per_block=layers,
        decoder_qkv_multiscales=scales, decoder_norm_types="rms_norm", decoder_act_fns="silu",
        encoder_block_out_channels=widths, encoder_block_types=types, encoder_layers_per_block=[1, 1, 1],
        encoder_qkv_multiscales=scales).eval()
    counted = _counted_flops(lambda: vae.decode(torch.randn(1, 4, 4, 4)))
    converted = {"latent_channels": 4, "block_out_channels": widths, "block_types": types,
                 "layers_per_block": layers, "qkv_multiscales": scales, "attention_head_dim": 8}
    assert cost_model.vae_decode_flops(converted, size=16) == counted


@pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning")  # renamed `cache` in transformers 5
def test_lm_flops_of_a_decoded_token_equal_torch_count_of_transformers_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    language = dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2)
    lm = Qwen2ForCausalLM(Qwen2Config(**language, attn_implementation="eager")).eval()
    with torch.no_grad():
        cache = lm(torch.randint(0, 100, (1, 9)), use_cache=True).past_key_values
    # one token after 9 cached ones: it sees every key, as the count assumes
    counted = _counted_flops(lambda: lm(torch.tensor([[5]]), past_key_values=cache, use_cache=True))
    assert cost_model.lm_flops(language, tokens=1, context=9, head_tokens=1) == counted


@pytest.mark.parametrize("script, typed, given", [
    (generate, ["--recipe", "mixed", "--steps", "2", "--prompt", "a b, c", "--keep-loaded", "--cpu-matmul", "fp32"],
     {"folder": "/c/mlx-mixed", "checkpoint": "/c/ckpt", "out": "/c/out"}),
    (ask, ["--tokens", "4", "--size", "512", "--warmup", "off"], {"folder": "/c/mlx-none", "checkpoint": "/c/ckpt"}),
    (quality, ["--steps", "3"], {"folder": "/c/mlx-4", "out": "/c/4.npz", "reference": "/c/b.npz", "cpu_matmul": "bf16"}),
])
def test_a_worker_reads_the_options_its_parent_forwards(script, typed, given):
    parser = script.build_parser()
    parent = parser.parse_args(typed)
    names = getattr(script, "WORKER_OPTIONS", ("steps",))
    worker = parser.parse_args(["--worker", "mlx", *cli.forward(parent, names, **given)])
    for name in names:
        assert getattr(worker, name) == getattr(parent, name), name
    for name, value in given.items():
        assert getattr(worker, name) == value, name


def test_steps_and_tokens_below_one_are_refused():
    with pytest.raises(SystemExit):
        generate.build_parser().parse_args(["--steps", "0"])
    with pytest.raises(SystemExit):
        ask.build_parser().parse_args(["--tokens", "0"])


def test_unknown_sides_are_refused_by_name():
    assert cli.pick("mlx, torch-bf16", cli.SIDES, "side") == ["mlx", "torch-bf16"]
    with pytest.raises(SystemExit, match="unknown side 'torch'"):
        cli.pick("mlx,torch", cli.SIDES, "side")


def test_side_table_ratios_say_how_many_times_better_mlx_is():
    rows = [("seconds", {"mlx": 2.0, "torch-fp32": 3.0}, 2, False, []),
            ("tokens/s", {"mlx": 10.0, "torch-fp32": 5.0}, 1, True, []),
            ("missing", {"mlx": None, "torch-fp32": 1.0}, 1, False, [])]
    assert report.side_table(["mlx", "torch-fp32"], rows, suffix=" s").splitlines() == [
        "| stage    | mlx s | torch-fp32 s | torch-fp32/mlx |",
        "|----------|------:|-------------:|---------------:|",
        "| seconds  |  2.00 |         3.00 |          x1.50 |",
        "| tokens/s |  10.0 |          5.0 |          x2.00 |",
        "| missing  |     - |          1.0 |             x- |",
    ]
    # without MLX there is nothing to be relative to
    assert report.side_table(["torch-fp32"], rows[:1]).splitlines()[0] == "| stage   | torch-fp32 |"


def test_fewer_steps_are_extrapolated_at_the_median_step():
    result = {"llm_mcp_s": 1.0, "step_s": [5.0, 2.0, 3.0], "decode_s": 4.0, "load_s": 0.5}
    times = generate.stage_times(result, target_steps=20)
    assert times["steps"] == 10.0 + 17 * 3.0 and times["best_step"] == 2.0
    assert times["total"] == 1.0 + 61.0 + 4.0
    assert generate.stage_times(result, target_steps=3)["steps"] == 10.0


def test_the_serving_benchmark_runs_end_to_end_on_the_demo_model(tmp_path):
    """benchmarks.serve against both servers on the demo model (one client, one short request):
    the harness still drives them and reports every phase with the tokens it asked for."""
    out = tmp_path / "serve.json"
    env = {**os.environ, "MOBILEO_MLX_CACHE": str(tmp_path / "cache")}
    subprocess.run([sys.executable, "-m", "benchmarks.serve", "--model", "demo", "--clients", "1", "--rounds", "1",
                    "--tokens", "4", "--steps", "1", "--size", "64", "--json", str(out)],
                   cwd=REPO, env=env, check=True, capture_output=True, text=True, timeout=300)
    results = json.loads(out.read_text())
    for side in ("ours", "mlx_lm"):
        (phase,) = results[side]["chat"]
        assert phase["clients"] == 1 and phase["requests"] == 1 and phase["aggregate_tok_s"] > 0
    assert results["ours"]["peak_rss_gb"] > 0


def test_the_ask_benchmark_profiles_the_vision_tower_of_the_demo_model(tmp_path):
    """benchmarks.ask --profile on the demo model: one vision-tower pass timed per call, FastViT's
    blocks one row per stage, the table printed and the times in the JSON."""
    out = tmp_path / "ask.json"
    env = {**os.environ, "MOBILEO_MLX_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-m", "benchmarks.ask", "--model", "demo", "--sides", "mlx", "--tokens",
                             "2", "--size", "64", "--profile", "--profile-repeats", "1", "--json", str(out)],
                            cwd=REPO, env=env, check=True, capture_output=True, text=True, timeout=300)
    profile = json.loads(out.read_text())["profile"]["vision"]
    ops = profile["ops"]
    blocks = [op for op in ops if op.startswith("vision.network.0.* [")]
    assert blocks and blocks[0].endswith("Block]") and profile["calls"][blocks[0]] >= 1  # every block of a stage
    assert any(op.startswith("vision.network.0.*.convffn.fc1 [") for op in ops)
    assert all(seconds >= 0 for seconds in ops.values()) and 0 < sum(ops.values()) <= profile["profiled_s"]
    assert "vision tower (one " in result.stdout and "| call (module path [class] or function)" in result.stdout


def test_the_ask_benchmark_runs_another_model_on_the_mlx_side_only():
    with pytest.raises(SystemExit, match="--sides mlx"):
        ask.parent(ask.build_parser().parse_args(["--model", "demo"]))
