"""Tests for relayd.config: strict TOML parsing, secrets, rendering and the starter config."""

from __future__ import annotations

import dataclasses
import logging
import math
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relayd.config import (
    Config,
    HttpListen,
    Secret,
    format_duration,
    load_config,
    parse_config,
    parse_duration,
    resolve_config_path,
)
from relayd.config_text import render_effective, starter_config
from relayd.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
BASE = Path("/etc/relayd")
ENV = {"XOSUM_API_KEY": "key-value-1", "XOSUM_WEBHOOK_SECRET": "hook-value-2"}
WHSEC_A = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
WHSEC_B = "whsec_c2Vjb25kLXNlY3JldC1rZXk="

FULL = """
[relayd]
state_dir = "/srv/state"
spool_dir = "spool"
socket = "/run/r.sock"
http = "[::1]:9000"
api_token = "env:TOKEN"
shared_budget = "redis://:pw-value-3@redis:6379/0"
retention = "36h"
dead_retention = "0"
default_provider = "main"
log_level = "debug"
log_format = "json"

[providers.main]
kind = "xosum"
base_url = "https://app.xosum.am/"
api_key = "env:XOSUM_API_KEY"
rate_limit = 30
rate_window = "250ms"
poll_interval = 0.05
max_job_age = "2h"
webhook_secret = "env:XOSUM_WEBHOOK_SECRET"
link_template = "https://app.xosum.am/doc/{docId}"
endpoints = ["app", "audit"]
timeout = "5s"
auth_header = "X-API-Key"

[providers.ait]
kind = "aitronos"
base_url = "https://api.aitronos.example"
api_key = "env:XOSUM_API_KEY"
endpoints = ["audit"]

[endpoints.app]
url = "http://127.0.0.1:8080/webhooks/xosum"
timeout = "2s"
events = ["transcript_ready", "transcript_failed"]
signing_secret = "env:SIGNING"
max_attempts = 3
retry_initial = "100ms"
retry_max = "1m"
max_in_flight = 2

[endpoints.audit]
url = "https://audit.internal/hook"
"""
FULL_ENV = {**ENV, "TOKEN": "token-value-4", "SIGNING": f"{WHSEC_A} {WHSEC_B}"}


def minimal() -> dict[str, Any]:
    return {
        "providers": {
            "main": {
                "kind": "xosum",
                "base_url": "https://app.xosum.am",
                "api_key": "env:XOSUM_API_KEY",
                "endpoints": ["app"],
            }
        },
        "endpoints": {"app": {"url": "http://127.0.0.1:8080/hook"}},
    }


def with_key(table: str, key: str, value: object) -> dict[str, Any]:
    """The minimal config with `key` set in the dotted `table` ("relayd", "providers.main"...)."""
    data = minimal()
    node = data
    for part in table.split("."):
        node = node.setdefault(part, {})
    node[key] = value
    return data


def problems_of(data: dict[str, Any], env: dict[str, str] = ENV, base: Path = BASE) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, base_dir=base, env=env)
    return caught.value.problems


def test_full_config_parses_every_key() -> None:
    """Every key of a full config lands in the dataclasses, converted and normalised."""
    config = parse_config(tomllib.loads(FULL), base_dir=BASE, env=FULL_ENV)
    s = config.settings
    assert (s.state_dir, s.spool_dir, s.socket) == (
        Path("/srv/state"),
        BASE / "spool",
        Path("/run/r.sock"),
    )
    assert s.http == HttpListen("::1", 9000)
    assert s.api_token == Secret("env:TOKEN", "token-value-4")
    assert s.shared_budget == "redis://:pw-value-3@redis:6379/0"
    assert (s.retention, s.dead_retention) == (36 * 3600.0, 0.0)  # 0: kept forever
    assert (s.default_provider, s.log_level, s.log_format) == ("main", "debug", "json")
    main = config.providers["main"]
    assert main.base_url == "https://app.xosum.am"
    assert main.api_key.value == "key-value-1"
    assert (main.rate_limit, main.rate_window, main.poll_interval) == (30, 0.25, 0.05)
    assert (main.max_job_age, main.timeout, main.auth_header) == (7200.0, 5.0, "X-API-Key")
    assert main.webhook_secret == Secret("env:XOSUM_WEBHOOK_SECRET", "hook-value-2")
    assert main.endpoints == ("app", "audit")
    assert list(config.providers) == ["main", "ait"]
    app = config.endpoints["app"]
    assert app.events == ("transcript_ready", "transcript_failed")
    assert [x.value for x in app.signing_secrets] == [WHSEC_A, WHSEC_B]
    assert (app.max_attempts, app.retry_initial, app.retry_max, app.max_in_flight) == (
        3,
        0.1,
        60.0,
        2,
    )
    assert app.timeout == 2.0


