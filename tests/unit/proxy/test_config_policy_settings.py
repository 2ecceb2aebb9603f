"""``policy:`` (how the visibility policy follows the server's roles): its one setting, its default and
its errors, which name the dotted path."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import PolicySettings, parse_config
from proxy.errors import ConfigError


def test_default_and_value() -> None:
    assert parse_config({}, base_dir=Path.cwd(), environ={}).policy_settings == PolicySettings(30.0)
    cfg = parse_config({"policy": {"membership_refresh_seconds": 0}}, base_dir=Path.cwd(), environ={})
    assert cfg.policy_settings.membership_refresh_seconds == 0.0


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ({"policy": {"membership_refresh_seconds": -1}}, "policy.membership_refresh_seconds"),
        ({"policy": {"membership_refresh_seconds": "soon"}}, "policy.membership_refresh_seconds"),
        ({"policy": {"refresh": 5}}, "policy.refresh"),
        ({"policy": 5}, "policy"),
    ],
)
def test_errors_name_the_dotted_path(data: dict[str, object], path: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(data, base_dir=Path.cwd(), environ={})
    assert any(line.startswith(f"{path}:") for line in e.value.errors), e.value.errors
