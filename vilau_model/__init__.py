"""VILA-U in plain PyTorch: the unified vision tower and the unified multimodal LLM.

This package never imports ray, mlflow or orchestration: it can be read, tested and reused alone.
"""

from vilau_model.config import (
    LM_PRESETS,
    TOWER_PRESETS,
    LMConfig,
    VisionTowerConfig,
    get_lm_config,
    get_tower_config,
)

__all__ = [
    "LM_PRESETS",
    "TOWER_PRESETS",
    "LMConfig",
    "VisionTowerConfig",
    "get_lm_config",
    "get_tower_config",
]

# The vision tower. quantizer.py needs only torch; the tower and its losses import open_clip (~4 s),
# so they load on first use: `import vilau_model` stays light for code that only needs configs.
from vilau_model.quantizer import ResidualQuantizer  # noqa: E402

_LAZY_TOWER = {"UnifiedVisionTower": "vilau_model.vision_tower", "TowerLossConfig": "vilau_model.losses"}
__all__ += ["ResidualQuantizer", *_LAZY_TOWER]


def __getattr__(name: str):
    if name in _LAZY_TOWER:
        import importlib

        return getattr(importlib.import_module(_LAZY_TOWER[name]), name)
    raise AttributeError(f"module 'vilau_model' has no attribute {name!r}")