def test_defaults_fill_every_optional_key() -> None:
    """A minimal config gets the documented defaults."""
    config = parse_config(minimal(), base_dir=BASE, env=ENV)
    s = config.settings
    assert s.state_dir == Path("/var/lib/relayd")
    assert s.spool_dir == Path("/var/spool/relayd")
    assert s.socket == Path("/run/relayd/relayd.sock")
    assert s.http == HttpListen("127.0.0.1", 8787)
    assert (s.api_token, s.shared_budget, s.default_provider) == (None, "", "")
    assert (s.log_level, s.log_format) == ("info", "text")
    p = config.providers["main"]
    assert (p.rate_limit, p.rate_window, p.poll_interval, p.max_job_age) == (60, 60, 7, 86400)
    assert (p.webhook_secret, p.link_template, p.timeout) == (None, "", 30.0)
    assert p.auth_header == "Authorization: Bearer"
    assert p.adaptive_polling is True
    e = config.endpoints["app"]
    assert e.timeout == 10.0
    assert e.events == ("transcript_ready", "transcription.completed")
    assert e.signing_secrets == ()
    assert (e.max_attempts, e.retry_initial, e.retry_max, e.max_in_flight) == (15, 1, 600, 8)
    assert config.path is None


def test_config_is_immutable() -> None:
    """The parsed config cannot be changed in place, tables included."""
    config = parse_config(minimal(), base_dir=BASE, env=ENV)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.settings.log_level = "debug"  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.providers["x"] = config.providers["main"]  # type: ignore[index]


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (7, 7.0),
        (0.25, 0.25),
        ("500ms", 0.5),
        ("7s", 7.0),
        ("1.5m", 90.0),
        ("24h", 86400.0),
        ("0.05s", 0.05),
        (".5s", 0.5),
        ("1ms", 0.001),
        (" 10s ", 10.0),
    ],
)
def test_parse_duration_accepts(value: object, seconds: float) -> None:
    """Numbers are seconds; strings carry a unit ms, s, m or h; sub-second values work."""
    assert math.isclose(parse_duration(value), seconds)


@pytest.mark.parametrize(
    "value",
    [0, -1, 0.0, True, "7", "7x", "", "-1s", "0ms", "1 d", "s", None, [1], math.inf, math.nan],
)
def test_parse_duration_refuses(value: object) -> None:
    """Zero, negatives, booleans, unitless or unknown-unit strings are refused."""
    with pytest.raises(ValueError):
        parse_duration(value)


@settings(derandomize=True)
@given(st.floats(min_value=0.001, max_value=1e7, allow_nan=False))
def test_formatted_durations_parse_back(seconds: float) -> None:
    """A rendered duration string reads back as the same number of seconds."""
    assert math.isclose(parse_duration(format_duration(seconds)), seconds, rel_tol=1e-9)


@pytest.mark.parametrize(
    ("seconds", "text"), [(7, "7s"), (0.5, "500ms"), (86400, "24h"), (90, "90s"), (60, "1m")]
)
def test_format_duration_picks_the_largest_whole_unit(seconds: float, text: str) -> None:
    """Rendered durations read like the config: "7s", "500ms", "24h"."""
    assert format_duration(seconds) == text


def test_bad_duration_names_the_key() -> None:
    """A bad duration is reported under its TOML path."""
    found = problems_of(with_key("providers.main", "poll_interval", "7 seconds"))
    assert len(found) == 1
    assert found[0].startswith("providers.main.poll_interval: invalid duration")


