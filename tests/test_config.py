"""The typed configuration: presets load, overrides apply, bad values fail naming the field."""

import pytest
import yaml

from orchestration.config import REDACTED, ConfigError, build_config, config_to_yaml, flatten_config, load_config


def test_tiny_preset_loads_and_overrides_apply():
    config = load_config(None, ["tower_train.optim.lr=0.01", "cluster.num_workers=3", "tune.w_recon.low=0.1"])
    assert config.model.tower == "tiny"
    assert config.tower_train.optim.lr == 0.01
    assert config.cluster.num_workers == 3
    # A partial override of a section the file leaves out keeps the other defaults.
    assert (config.tune.w_recon.low, config.tune.w_recon.high) == (0.1, 2.0)
    assert load_config("tiny").run_name == "tiny"


def test_resolved_config_round_trips_through_yaml():
    config = load_config(None, ["data.seq_len=512"])
    again = build_config(yaml.safe_load(config_to_yaml(config)))
    assert again == config


def test_secrets_never_reach_the_dump():
    config = load_config(None, ["data.s3.access_key_id=AKIAEXAMPLEKEY", "data.s3.secret_access_key=s3cr3t-value"])
    assert config.data.s3.secret_access_key.get_secret_value() == "s3cr3t-value"
    dumped = config_to_yaml(config)
    params = flatten_config(config)
    for text in (dumped, repr(config), str(params)):
        assert "s3cr3t-value" not in text and "AKIAEXAMPLEKEY" not in text
    assert params["data.s3.secret_access_key"] == REDACTED


BAD_CONFIGS = [
    ("tower_train.optim.lr=-1", "tower_train.optim.lr"),
    ("cluster.num_workers=0", "cluster.num_workers"),
    ("tower_train.w_contra=-0.5", "tower_train.w_contra"),
    ("model.codebook_size=0", "model.codebook_size"),
    ("model.codebook_size=1.5", "model.codebook_size"),
    ("model.tower=huge", "model.tower"),
    ("data.bogus_key=1", "data.bogus_key"),
    ("tower_train.steps=abc", "tower_train.steps"),
    ("data.synthetic.corrupt_fraction=1.5", "data.synthetic.corrupt_fraction"),
    ("tune.w_recon.low=5", "tune.w_recon"),
    ("tracking.enabled=maybe", "tracking.enabled"),
    ("lm_train.caption_dropout=2", "lm_train.caption_dropout"),
    ("tower_train.contrastive=cosine", "tower_train.contrastive"),
    ("run_name=a/b", "run_name"),
]


@pytest.mark.parametrize("override,field", BAD_CONFIGS, ids=[f for _, f in BAD_CONFIGS])
def test_bad_config_fails_naming_the_field(override, field):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    message = str(info.value)
    assert field in message
    assert override.split("=", 1)[1] in message  # the bad value is shown too


def test_unknown_section_and_malformed_override():
    with pytest.raises(ConfigError, match="nonsense: unknown key"):
        build_config({"nonsense": {"a": 1}})
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, ["tower_train.steps"])
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config("/nonexistent/config.yaml")


def test_an_unknown_mix_by_is_refused_naming_the_field():
    with pytest.raises(ConfigError, match="data.mix_by"):
        load_config(None, ["data.mix_by=records"])


def test_zero_source_weights_are_refused():
    with pytest.raises(ConfigError, match="tower_sources"):
        load_config(None, ["data.tower_sources.coyo_parquet.weight=0", "data.tower_sources.coyo_webdataset.weight=0"])


def test_an_imported_towers_text_tokenizer_is_kept_unless_the_run_names_one(tmp_path):
    """One mapping from the config to the tower (data pipeline and trainer alike): with model.init_from
    the export's tokenizer stays unless model.tower_text_tokenizer names another."""
    import dataclasses
    import json

    from orchestration.data.tower_data import tower_config
    from vilau_model.config import get_tower_config

    saved = dataclasses.replace(get_tower_config("tiny"), tokenizer_path="/exports/release/tokenizer")
    (tmp_path / "tower.json").write_text(json.dumps({"tower_config": dataclasses.asdict(saved), "loss_config": {}}))
    kept = tower_config(load_config(None, [f"model.init_from={tmp_path}", "model.allow_random_init=true"]))
    assert kept.tokenizer_path == "/exports/release/tokenizer"
    named = tower_config(load_config(None, [f"model.init_from={tmp_path}", "model.tower_text_tokenizer=/mine",
                                            "model.allow_random_init=true"]))
    assert named.tokenizer_path == "/mine"
