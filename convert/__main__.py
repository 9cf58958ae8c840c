"""``python -m mobileo_mlx.convert CHECKPOINT``: the converter (also ``mobileo-mlx convert``)."""

import sys

from mobileo_mlx.convert.from_torch import main

sys.exit(main(prog="python -m mobileo_mlx.convert"))