def test_env_secret_resolves_and_keeps_its_reference() -> None:
    """env:NAME reads the variable; the reference is what str() shows."""
    config = parse_config(minimal(), base_dir=BASE, env=ENV)
    key = config.providers["main"].api_key
    assert key.value == "key-value-1"
    assert str(key) == "env:XOSUM_API_KEY"
    assert "key-value-1" not in repr(key)


def test_missing_env_var_names_key_and_variable() -> None:
    """A missing variable is a problem naming the key and the variable, not a crash."""
    (problem,) = problems_of(minimal(), env={})
    assert problem == "providers.main.api_key: environment variable XOSUM_API_KEY is not set"


def test_file_secret_is_read_relative_to_the_config_folder(tmp_path: Path) -> None:
    """file: reads the file (trailing newline stripped), relative paths from the config folder."""
    (tmp_path / "key").write_text("file-value-5\n")
    (tmp_path / "abs").write_text("file-value-6\r\n")
    data = with_key("providers.main", "api_key", "file:key")
    data["providers"]["main"]["webhook_secret"] = f"file:{tmp_path / 'abs'}"
    provider = parse_config(data, base_dir=tmp_path, env={}).providers["main"]
    assert provider.api_key == Secret("file:key", "file-value-5")
    assert provider.webhook_secret is not None
    assert provider.webhook_secret.value == "file-value-6"


def test_unreadable_file_secret_is_a_problem(tmp_path: Path) -> None:
    """A missing secret file is reported under the key."""
    (problem,) = problems_of(with_key("providers.main", "api_key", "file:nope"), base=tmp_path)
    assert problem.startswith("providers.main.api_key: cannot read secret file")


def test_credential_secret_reads_the_credentials_directory(tmp_path: Path) -> None:
    """credential:NAME reads $CREDENTIALS_DIRECTORY/NAME, as systemd LoadCredential= provides."""
    (tmp_path / "xosum.key").write_text("cred-value-7\n")
    data = with_key("providers.main", "api_key", "credential:xosum.key")
    config = parse_config(data, base_dir=BASE, env={"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert config.providers["main"].api_key == Secret("credential:xosum.key", "cred-value-7")


@pytest.mark.parametrize(
    ("reference", "env", "fragment"),
    [
        ("credential:xosum.key", {}, "needs $CREDENTIALS_DIRECTORY"),
        ("credential:other", None, "cannot read secret file"),
        ("credential:../x", None, "invalid credential name"),
    ],
)
def test_credential_problems(
    tmp_path: Path, reference: str, env: dict[str, str] | None, fragment: str
) -> None:
    """No credentials directory, a missing credential, or a path-like name are refused."""
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path)} if env is None else env
    (problem,) = problems_of(with_key("providers.main", "api_key", reference), env=env)
    assert problem.startswith("providers.main.api_key: ")
    assert fragment in problem


