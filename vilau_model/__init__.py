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

# The vision tower (torch; the tower and its losses also open_clip, ~4 s) loads on first use:
# `import vilau_model` stays free of torch for code that only needs configs (e.g. data-reading processes).
_LAZY_TOWER = {
    "ResidualQuantizer": "vilau_model.quantizer",
    "UnifiedVisionTower": "vilau_model.vision_tower",
    "TowerLossConfig": "vilau_model.losses",
}
__all__ += ["ResidualQuantizer", *_LAZY_TOWER]

# The unified LM, sequence layout / packing and tokenizers (import transformers): also on first use.
_LAZY_LM = {
    **dict.fromkeys(["UnifiedLM", "build_llm"], "vilau_model.unified_lm"),
    "DepthTransformer": "vilau_model.depth_transformer",
    **dict.fromkeys(["generate_images", "generate_video", "generate_text", "ImageGeneration"], "vilau_model.generation"),
    **dict.fromkeys(["SpecialIds", "MARKERS", "train_bpe_tokenizer", "load_tokenizer", "add_markers"], "vilau_model.tokenizer"),
    **dict.fromkeys(
        ["SequenceBuilder", "BuiltSequence", "CaptionSample", "GenerationSample", "VideoSample", "InterleavedSample",
         "ConversationSample", "Turn", "ROW_SCHEMA", "IGNORE_INDEX", "StreamingPacker", "pack_sequences", "pack_call",
         "best_fit_decreasing", "fill_row",
         "pad_to_row", "collate_rows"],
        "vilau_model.sequence",
    ),
}
_LAZY_TOWER.update(_LAZY_LM)
__all__ += [*_LAZY_LM]


def __getattr__(name: str):
    if name in _LAZY_TOWER:
        import importlib

        return getattr(importlib.import_module(_LAZY_TOWER[name]), name)
    raise AttributeError(f"module 'vilau_model' has no attribute {name!r}")
