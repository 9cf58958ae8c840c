"""One file per Mobile-O component. ``MODELS`` maps the runtime component name
(the converted folder's config section and safetensors file) to its module,
model class and config class."""

from __future__ import annotations

import importlib

MODELS = {
    "vision": ("fastvit", "FastViTHD", "FastViTConfig"),
    "projector": ("projector", "Projector", "ProjectorConfig"),
    "language": ("language", "LanguageModel", "LanguageConfig"),
    "mcp": ("mcp", "MobileConditioningProjector", "MCPConfig"),
    "dit": ("sana", "SanaTransformer", "SanaConfig"),
    "vae": ("dcae", "DCAEDecoder", "DCAEDecoderConfig"),
}


def build(component: str, config: dict):
    """Instantiate a component's MLX module from its config section."""
    module_name, model_name, config_name = MODELS[component]
    module = importlib.import_module(f"{__name__}.{module_name}")
    config_cls = getattr(module, config_name)
    return getattr(module, model_name)(config_cls.from_dict(config))