def test_literal_secret_is_accepted_with_a_warning_without_the_value(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A literal secret works, but a warning names the key and never the value."""
    data = with_key("relayd", "api_token", "literal-value-8")
    with caplog.at_level(logging.WARNING, logger="relayd.config"):
        config = parse_config(data, base_dir=BASE, env=ENV)
    assert config.settings.api_token == Secret("<literal>", "literal-value-8")
    assert str(config.settings.api_token) == "********"
    assert "relayd.api_token" in caplog.text
    assert "literal-value-8" not in caplog.text
    assert "literal-value-8" not in repr(config)


def test_empty_optional_secrets_are_none_but_api_key_is_required() -> None:
    """An empty api_token or webhook_secret means none; an empty or missing api_key is refused."""
    data = with_key("relayd", "api_token", "")
    data["providers"]["main"]["webhook_secret"] = ""
    config = parse_config(data, base_dir=BASE, env=ENV)
    assert config.settings.api_token is None
    assert config.providers["main"].webhook_secret is None
    assert problems_of(with_key("providers.main", "api_key", "")) == [
        "providers.main.api_key: must not be empty"
    ]
    data = minimal()
    del data["providers"]["main"]["api_key"]
    assert problems_of(data) == ["providers.main.api_key: missing (required)"]


def test_env_var_with_empty_value_is_refused() -> None:
    """A reference that resolves to nothing is a problem, not an empty key."""
    assert problems_of(minimal(), env={"XOSUM_API_KEY": ""}) == [
        "providers.main.api_key: env:XOSUM_API_KEY is empty"
    ]


def test_signing_secrets_split_for_rotation() -> None:
    """signing_secret holds one or more whsec_ secrets; a reference is resolved, then split."""
    data = with_key("endpoints.app", "signing_secret", f"{WHSEC_A}  {WHSEC_B}")
    secrets = parse_config(data, base_dir=BASE, env=ENV).endpoints["app"].signing_secrets
    assert [s.value for s in secrets] == [WHSEC_A, WHSEC_B]
    data = with_key("endpoints.app", "signing_secret", "env:SIGN")
    config = parse_config(data, base_dir=BASE, env={**ENV, "SIGN": f"{WHSEC_B}\n"})
    assert config.endpoints["app"].signing_secrets == (Secret("env:SIGN", WHSEC_B),)


@pytest.mark.parametrize("value", ["not-a-secret", "whsec_", "whsec_!!!", f"{WHSEC_A} nope"])
def test_bad_signing_secret_is_refused_without_echoing_it(value: str) -> None:
    """Each signing secret must be whsec_ + base64; the problem never shows the secret."""
    (problem,) = problems_of(with_key("endpoints.app", "signing_secret", value))
    assert problem.startswith("endpoints.app.signing_secret: ")
    for shown in ("not-a-secret", "!!!", WHSEC_A, "nope"):
        assert shown not in problem


def test_unknown_keys_are_refused_at_every_level() -> None:
    """Unknown keys at the top, in [relayd], in a provider and in an endpoint are all named."""
    data = minimal()
    data["relayds"] = {}
    data["relayd"] = {"log_levl": "info"}
    data["providers"]["main"]["rate_limt"] = 5
    data["endpoints"]["app"]["secret"] = "x"
    found = problems_of(data)
    assert found == [
        "relayds: unknown key (did you mean 'relayd'?)",
        "relayd.log_levl: unknown key (did you mean 'log_level'?)",
        "endpoints.app.secret: unknown key (did you mean 'signing_secret'?)",
        "providers.main.rate_limt: unknown key (did you mean 'rate_limit'?)",
    ]


@pytest.mark.parametrize(
    ("table", "key", "value", "problem"),
    [
        ("endpoints.app", "max_attempts", "3", "expected an integer, got str"),
        ("providers.main", "rate_limit", True, "expected an integer, got bool"),
        ("providers.main", "rate_limit", 0, "must be >= 1, got 0"),
        ("endpoints.app", "max_in_flight", 1.5, "expected an integer, got float"),
        ("providers.main", "endpoints", "app", "expected an array of strings, got str"),
        ("providers.main", "endpoints", [], "must not be empty"),
        ("endpoints.app", "events", ["transcript_ready", 3], "item 1 is int"),
        ("providers.main", "kind", "whisper", "expected one of xosum | aitronos"),
        ("relayd", "log_level", "verbose", "expected one of debug | info | warning | error"),
        ("relayd", "log_format", 1, "expected a string, got int"),
        ("relayd", "state_dir", "", "must not be empty"),
        ("relayd", "socket", False, "expected a string, got bool"),
        ("providers.main", "link_template", 5, "expected a string, got int"),
        ("providers.main", "api_key", 12345, "expected a string, got int"),
        ("providers.main", "auth_header", "Bad Header: x y", "expected"),
        ("providers.main", "adaptive_polling", "no", "expected true or false, got str"),
        ("endpoints.app", "events", ["transcript_done"], "unknown event 'transcript_done'"),
        ("endpoints.app", "timeout", "0s", "duration must be > 0"),
    ],
)
def test_wrong_types_and_values_are_named(
    table: str, key: str, value: object, problem: str
) -> None:
    """A wrong type or value is one problem naming the key and what was expected."""
    (found,) = problems_of(with_key(table, key, value))
    assert found.startswith(f"{table}.{key}: ")
    assert problem in found


def test_a_table_that_is_not_a_table_is_refused() -> None:
    """`relayd = 5` or a provider given as a string is named with its path."""
    data = minimal()
    data["relayd"] = 5
    data["endpoints"]["extra"] = "http://x"
    assert problems_of(data) == [
        "relayd: expected a table, got int",
        "endpoints.extra: expected a table, got str",
    ]


@pytest.mark.parametrize(
    "url",
    ["ftp://host/x", "http://", "not a url", "example.com/hook", "http://host:99999/", "", 7],
)
def test_bad_endpoint_url_is_refused(url: object) -> None:
    """Endpoint URLs must be http/https with a host."""
    (problem,) = problems_of(with_key("endpoints.app", "url", url))
    assert problem.startswith("endpoints.app.url: ")


def test_bad_base_url_is_refused() -> None:
    """Provider base URLs follow the same URL rule."""
    (problem,) = problems_of(with_key("providers.main", "base_url", "file:///etc/passwd"))
    assert problem == (
        "providers.main.base_url: expected an http:// or https:// URL, got scheme 'file'"
    )


def test_aitronos_base_url_defaults_to_the_documented_root() -> None:
    """kind = "aitronos" without base_url polls https://api.aitronos.com; Xosum has no such
    default (its document names none) and still needs one."""
    data = minimal()
    data["providers"]["main"]["kind"] = "aitronos"
    del data["providers"]["main"]["base_url"]
    config = parse_config(data, base_dir=BASE, env=ENV)
    assert config.providers["main"].base_url == "https://api.aitronos.com"
    data["providers"]["main"]["kind"] = "xosum"
    assert problems_of(data) == ["providers.main.base_url: missing (required)"]


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("7d", 7 * 86400.0), ("30d", 30 * 86400.0), ("90m", 5400.0), (3600, 3600.0), ("0", 0.0),
     (0, 0.0), ("0s", 0.0), ("0d", 0.0)],
)  # fmt: skip
def test_retention_takes_durations_in_days_and_zero_for_forever(
    value: object, seconds: float
) -> None:
    """retention and dead_retention: a duration (days allowed), or 0 to keep forever."""
    for key in ("retention", "dead_retention"):
        config = parse_config(with_key("relayd", key, value), base_dir=BASE, env=ENV)
        assert getattr(config.settings, key) == seconds


def test_retention_defaults_and_bad_values_name_the_key() -> None:
    """Defaults are 7 and 30 days; a negative or odd value is refused, naming the key."""
    s = parse_config(minimal(), base_dir=BASE, env=ENV).settings
    assert (s.retention, s.dead_retention) == (7 * 86400.0, 30 * 86400.0)
    (problem,) = problems_of(with_key("relayd", "retention", "-1d"))
    assert problem.startswith("relayd.retention: invalid duration '-1d'")
    assert problem.endswith("(or 0 to keep forever)")
    (problem,) = problems_of(with_key("relayd", "dead_retention", "a week"))
    assert problem.startswith("relayd.dead_retention: invalid duration")


def test_unknown_endpoint_name_is_named_with_its_index() -> None:
    """A provider's endpoints must name [endpoints.X] tables."""
    data = with_key("providers.main", "endpoints", ["app", "x"])
    assert problems_of(data) == ["providers.main.endpoints[1]: no endpoint named 'x'"]


def test_required_keys_and_tables() -> None:
    """kind, base_url, endpoints and url are required, and at least one provider."""
    data = minimal()
    data["providers"]["main"] = {"api_key": "env:XOSUM_API_KEY"}
    data["endpoints"]["app"] = {}
    assert sorted(problems_of(data)) == [
        "endpoints.app.url: missing (required)",
        "providers.main.base_url: missing (required)",
        "providers.main.endpoints: missing (required)",
        "providers.main.kind: missing (required)",
    ]
    assert problems_of({}) == ["providers: at least one [providers.NAME] table is required"]


def test_table_names_are_restricted() -> None:
    """Provider and endpoint names are letters, digits, _ and -."""
    data = minimal()
    data["endpoints"]["bad name"] = {"url": "http://x"}
    (problem,) = problems_of(data)
    assert problem.startswith('endpoints."bad name": invalid name')


def test_cross_checks() -> None:
    """default_provider must exist and retry_max must not be below retry_initial."""
    data = with_key("relayd", "default_provider", "other")
    data["endpoints"]["app"].update(retry_initial="5s", retry_max="1s")
    assert problems_of(data) == [
        "endpoints.app.retry_max: must be >= retry_initial (5s)",
        "relayd.default_provider: no provider named 'other'",
    ]


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("", True),
        ("redis://localhost:6379/0", True),
        ("rediss://:pw@cache.internal:6380/1", True),
        ("unix:///run/redis.sock", True),
        ("http://localhost:6379", False),
        ("redis://", False),
        ("localhost:6379", False),
    ],
)
def test_shared_budget_must_be_a_redis_url(value: str, ok: bool) -> None:
    """shared_budget is "" or a redis://, rediss:// or unix:// URL."""
    data = with_key("relayd", "shared_budget", value)
    if ok:
        assert parse_config(data, base_dir=BASE, env=ENV).settings.shared_budget == value
    else:
        (problem,) = problems_of(data)
        assert problem.startswith("relayd.shared_budget: expected")


