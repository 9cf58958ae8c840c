"""mobileo-mlx: Mobile-O (understanding, chat, text-to-image, editing) in pure MLX.

>>> import mobileo_mlx
>>> model = mobileo_mlx.load("demo")          # or a hub id / checkpoint / converted folder
>>> image = model.generate("a cat on a sofa")

Importing this package first routes MLX's CPU BLAS to OpenBLAS on Linux (see
``mobileo_mlx/_blas.py``); that has to happen before ``mlx.core`` loads, and it does for
every ``mobileo_mlx.…`` import, since Python imports the package before its modules.
"""

from ._blas import route_blas as _route_blas

_route_blas()

from ._version import __version__  # noqa: E402


def load(model: str | None = None, **kwargs):
    """Load a model: a converted folder, an original checkpoint, a hub id or ``"demo"``
    (default: :data:`DEFAULT_MODEL`).

    Original checkpoints and hub ids are converted once into the cache
    (``~/.cache/mobileo-mlx``, or ``$MOBILEO_MLX_CACHE``) and reused.
    """
    from .hub import DEFAULT_MODEL
    from .pipeline import MobileO

    return MobileO.load(DEFAULT_MODEL if model is None else model, **kwargs)


def __getattr__(name: str):
    # DEFAULT_MODEL belongs to the hub module, which loads MLX: imported on first use only.
    if name == "DEFAULT_MODEL":
        from .hub import DEFAULT_MODEL

        return DEFAULT_MODEL
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["load", "DEFAULT_MODEL", "__version__"]
