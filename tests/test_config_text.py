"""The config as text: the effective config `check-config` prints and `relayd init`'s starter."""

from __future__ import annotations

import tomllib
from pathlib import Path

from relayd.config import HttpListen, parse_config
from relayd.config_text import render_effective, starter_config
from tests.test_config import BASE, ENV, FULL, FULL_ENV, WHSEC_A, WHSEC_B, key_paths, minimal


def test_render_effective_never_shows_a_secret_value() -> None:
    """The effective config masks every secret, literal or referenced, and URL passwords."""
    data = tomllib.loads(FULL)
    data["providers"]["ait"]["api_key"] = "literal-value-9"
    config = parse_config(data, base_dir=BASE, env=FULL_ENV)
    text = render_effective(config)
    for value in [*FULL_ENV.values(), WHSEC_A, WHSEC_B, "literal-value-9", "pw-value-3"]:
        assert value not in text
    rendered = tomllib.loads(text)
    assert rendered["relayd"]["api_token"] == "env:TOKEN"
    assert rendered["relayd"]["shared_budget"] == "redis://:********@redis:6379/0"
    assert rendered["providers"]["ait"]["api_key"] == "********"
    assert rendered["endpoints"]["app"]["signing_secret"] == "env:SIGNING"
    assert rendered["providers"]["main"]["rate_window"] == "250ms"
    assert rendered["providers"]["main"]["max_job_age"] == "2h"


def test_render_effective_round_trips() -> None:
    """With secrets given by reference, the effective config parses back to the same config."""
    data = tomllib.loads(FULL)
    data["relayd"]["shared_budget"] = "redis://redis:6379/0"
    config = parse_config(data, base_dir=BASE, env=FULL_ENV)
    again = parse_config(tomllib.loads(render_effective(config)), base_dir=BASE, env=FULL_ENV)
    assert again == config


def test_render_effective_lists_every_key_with_defaults() -> None:
    """A minimal config renders with every key present, defaults included."""
    config = parse_config(minimal(), base_dir=BASE, env=ENV)
    rendered = tomllib.loads(render_effective(config))
    assert len(rendered["relayd"]) == 13
    assert (rendered["relayd"]["retention"], rendered["relayd"]["dead_retention"]) == ("7d", "30d")
    assert len(rendered["providers"]["main"]) == 13
    assert len(rendered["endpoints"]["app"]) == 8
    assert rendered["relayd"]["http"] == "127.0.0.1:8787"
    assert rendered["relayd"]["socket"] == "/run/relayd/relayd.sock"


def test_starter_config_round_trips() -> None:
    """`relayd init` output is commented TOML that parse_config accepts as documented."""
    text = starter_config()
    assert text.count("#") > 20
    config = parse_config(tomllib.loads(text), base_dir=Path("/opt/r"), env={"XOSUM_API_KEY": "k"})
    s = config.settings
    assert (s.state_dir, s.spool_dir, s.socket) == (
        Path("/opt/r/state"),
        Path("/opt/r/spool"),
        Path("/opt/r/relayd.sock"),
    )
    assert s.http == HttpListen("127.0.0.1", 8787)
    main = config.providers["main"]
    assert (main.kind, main.base_url, str(main.api_key)) == (
        "xosum",
        "https://app.xosum.am",
        "env:XOSUM_API_KEY",
    )
    assert config.endpoints["app"].url == "http://127.0.0.1:8080/webhooks/xosum"
    effective = tomllib.loads(render_effective(config))
    assert key_paths(tomllib.loads(text)) == key_paths(effective)