def test_shared_budget_without_redis_py_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """redis-py is an optional extra: naming a shared budget without it installed is a config
    error that says how to install it (exit 78), not a crash at the first poll."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "redis" else real(name, *a)
    )
    (problem,) = problems_of(with_key("relayd", "shared_budget", "redis://localhost:6379/0"))
    assert problem == (
        "relayd.shared_budget: needs redis-py, the optional extra: pip install 'relayd[redis]'"
    )


@pytest.mark.parametrize(
    ("value", "listen"),
    [
        ("127.0.0.1:8787", HttpListen("127.0.0.1", 8787)),
        ("[::1]:9000", HttpListen("::1", 9000)),
        ("localhost:0", HttpListen("localhost", 0)),
        ("0.0.0.0:65535", HttpListen("0.0.0.0", 65535)),
        ("", None),
    ],
)
def test_http_listen_forms(value: str, listen: HttpListen | None) -> None:
    """http takes host:port or [v6]:port; "" disables it."""
    config = parse_config(with_key("relayd", "http", value), base_dir=BASE, env=ENV)
    assert config.settings.http == listen


@pytest.mark.parametrize("value", ["8787", "host:65536", "::1:80", "[zz]:80", ":80", "host:x"])
def test_bad_http_listen_is_refused(value: str) -> None:
    """A listen address without host, with a bad port or an unbracketed v6 address is refused."""
    (problem,) = problems_of(with_key("relayd", "http", value))
    assert problem.startswith("relayd.http: ")


@pytest.mark.parametrize(
    ("value", "normal"),
    [
        ("Authorization: Bearer", "Authorization: Bearer"),
        ("Authorization:Token", "Authorization: Token"),
        ("Authorization Bearer", "Authorization: Bearer"),
        ("X-API-Key", "X-API-Key"),
        ("X-API-Key:", "X-API-Key"),
    ],
)
def test_auth_header_is_normalised(value: str, normal: str) -> None:
    """auth_header is stored as "Name: Prefix", or just "Name" for a bare key."""
    config = parse_config(with_key("providers.main", "auth_header", value), base_dir=BASE, env=ENV)
    assert config.providers["main"].auth_header == normal


def test_several_problems_are_reported_together() -> None:
    """Every problem is collected; str(error) lists them one per line."""
    data = minimal()
    data["relayd"] = {"log_level": "loud", "http": "nope"}
    data["providers"]["main"].update(rate_limit="x", endpoints=["app", "x"])
    data["endpoints"]["app"]["url"] = "ftp://x"
    with pytest.raises(ConfigError) as caught:
        parse_config(data, base_dir=BASE, env={})
    found = caught.value.problems
    assert len(found) == 6
    assert str(caught.value) == "\n".join(found)
    for path in (
        "relayd.log_level",
        "relayd.http",
        "providers.main.rate_limit",
        "providers.main.endpoints[1]",
        "providers.main.api_key",
        "endpoints.app.url",
    ):
        assert any(p.startswith(f"{path}: ") for p in found), path


def test_config_error_accepts_a_single_message() -> None:
    """ConfigError("…") is a one-problem error, for callers outside the parser."""
    error = ConfigError("relayd.x: bad")
    assert error.problems == ["relayd.x: bad"]
    assert str(error) == "relayd.x: bad"


def test_relative_paths_start_at_the_config_folder(tmp_path: Path) -> None:
    """state_dir, spool_dir and socket are relative to the config file's folder."""
    data = minimal()
    data["relayd"] = {"state_dir": "./state", "spool_dir": "q/spool", "socket": "r.sock"}
    s = parse_config(data, base_dir=tmp_path, env=ENV).settings
    assert (s.state_dir, s.spool_dir, s.socket) == (
        tmp_path / "state",
        tmp_path / "q" / "spool",
        tmp_path / "r.sock",
    )
    data["relayd"] = {"socket": "", "http": ""}
    s = parse_config(data, base_dir=tmp_path, env=ENV).settings
    assert (s.socket, s.http) == (None, None)


