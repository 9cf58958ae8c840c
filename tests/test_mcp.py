"""Mobile Conditioning Projector: parity with the compact PyTorch reference (docs/reference-model.md §2.4)
through the converter's mapping, at a small and at the full size."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

from mobileo_mlx.convert.mapping import mcp as mcp_mapping
from mobileo_mlx.models import build
from tests.helpers import SEAMS, convert_state_dict, reference_keys, relative_error, seamed
from tests.reference.mcp_torch import TorchMobileConditioningProjector

PREFIX = "model.diffusion_connector.fusion."
TOLERANCE = 1e-4

SMALL = dict(hidden_size=64, compress_dim=32, output_dim=48, num_layers=4, num_refiners=2, reduction=4)
FULL = dict(hidden_size=896, compress_dim=512, output_dim=2304, num_layers=4, num_refiners=2, reduction=4)


def reference_model(dims: dict, temperature: float = 2.0, seed: int = 0):
    """The PyTorch MCP with random weights: default Linear/Conv init, random
    LayerNorm affines and biases, random layer weights."""
    torch.manual_seed(seed)
    model = TorchMobileConditioningProjector(**dims, temperature=temperature).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name == "layer_weights":
                param.copy_(torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.2 * torch.randn_like(param))
            elif param.dim() == 1:  # LayerNorm scales
                param.copy_(1 + 0.2 * torch.randn_like(param))
    return model


def checkpoint_state_dict(model) -> dict:
    return {PREFIX + name: tensor for name, tensor in model.state_dict().items()}


def mlx_model(torch_model, seam: str = "accelerated"):
    config, weights = convert_state_dict("mcp", checkpoint_state_dict(torch_model))
    model = build("mcp", config)
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    return seamed(model, "mcp", seam)


def random_hidden_states(batch: int, length: int, width: int, num_layers: int, seed: int):
    rng = np.random.default_rng(seed)
    return [
        rng.normal(0.0, scale, (batch, length, width)).astype(np.float32)
        for scale in np.linspace(3.0, 1.0, num_layers)
    ]


def run_both(torch_model, model, hidden_states):
    with torch.no_grad():
        expected = torch_model([torch.from_numpy(h) for h in hidden_states]).numpy()
    actual = model([mx.array(h) for h in hidden_states])
    return np.array(actual), expected


def read_keys_full() -> dict[str, tuple[int, ...]]:
    """The MCP tensors of the released checkpoint: name -> shape."""
    return {name: shape for name, (shape, _dtype) in reference_keys().items() if name.startswith(PREFIX)}


def test_reference_names_and_shapes_equal_the_checkpoint():
    released = read_keys_full()
    assert len(released) == 26
    reference = {name: tuple(t.shape) for name, t in checkpoint_state_dict(reference_model(FULL)).items()}
    assert reference == released
    n_params = sum(p.numel() for p in TorchMobileConditioningProjector(**FULL).parameters())
    assert n_params == 2_440_452  # docs/reference-model.md §2.4


def test_config_from_checkpoint_shapes():
    config = mcp_mapping.config_from_checkpoint(read_keys_full(), {"hidden_size": 896})
    assert config == {
        "hidden_size": 896,
        "compress_dim": 512,
        "output_dim": 2304,
        "num_layers": 4,
        "num_refiners": 2,
        "reduction": 4,
        "kernel_size": 3,
    }


def test_config_from_checkpoint_rejects_a_mismatched_lm_width():
    with pytest.raises(ValueError):
        mcp_mapping.config_from_checkpoint(read_keys_full(), {"hidden_size": 1024})


def test_every_released_tensor_maps_onto_a_runtime_parameter_of_the_same_size():
    released = read_keys_full()
    model = build("mcp", mcp_mapping.config_from_checkpoint(released, {}))
    runtime = {name: tuple(value.shape) for name, value in tree_flatten(model.parameters())}
    converted = dict(
        mcp_mapping.convert(list(released), lambda k: np.zeros(released[k], np.float32), None)
    )
    assert {name: value.shape for name, value in converted.items()} == runtime


@pytest.mark.parametrize("seam", SEAMS)
@pytest.mark.parametrize("length", [1, 7, 77])
def test_parity_small(length, seam):
    torch_model = reference_model(SMALL, seed=1)
    model = mlx_model(torch_model, seam)
    hidden = random_hidden_states(2, length, SMALL["hidden_size"], SMALL["num_layers"], seed=length)
    actual, expected = run_both(torch_model, model, hidden)
    assert actual.shape == (2, length, SMALL["output_dim"])
    assert relative_error(actual, expected) <= TOLERANCE


@pytest.mark.parametrize("length", [1, 7, 77])
def test_parity_full_size(length):
    torch_model = reference_model(FULL, seed=2)
    model = mlx_model(torch_model)
    hidden = random_hidden_states(2, length, FULL["hidden_size"], FULL["num_layers"], seed=100 + length)
    actual, expected = run_both(torch_model, model, hidden)
    assert actual.shape == (2, length, FULL["output_dim"])
    assert relative_error(actual, expected) <= TOLERANCE


def test_temperature_is_read_from_the_checkpoint():
    hidden = random_hidden_states(2, 7, SMALL["hidden_size"], SMALL["num_layers"], seed=7)
    default = reference_model(SMALL, temperature=2.0, seed=3)
    annealed = reference_model(SMALL, temperature=0.5, seed=3)  # same weights, other temperature
    _, expected_default = run_both(default, mlx_model(default), hidden)
    model = mlx_model(annealed)
    assert float(model.temperature) == 0.5
    actual, expected = run_both(annealed, model, hidden)
    assert relative_error(actual, expected) <= TOLERANCE
    # The temperature matters: the two references differ far beyond the tolerance.
    assert relative_error(expected, expected_default) > 100 * TOLERANCE


def test_wrong_number_of_hidden_states_is_an_error():
    model = mlx_model(reference_model(SMALL))
    hidden = [mx.zeros((1, 3, SMALL["hidden_size"]))] * (SMALL["num_layers"] + 1)
    with pytest.raises(ValueError):
        model(hidden)
