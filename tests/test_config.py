from __future__ import annotations

from pathlib import Path

import pytest

from raiox_cli import config
from raiox_cli.errors import UsageError


def test_option_beats_env_beats_default(tmp_path: Path) -> None:
    env = {"RAIOX_HOME": str(tmp_path), "RAIOX_MODEL": "ViT-L-14", "RAIOX_BATCH_SIZE": "8"}
    assert config.resolve(env=env).model == "ViT-L-14"
    assert config.resolve(env=env, model="ViT-B-16").model == "ViT-B-16"
    assert config.resolve(env=env).batch_size == 8
    assert config.resolve(env={"RAIOX_HOME": str(tmp_path)}).model == config.DEFAULT_MODEL
    assert config.resolve(env={"RAIOX_HOME": str(tmp_path)}).database_url is None


def test_home_defaults_to_platform_dir() -> None:
    assert "raiox" in str(config.resolve(env={}).home)


def test_bad_values_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="RAIOX_BATCH_SIZE"):
        config.resolve(env={"RAIOX_HOME": str(tmp_path), "RAIOX_BATCH_SIZE": "lots"})
    with pytest.raises(UsageError, match="device"):
        config.resolve(env={"RAIOX_HOME": str(tmp_path)}, device="tpu")
