"""mlp2x_gelu projector: parity with torch's Linear -> GELU -> Linear through
the real weight mapping, and config inference from the released shapes."""

import mobileo_mlx  # noqa: F401  (BLAS routing, before mlx.core)

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

from mobileo_mlx.convert.mapping import projector as mapping
from mobileo_mlx.models.projector import Projector, ProjectorConfig
from tests.helpers import convert_state_dict, relative_error

# Shapes of the released checkpoint's projector (keys_full.txt, docs/reference-model.md §1.3).
RELEASED_SHAPES = {
    "model.mm_projector.0.weight": (896, 3072),
    "model.mm_projector.0.bias": (896,),
    "model.mm_projector.2.weight": (896, 896),
    "model.mm_projector.2.bias": (896,),
}


def reference_projector(mm_hidden: int, hidden: int) -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(mm_hidden, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden)
    ).eval()


def test_parity_with_torch():
    reference = reference_projector(96, 40)
    state = {f"model.mm_projector.{k}": v for k, v in reference.state_dict().items()}
    config, weights = convert_state_dict("projector", state, {"mm_projector_type": "mlp2x_gelu"})
    assert config == {"mm_hidden_size": 96, "hidden_size": 40, "projector_type": "mlp2x_gelu"}
    model = Projector(ProjectorConfig.from_dict(config))
    model.load_weights(list(weights.items()), strict=True)

    # Spread the inputs so GELU's negative side and curvature matter.
    features = np.random.default_rng(0).normal(0, 3, (2, 16, 96)).astype(np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(features)).numpy()
    actual = np.array(model(mx.array(features)))
    assert actual.shape == (2, 16, 40)
    assert relative_error(actual, expected) <= 1e-4  # reached ~2e-7 (fp32)


def test_config_from_released_shapes():
    config = mapping.config_from_checkpoint(
        RELEASED_SHAPES, {"mm_projector_type": "mlp2x_gelu", "mm_hidden_size": 3072}
    )
    assert config == {"mm_hidden_size": 3072, "hidden_size": 896, "projector_type": "mlp2x_gelu"}


@pytest.mark.parametrize(
    "checkpoint_config",
    [{"mm_projector_type": "linear"}, {"mm_hidden_size": 1024}],
    ids=["other-type", "width-mismatch"],
)
def test_config_rejects_inconsistent_checkpoints(checkpoint_config):
    with pytest.raises(ValueError):
        mapping.config_from_checkpoint(RELEASED_SHAPES, checkpoint_config)


def test_full_size_shapes():
    model = Projector(ProjectorConfig())
    shapes = {name: tuple(p.shape) for name, p in tree_flatten(model.parameters())}
    fake = lambda name: np.zeros(RELEASED_SHAPES[name], np.float32)  # noqa: E731
    converted = {name: v.shape for name, v in mapping.convert(list(RELEASED_SHAPES), fake, {})}
    assert converted == shapes
    out = model(mx.random.normal((1, 256, 3072)))
    assert out.shape == (1, 256, 896)