def test_load_config_resolves_paths_against_the_file(tmp_path: Path) -> None:
    """load_config reads the file, remembers it, and resolves relative paths beside it."""
    path = tmp_path / "relayd.toml"
    path.write_text(starter_config())
    config = load_config(path, env={"XOSUM_API_KEY": "k"})
    assert config.path == path
    assert config.settings.state_dir == tmp_path / "state"


def test_load_config_names_a_missing_file(tmp_path: Path) -> None:
    """A missing file is a ConfigError naming it."""
    path = tmp_path / "missing.toml"
    with pytest.raises(ConfigError) as caught:
        load_config(path, env=ENV)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("content", [b"[relayd\n", b"a = \xff\n"])
def test_load_config_names_a_file_with_invalid_toml(tmp_path: Path, content: bytes) -> None:
    """Bad TOML (or bad UTF-8) is a ConfigError naming the file."""
    path = tmp_path / "bad.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        load_config(path, env=ENV)
    assert str(caught.value).startswith(f"{path}: invalid TOML")


def key_paths(doc: dict[str, Any]) -> set[str]:
    paths = set()
    for table, body in doc.items():
        for name, keys in body.items() if table != "relayd" else [("", body)]:
            paths |= {f"{table}.{'*.' if name else ''}{key}" for key in keys}
    return paths


