"""negvision shared core: registry, backbones, data, engine, metrics, pictures, CLI, weights."""

import os as _os

# albumentations otherwise asks the network for a newer version at import time (slow or hanging offline)
_os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
