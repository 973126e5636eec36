"""Typed JSON configs: every shipped config loads, bad keys and values are named, overrides are checked."""
import json

import pytest

from cropformer.config import CONFIG_DIR, ConfigError, from_dict, load_config, to_dict


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.json")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_round_trips(path):
    cfg = load_config(str(path))
    assert from_dict(to_dict(cfg)) == cfg


def test_released_values_are_the_originals():
    cfg = load_config("cropformer_swin_tiny_3x")
    assert cfg.model.decoder.dec_layers == 10 and cfg.model.decoder.num_queries == 100
    assert cfg.model.pixel_decoder.num_layers == 6 and cfg.model.pixel_decoder.ffn_dim == 1024
    assert (cfg.loss.class_weight, cfg.loss.mask_weight, cfg.loss.dice_weight) == (2.0, 5.0, 5.0)
    assert cfg.loss.num_points == 12544 and cfg.loss.image_level_scale == 0.5
    assert cfg.solver.clip_value == 0.01 and cfg.solver.schedule == "poly" and cfg.solver.max_iter == 34375
    assert cfg.input.crop_ratio == 0.7 and cfg.input.min_size_test == 800
    assert load_config("mask2former_swin_tiny_3x").loss.image_level_scale == 1.0
    assert load_config("swin_t_1x.json").solver.schedule == "step"


def test_unknown_key_names_key_and_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"solver": {"base_lrr": 0.1}}))
    with pytest.raises(ConfigError, match=r"bad\.json.*solver.*'base_lrr'.*base_lr"):
        load_config(str(bad))


def test_wrong_type_and_bad_json(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model": {"decoder": {"num_queries": "many"}}}))
    with pytest.raises(ConfigError, match="num_queries: expected an integer"):
        load_config(str(bad))
    bad.write_text('{\n  "solver": {"max_iter": 10,}\n}')  # a trailing comma: the "}" at line 2, column 29
    with pytest.raises(ConfigError, match=rf"^{bad}:2:29: invalid JSON: Expecting property name"):
        load_config(str(bad))
    bad.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(ConfigError, match=rf"^{bad}: not a JSON config \(not UTF-8 text\)"):
        load_config(str(bad))


def test_set_overrides_are_type_checked():
    cfg = load_config("tiny", ["solver.max_iter=7", "model.backbone.swin.depths=[1,1,1,1]", "test.score_mode=original"])
    assert cfg.solver.max_iter == 7 and cfg.model.backbone.swin.depths == (1, 1, 1, 1)
    with pytest.raises(ConfigError, match="unknown key 'solver.maxiter'"):
        load_config("tiny", ["solver.maxiter=7"])
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config("tiny", ["solver.max_iter=1.5"])
    with pytest.raises(ConfigError, match="not one of"):
        load_config("tiny", ["solver.schedule=cosine"])


def test_missing_config_lists_known_names():
    with pytest.raises(ConfigError, match="swin_t_1x.json"):
        load_config("no_such_config")
