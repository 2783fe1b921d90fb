"""The store keys of the config (`store`, `store_lease`): what is accepted, what is refused (the
problem names `relayd.store`), and that a PostgreSQL password never shows, in problems, warnings
or `check-config`'s output."""

from __future__ import annotations

import importlib.util
import logging
import tomllib

import pytest

from relayd.config import parse_config
from relayd.config_text import render_effective
from tests.test_config import BASE, ENV, minimal, problems_of, with_key

PASSWORD = "s3cret-pw-81"


def test_the_defaults_keep_jobs_in_sqlite_with_a_30s_lease() -> None:
    """No `store`: SQLite in state_dir; `store_lease` is 30 s until said otherwise."""
    s = parse_config(minimal(), base_dir=BASE, env=ENV).settings
    assert (s.store, s.store_lease) == ("", 30.0)
    s = parse_config(with_key("relayd", "store_lease", "45s"), base_dir=BASE, env=ENV).settings
    assert s.store_lease == 45.0


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://relayd@db.internal/relayd",
        "postgres://db.internal:5433/relayd",
        "postgresql:///relayd?host=/run/postgresql",
        "postgresql://relayd@db/relayd?sslmode=verify-full&connect_timeout=4",
    ],
)
def test_a_postgresql_url_is_a_store(url: str) -> None:
    """postgresql:// and postgres:// URLs that libpq reads are taken as they are."""
    assert (
        parse_config(with_key("relayd", "store", url), base_dir=BASE, env=ENV).settings.store == url
    )


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("mysql://db/relayd", 'expected "" (SQLite in state_dir) or a postgresql:// URL'),
        ("db.internal", 'expected "" (SQLite in state_dir) or a postgresql:// URL'),
        (f"postgresql://relayd:{PASSWORD}@db/relayd?nonsense=1", "not a URL libpq can read"),
        (f"postgresql://relayd@db/relayd?password={PASSWORD}&x=%zz", "not a URL libpq can read"),
        (5432, "expected a string"),
    ],
)
def test_anything_else_is_refused_naming_the_key_never_the_password(
    value: object, problem: str
) -> None:
    """A store that is not a PostgreSQL URL libpq reads is a config error (exit 78) naming
    relayd.store; the problem does not repeat the password."""
    (found,) = problems_of(with_key("relayd", "store", value))
    assert found.startswith(f"relayd.store: {problem}"), found
    assert PASSWORD not in found


def test_a_bad_lease_is_refused() -> None:
    """store_lease is a duration above zero."""
    (found,) = problems_of(with_key("relayd", "store_lease", 0))
    assert found.startswith("relayd.store_lease: duration must be > 0")


def test_a_store_without_psycopg_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """psycopg is an optional extra: naming a PostgreSQL store without it is a config error that
    says how to install it, not a crash at start."""
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "psycopg" else real(name, *a)
    )
    (found,) = problems_of(with_key("relayd", "store", "postgresql://db/relayd"))
    assert found == (
        "relayd.store: needs psycopg, the optional extra: pip install 'relayd[postgres]'"
    )


def test_a_password_in_the_url_is_warned_about_not_shown(caplog: pytest.LogCaptureFixture) -> None:
    """A password written in the config works, with a warning that says where else to keep it."""
    url = f"postgresql://relayd:{PASSWORD}@db/relayd"
    with caplog.at_level(logging.WARNING, logger="relayd.config"):
        parse_config(with_key("relayd", "store", url), base_dir=BASE, env=ENV)
    assert "relayd.store: the URL holds a password; prefer a passfile" in caplog.text
    assert PASSWORD not in caplog.text


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            f"postgresql://relayd:{PASSWORD}@db/relayd",
            "postgresql://relayd:********@db/relayd",
        ),
        (
            f"postgres://relayd@db:5433/relayd?sslmode=require&password={PASSWORD}",
            "postgres://relayd@db:5433/relayd?sslmode=require&password=********",
        ),
        (
            "postgresql:///relayd?host=/run/postgresql",
            "postgresql:///relayd?host=/run/postgresql",
        ),
    ],
)
def test_check_config_masks_the_password(url: str, shown: str) -> None:
    """`check-config` shows the store URL with its password masked, wherever the URL holds it,
    and the rest as written."""
    config = parse_config(with_key("relayd", "store", url), base_dir=BASE, env=ENV)
    text = render_effective(config)
    assert PASSWORD not in text
    rendered = tomllib.loads(text)["relayd"]
    assert (rendered["store"], rendered["store_lease"]) == (shown, "30s")


def test_the_settings_repr_leaves_the_store_url_out() -> None:
    """A Settings logged or shown in a traceback does not carry the URL's password."""
    url = f"postgresql://relayd:{PASSWORD}@db/relayd"
    config = parse_config(with_key("relayd", "store", url), base_dir=BASE, env=ENV)
    assert PASSWORD not in repr(config)