def test_example_config_loads_and_names_every_key() -> None:
    """config.example.toml loads with its env vars set and shows every key there is."""
    env = {"XOSUM_API_KEY": "k", "XOSUM_WEBHOOK_SECRET": "w"}
    config = load_config(ROOT / "config.example.toml", env=env)
    effective = tomllib.loads(render_effective(config))
    example = tomllib.loads((ROOT / "config.example.toml").read_text())
    assert key_paths(example) == key_paths(effective)


def test_resolve_config_path_order() -> None:
    """-c wins, then $RELAYD_CONFIG, then /etc/relayd/relayd.toml."""
    env = {"RELAYD_CONFIG": "/env/relayd.toml"}
    assert resolve_config_path("/arg.toml", env) == Path("/arg.toml")
    assert resolve_config_path(None, env) == Path("/env/relayd.toml")
    assert resolve_config_path(None, {}) == Path("/etc/relayd/relayd.toml")
    assert resolve_config_path(None, {"RELAYD_CONFIG": ""}) == Path("/etc/relayd/relayd.toml")


def _two_providers(default: str = "") -> Config:
    data = minimal()
    data["providers"]["other"] = dict(data["providers"]["main"], kind="aitronos")
    data["relayd"] = {"default_provider": default}
    return parse_config(data, base_dir=BASE, env=ENV)


def test_provider_for() -> None:
    """A name wins, else default_provider, else the only provider; otherwise None."""
    single = parse_config(minimal(), base_dir=BASE, env=ENV)
    assert single.provider_for(None) is single.providers["main"]
    assert single.provider_for("nope") is None
    ambiguous = _two_providers()
    assert ambiguous.provider_for(None) is None
    assert ambiguous.provider_for("other") is ambiguous.providers["other"]
    with_default = _two_providers("other")
    assert with_default.provider_for(None) is with_default.providers["other"]
    assert with_default.provider_for("main") is with_default.providers["main"]
