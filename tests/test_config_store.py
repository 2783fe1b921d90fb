"""The store keys of the config (`store`, `store_lease`): what is accepted, what is refused (the
problem names `relayd.store`), and that a PostgreSQL password never shows, in problems, warnings
or `check-config`'s output."""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from relayd.config import parse_config
from relayd.config_text import render_effective
from tests.test_config import BASE, ENV, ROOT, minimal, problems_of, with_key

PASSWORD = "s3cret-pw-81"
# libpq reads the URL: without psycopg (the postgres extra) a store URL is refused as such
needs_psycopg = pytest.mark.skipif(
    importlib.util.find_spec("psycopg") is None, reason="psycopg, the postgres extra, is not here"
)


def test_the_defaults_keep_jobs_in_sqlite_with_a_30s_lease() -> None:
    """No `store`: SQLite in state_dir; `store_lease` is 30 s until said otherwise."""
    s = parse_config(minimal(), base_dir=BASE, env=ENV).settings
    assert (s.store, s.store_lease) == ("", 30.0)
    s = parse_config(with_key("relayd", "store_lease", "45s"), base_dir=BASE, env=ENV).settings
    assert s.store_lease == 45.0


@needs_psycopg
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


@needs_psycopg
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


@needs_psycopg
def test_a_password_in_the_url_is_warned_about_not_shown(caplog: pytest.LogCaptureFixture) -> None:
    """A password written in the config works, with a warning that says where else to keep it."""
    url = f"postgresql://relayd:{PASSWORD}@db/relayd"
    with caplog.at_level(logging.WARNING, logger="relayd.config"):
        parse_config(with_key("relayd", "store", url), base_dir=BASE, env=ENV)
    assert "relayd.store: the URL holds a password; prefer a passfile" in caplog.text
    assert PASSWORD not in caplog.text


@needs_psycopg
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


@needs_psycopg
def test_the_settings_repr_leaves_the_store_url_out() -> None:
    """A Settings logged or shown in a traceback does not carry the URL's password."""
    url = f"postgresql://relayd:{PASSWORD}@db/relayd"
    config = parse_config(with_key("relayd", "store", url), base_dir=BASE, env=ENV)
    assert PASSWORD not in repr(config)


def test_relayd_without_the_postgres_extra_imports_and_runs_on_sqlite(tmp_path: Path) -> None:
    """psycopg is imported only by the PostgreSQL store: with it missing, relayd imports, reads
    a config without `store` and opens its SQLite store."""
    script = (
        "import sys; sys.modules['psycopg'] = None\n"
        "from pathlib import Path\n"
        "import relayd.cli, relayd.daemon\n"
        "from relayd.config import parse_config\n"
        "from relayd.store import SqliteStore, open_store\n"
        "data = {'relayd': {'state_dir': sys.argv[1]}, 'providers': {'main': {'kind': 'xosum',"
        " 'base_url': 'https://x.example', 'api_key': 'k', 'endpoints': ['app']}},"
        " 'endpoints': {'app': {'url': 'http://127.0.0.1:9/'}}}\n"
        "config = parse_config(data, base_dir=Path('.'))\n"
        "store = open_store(config.settings)\n"
        "assert isinstance(store, SqliteStore)\n"
        "store.close()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "state")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
