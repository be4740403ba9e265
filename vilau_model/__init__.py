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
