"""Config files and flags: unknown keys are named, flags win over the file, required options are enforced."""

import argparse

import pytest

from jobs.cache import CacheConfig
from jobs.options import ConfigError, add_config_arguments, config_from_args


def parse(argv):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, CacheConfig)
    return config_from_args(CacheConfig, parser.parse_args(argv))


def test_file_values_are_defaults_and_flags_win(tmp_path):
    path = tmp_path / "cache.toml"
    path.write_text('run = "runs/x"\ntokens = 5000\nctx_len = 64\n')
    cfg = parse(["--config", str(path), "--tokens", "7000"])
    assert (cfg.run, cfg.tokens, cfg.ctx_len, cfg.batch_size) == ("runs/x", 7000, 64, 8)


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "cache.toml"
    path.write_text('run = "runs/x"\ntoken = 5000\n')
    with pytest.raises(ConfigError, match="unknown key 'token' in .*cache.toml; known keys: batch_size"):
        parse(["--config", str(path)])


def test_missing_required_option_and_unreadable_file(tmp_path):
    with pytest.raises(ConfigError, match="missing required option --run"):
        parse([])
    bad = tmp_path / "bad.toml"
    bad.write_text("run = ")
    with pytest.raises(ConfigError, match="cannot read config file"):
        parse(["--config", str(bad)])


def test_invalid_value_from_the_file_is_validated(tmp_path):
    path = tmp_path / "cache.toml"
    path.write_text('run = "runs/x"\ntokens = -1\n')
    with pytest.raises(ConfigError, match="--tokens must be positive"):
        parse(["--config", str(path)])


def _parsed(cls, argv):
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_config_arguments(parser, cls)
    return config_from_args(cls, parser.parse_args(argv))


def test_repeated_flags_positionals_and_owned_choices():
    from jobs.features import FeaturesConfig
    from jobs.import_sae import ImportConfig
    from jobs.steer import SteerConfig

    steer = _parsed(SteerConfig, ["--run", "r", "--prompt", "p", "--feature", "3", "--feature", "7", "--value", "2x"])
    assert steer.feature == (3, 7) and steer.value == ("2x",) and steer.mode == "clamp"
    assert _parsed(ImportConfig, ["some/folder", "--run", "r"]).path == "some/folder"
    assert _parsed(FeaturesConfig, ["--run", "r", "--sort", "max"]).sort == "max"
    with pytest.raises(argparse.ArgumentError, match="invalid choice: 'size'"):
        _parsed(FeaturesConfig, ["--run", "r", "--sort", "size"])
    with pytest.raises(ConfigError, match="missing required option --feature"):
        _parsed(SteerConfig, ["--run", "r", "--prompt", "p"])
