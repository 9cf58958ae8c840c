"""mobileo-mlx: Mobile-O (understanding, chat, text-to-image, editing) in pure MLX.

>>> import mobileo_mlx
>>> model = mobileo_mlx.load("demo")          # or a hub id / checkpoint / converted folder
>>> image = model.generate("a cat on a sofa")

Importing this package first routes MLX's CPU BLAS to OpenBLAS on Linux (see
``mobileo_mlx/_blas.py``); that has to happen before ``mlx.core`` loads.
"""

from ._blas import route_blas as _route_blas

_route_blas()

__version__ = "0.1.0"

DEFAULT_MODEL = "Amshaker/Mobile-O-0.5B"


def load(model: str = DEFAULT_MODEL, **kwargs):
    """Load a model: a converted folder, an original checkpoint, a hub id or ``"demo"``.

    Original checkpoints and hub ids are converted once into the cache
    (``~/.cache/mobileo-mlx``, or ``$MOBILEO_MLX_CACHE``) and reused.
    """
    from .pipeline import MobileO

    return MobileO.load(model, **kwargs)


__all__ = ["load", "DEFAULT_MODEL", "__version__"]
