"""Profiles, overrides, validation and --ratios parsing."""

from __future__ import annotations

from pathlib import Path

import pytest

from ftwt_cli.errors import BadInput
from ftwt_cli.io import config as config_mod
from ftwt_cli.io.config import DEFAULT_PROFILE, PROFILE_DIR, Config, list_profiles, load_profile, parse_ratios, resolve
from ftwt_cli.models import REGISTRY

SHIPPED = {
    "quickstart": "smallnet",
    "smoke": "smallnet",
    "vgg16_bn-cifar10": "vgg16_bn",
    "resnet56-cifar10": "resnet56",
    "mobilenetv1-cifar10": "mobilenetv1",
    "resnet18-imagenet": "resnet18",
    "resnet34-imagenet": "resnet34",
    "mobilenetv2-imagenet": "mobilenet_v2",
}


def test_every_shipped_profile_loads_and_validates():
    listed = dict(list_profiles())
    assert set(SHIPPED) <= set(listed)
    assert DEFAULT_PROFILE == "quickstart"
    for name, model in SHIPPED.items():
        cfg = resolve(name)  # loads and validates
        assert cfg.profile == name and cfg.model == model and cfg.model in REGISTRY
        assert listed[name] and not listed[name].startswith("(invalid")
        assert parse_ratios(cfg.ratios)
    for name in listed:
        config_mod.validate(load_profile(name))


def test_profile_tables_are_flattened():
    cfg = load_profile("smoke")
    assert (cfg.samples, cfg.batch_size, cfg.ratios) == (256, 64, "0.80:1.00:0.05")
    assert cfg.dense_epochs == 1 and cfg.epochs == 1 and cfg.dense_milestones == [1]  # [dense] and [dynamic]


def test_profile_checkpoint_is_relative_to_the_profiles_folder():
    cfg = load_profile("quickstart")
    assert cfg.checkpoint is not None and Path(cfg.checkpoint).is_absolute()
    assert Path(cfg.checkpoint) == (PROFILE_DIR / "checkpoints" / "quickstart-dense.pt").resolve()


def test_overrides_win_and_none_keeps_the_profile_value():
    cfg = resolve("smoke", batch_size=7, model="resnet20", samples=None, seed=5)
    assert (cfg.batch_size, cfg.model, cfg.samples, cfg.seed) == (7, "resnet20", 256, 5)
    assert resolve(None).profile == DEFAULT_PROFILE
    with pytest.raises(ValueError, match="unknown config fields"):
        Config().override(no_such_field=1)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"r": 0.0}, "r must be in"),
        ({"r": 1.5}, "r must be in"),
        ({"batch_size": 0}, "batch-size"),
        ({"samples": -1}, "samples"),
        ({"mode": "both"}, "mode"),
        ({"target": "uniform"}, "target"),
        ({"device": "tpu"}, "device"),
        ({"ratios": "0.5:1.2:0.1"}, "r must be in"),
    ],
)
def test_invalid_overrides_are_bad_input(override, message):
    with pytest.raises(BadInput, match=message):
        resolve("smoke", **override)


def test_unknown_profile_names_the_available_ones():
    with pytest.raises(BadInput, match="unknown profile 'nope'.*smoke"):
        load_profile("nope")


def test_unknown_field_and_bad_toml_in_a_profile_are_bad_input(tmp_path, monkeypatch):
    monkeypatch.setattr(config_mod, "PROFILE_DIR", tmp_path)
    (tmp_path / "typo.toml").write_text('model = "smallnet"\nbatch_sise = 64\n')
    (tmp_path / "typo_table.toml").write_text('[dense]\nepocs = 3\n')
    (tmp_path / "broken.toml").write_text('model = "smallnet\n')
    (tmp_path / "good.toml").write_text('description = "ok"\n[dense]\nepochs = 3\n')
    with pytest.raises(BadInput, match="unknown fields: batch_sise"):
        load_profile("typo")
    with pytest.raises(BadInput, match="unknown fields: dense_epocs"):
        load_profile("typo_table")
    with pytest.raises(BadInput, match="not valid TOML"):
        load_profile("broken")
    assert load_profile("good").dense_epochs == 3
    listed = dict(list_profiles())
    assert listed["good"] == "ok" and listed["typo"].startswith("(invalid")


def test_parse_ratios_comma_list():
    assert parse_ratios("0.9,0.95") == [0.9, 0.95]
    assert parse_ratios(" 0.95, 0.9,0.9 ,") == [0.9, 0.95]  # sorted, deduplicated
    assert parse_ratios("1") == [1.0]


def test_parse_ratios_inclusive_range_survives_float_rounding():
    values = parse_ratios("0.8:1.0:0.01")
    assert len(values) == 21
    assert values[0] == 0.8 and values[-1] == 1.0
    assert 0.81 in values and 0.99 in values and 0.3 not in values  # exact decimals, not 0.8100000000000001
    assert parse_ratios("0.80:1.00:0.05") == [0.8, 0.85, 0.9, 0.95, 1.0]
    assert len(parse_ratios("0.1:0.7:0.1")) == 7  # (0.7 - 0.1) / 0.1 = 5.999…
    assert parse_ratios("0.5:0.5:0.1") == [0.5]
    assert len(parse_ratios("0.002:1:0.002")) == 500


@pytest.mark.parametrize(
    "text", ["0:1:0.1", "1.1", "0.9,1.01", "-0.5", "a,b", "0.9:0.8:0.01", "0.8:1.0:0", "0.8:1.0", "", ",", "nan"]
)
def test_parse_ratios_rejects_bad_input(text):
    with pytest.raises(BadInput):
        parse_ratios(text)
