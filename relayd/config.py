"""Configuration: TOML → frozen dataclasses, checked strictly (every problem named by its TOML path,
all reported at once); secrets resolved but never shown; effective and starter configs rendered."""

from __future__ import annotations

import binascii
import difflib
import importlib.util
import ipaddress
import json
import logging
import math
import os
import re
import tomllib
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar
from urllib.parse import urlsplit

from relayd.errors import ConfigError
from relayd.models import EVENTS_PROVIDER
from relayd.signing import decode_secret

log = logging.getLogger("relayd.config")

DEFAULT_CONFIG_PATH = Path("/etc/relayd/relayd.toml")
EVENTS = frozenset(
    {
        "transcript_ready",
        "transcript_failed",
        "transcription.completed",
        "transcription.failed",
        # relayd's own (relayd/events.py)
        "relayd.delivery.dead",
        "relayd.endpoint.down",
        "relayd.endpoint.up",
        "relayd.key.refused",
        "relayd.key.accepted",
    }
)
KINDS = ("xosum", "aitronos")
# Where `base_url` may be left out: the API root the provider documents.
DEFAULT_BASE_URLS = {"aitronos": "https://api.aitronos.com"}
LITERAL = "<literal>"
MASK = "********"
_NAME = re.compile(r"[A-Za-z0-9_-]+")
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h|d)")
_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_LISTEN = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^\s:\[\]]+)):(?P<port>[0-9]{1,5})")
_HEADER = re.compile(r"(?P<name>[!#$%&'*+.^_`|~0-9A-Za-z-]+)(?:\s*:\s*|\s+)?(?P<prefix>\S*)")
_T = TypeVar("_T")


@dataclass(frozen=True)
class Secret:
    reference: str  # as written ("env:NAME", "file:/x", "credential:NAME"), or "<literal>"
    value: str = field(repr=False)

    def __str__(self) -> str:
        return MASK if self.reference == LITERAL else self.reference


@dataclass(frozen=True)
class ProviderConfig:
    name: str
    kind: str
    base_url: str
    api_key: Secret
    rate_limit: int
    rate_window: float
    poll_interval: float
    max_job_age: float
    webhook_secret: Secret | None
    link_template: str
    endpoints: tuple[str, ...]
    timeout: float  # one upstream request
    auth_header: str  # "Name: Prefix" sends "Prefix <key>"; "Name" alone sends the bare key
    adaptive_polling: bool = True  # poll by expected finish time; False: every poll_interval


@dataclass(frozen=True)
class EndpointConfig:
    name: str
    url: str
    timeout: float
    events: tuple[str, ...]
    signing_secrets: tuple[Secret, ...]  # several during a key rotation
    max_attempts: int
    retry_initial: float
    retry_max: float
    max_in_flight: int


@dataclass(frozen=True)
class HttpListen:
    host: str
    port: int


@dataclass(frozen=True)
class Settings:
    state_dir: Path
    spool_dir: Path
    socket: Path | None
    http: HttpListen | None
    api_token: Secret | None
    shared_budget: str
    store: str = field(repr=False)  # "": SQLite in state_dir; else a PostgreSQL URL (a password?)
    retention: float  # seconds an ended job is kept; 0: forever
    dead_retention: float  # seconds a dead delivery (and its job) is kept; 0: forever
    store_lease: float  # with a shared store: how soon others take over a dead instance's work
    default_provider: str
    log_level: str
    log_format: str


@dataclass(frozen=True)
class Config:
    settings: Settings
    providers: Mapping[str, ProviderConfig]
    endpoints: Mapping[str, EndpointConfig]
    path: Path | None = None

    def provider_for(self, name: str | None) -> ProviderConfig | None:
        """name, else default_provider, else the only provider; None if ambiguous/unknown."""
        chosen = name or self.settings.default_provider
        if chosen:
            return self.providers.get(chosen)
        if len(self.providers) == 1:
            return next(iter(self.providers.values()))
        return None


# ---- value converters: return the value or raise ValueError (never quoting a secret) ----


def _type(value: object) -> str:
    return type(value).__name__


def parse_duration(value: object) -> float:
    """Seconds from a number of seconds or a string like "500ms", "7s", "1.5m", "24h", "7d";
    > 0."""
    if isinstance(value, str):
        match = _DURATION.fullmatch(value.strip())
        if match is None:
            raise ValueError(
                f"invalid duration {value!r}: use seconds or <number><unit>, unit ms, s, m, h or d"
            )
        seconds = float(match[1]) * _UNITS[match[2]]
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise ValueError(f"expected a duration (seconds or a string like '7s'), got {_type(value)}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"duration must be > 0, got {value!r}")
    return seconds


def parse_retention(value: object) -> float:
    """A retention: a duration, or 0 (also "0", "0s", ...) to keep forever (returned as 0.0)."""
    if value == 0 or (
        isinstance(value, str) and value.strip() in ("0", "0s", "0ms", "0m", "0h", "0d")
    ):
        return 0.0
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise ValueError(f"{exc} (or 0 to keep forever)") from None


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_type(value)}")
    return value


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_type(value)}")
    return value


def _nonempty(value: object) -> str:
    if not _str(value):
        raise ValueError("must not be empty")
    return str(value)


def _int_at_least(minimum: int) -> Callable[[object], int]:
    def convert(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {_type(value)}")
        if value < minimum:
            raise ValueError(f"must be >= {minimum}, got {value}")
        return value

    return convert


def _choice(*choices: str) -> Callable[[object], str]:
    def convert(value: object) -> str:
        text = _str(value).lower()
        if text not in choices:
            raise ValueError(f"expected one of {' | '.join(choices)}, got {value!r}")
        return text

    return convert


def _str_list(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError(f"expected an array of strings, got {_type(value)}")
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise ValueError(f"expected an array of strings; item {index} is {_type(item)}")
    if not value:
        raise ValueError("must not be empty")
    return tuple(dict.fromkeys(value))  # drop repeats, keep order


def _events(value: object) -> tuple[str, ...]:
    events = _str_list(value)
    unknown = [e for e in events if e not in EVENTS]
    if unknown:
        raise ValueError(f"unknown event {unknown[0]!r} (known: {', '.join(sorted(EVENTS))})")
    return events


def _url(value: object) -> str:
    text = _nonempty(value)
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ValueError(f"invalid URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"expected an http:// or https:// URL, got scheme {parts.scheme!r}")
    if not parts.hostname or any(c.isspace() for c in text):
        raise ValueError("invalid URL: it needs a host and no spaces")
    return text


def _budget_url(value: object) -> str:
    text = _str(value)
    parts = urlsplit(text)
    if not text:
        return text
    if not (parts.scheme in ("redis", "rediss") and parts.hostname) and not (
        parts.scheme == "unix" and parts.path
    ):
        raise ValueError('expected "", redis://host:port/db, rediss://… or unix:///path')
    if importlib.util.find_spec("redis") is None:
        raise ValueError("needs redis-py, the optional extra: pip install 'relayd[redis]'")
    return text


def _store_url(value: object) -> str:
    """ "" (SQLite in state_dir) or a PostgreSQL URL libpq reads; the problem never quotes the
    URL, which may hold a password."""
    text = _str(value)
    if not text:
        return text
    if not text.startswith(("postgresql://", "postgres://")):
        raise ValueError('expected "" (SQLite in state_dir) or a postgresql:// URL')
    if importlib.util.find_spec("psycopg") is None:
        raise ValueError("needs psycopg, the optional extra: pip install 'relayd[postgres]'")
    from relayd.store.postgres import conninfo_of  # psycopg is imported there only

    if conninfo_of(text).get("password"):
        log.warning(
            "relayd.store: the URL holds a password; prefer a passfile (passfile=/path in the"
            " URL, or PGPASSFILE) or PGPASSWORD in the service's environment"
        )
    return text


def _listen(value: object) -> HttpListen | None:
    text = _str(value)
    if not text:
        return None
    match = _LISTEN.fullmatch(text)
    if match is None or int(match["port"]) > 65535:
        raise ValueError(f'expected "host:port" or "[v6addr]:port", port 0..65535, got {text!r}')
    if match["v6"]:
        try:
            ipaddress.IPv6Address(match["v6"])
        except ValueError:
            raise ValueError(f"invalid IPv6 address {match['v6']!r}") from None
    return HttpListen(match["v6"] or match["host"], int(match["port"]))


def _auth_header(value: object) -> str:
    match = _HEADER.fullmatch(_str(value).strip())
    if match is None:
        raise ValueError(f'expected "Header-Name: Prefix" or "Header-Name", got {value!r}')
    return f"{match['name']}: {match['prefix']}" if match["prefix"] else match["name"]


def _read_secret(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ValueError(f"cannot read secret file {file}: {reason}") from None


def _toml_key(name: str) -> str:
    return name if _NAME.fullmatch(name) else json.dumps(name)


# ---- tables: typed lookups that record problems under the table's path ----


class _Parser:
    """Holds what every table needs: where relative paths start, the environment, the problems."""

    def __init__(self, base_dir: Path, env: Mapping[str, str]) -> None:
        self.base_dir, self.env = base_dir, env
        self.problems: list[str] = []

    def problem(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    def path(self, value: object) -> Path:
        return self.base_dir / _nonempty(value)

    def secret(self, where: str, value: object) -> Secret:
        """Resolve env:/file:/credential:, or accept a literal with a warning."""
        text = _nonempty(value)
        scheme, colon, rest = text.partition(":")
        if colon and scheme == "env":
            if rest not in self.env:
                raise ValueError(f"environment variable {rest or '(empty name)'} is not set")
            resolved = self.env[rest]
        elif colon and scheme == "file":
            resolved = _read_secret(self.base_dir / rest)
        elif colon and scheme == "credential":
            directory = self.env.get("CREDENTIALS_DIRECTORY")
            if not directory:
                raise ValueError(f"{text} needs $CREDENTIALS_DIRECTORY (systemd LoadCredential=)")
            if not rest or "/" in rest or rest in (".", ".."):
                raise ValueError(f"invalid credential name {rest!r}")
            resolved = _read_secret(Path(directory) / rest)
        else:
            log.warning("%s: secret written literally; prefer env:, file: or credential:", where)
            return Secret(LITERAL, text)
        if not resolved:
            raise ValueError(f"{text} is empty")
        return Secret(text, resolved)

    def tables(self, where: str, value: object) -> Iterator[tuple[str, object]]:
        if not isinstance(value, Mapping):
            self.problem(where, f"expected a table, got {_type(value)}")
            return
        for name, sub in value.items():
            if not _NAME.fullmatch(name):
                self.problem(f"{where}.{_toml_key(name)}", "invalid name; use A-Z a-z 0-9 _ -")
            yield name, sub


class _Table:
    """One TOML table being read; unknown keys are refused on sight."""

    def __init__(self, parser: _Parser, path: str, data: object, keys: Collection[str]) -> None:
        self.parser, self.path = parser, path
        self.valid = isinstance(data, Mapping)  # if not, say so once, not once per missing key
        if not isinstance(data, Mapping):
            parser.problem(path, f"expected a table, got {_type(data)}")
            data = {}
        self.data: Mapping[str, Any] = data
        for key in data:
            if key not in keys:
                near = difflib.get_close_matches(key, keys, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                parser.problem(self.at(key), f"unknown key{hint}")

    def at(self, key: str) -> str:
        return f"{self.path}.{_toml_key(key)}" if self.path else _toml_key(key)

    def take(
        self, key: str, convert: Callable[[Any], _T], default: _T, required: bool = False
    ) -> _T:
        if key not in self.data:
            if required and self.valid:
                self.parser.problem(self.at(key), "missing (required)")
            return default
        try:
            return convert(self.data[key])
        except ValueError as exc:
            self.parser.problem(self.at(key), str(exc))
            return default

    def secret(self, key: str, required: bool = False) -> Secret | None:
        """A secret reference or literal; "" means none, which a required key refuses."""
        if self.data.get(key) == "" and not required:
            return None
        return self.take(key, lambda v: self.parser.secret(self.at(key), v), None, required)


def table_keys(cls: type[Settings | ProviderConfig | EndpointConfig]) -> tuple[str, ...]:
    """The TOML keys of a table: its dataclass fields (`signing_secrets` is read from the
    singular key, which holds one or more secrets)."""
    return tuple(f.name.replace("_secrets", "_secret") for f in fields(cls) if f.name != "name")


_SETTINGS_KEYS = table_keys(Settings)
_PROVIDER_KEYS = table_keys(ProviderConfig)
_ENDPOINT_KEYS = table_keys(EndpointConfig)
_NO_SECRET = Secret("", "")
_DEFAULT_HTTP: HttpListen | None = HttpListen("127.0.0.1", 8787)


def _settings(p: _Parser, data: object) -> Settings:
    t = _Table(p, "relayd", data, _SETTINGS_KEYS)
    socket = t.take("socket", _str, "/run/relayd/relayd.sock")
    return Settings(
        state_dir=t.take("state_dir", p.path, Path("/var/lib/relayd")),
        spool_dir=t.take("spool_dir", p.path, Path("/var/spool/relayd")),
        socket=p.path(socket) if socket else None,
        http=t.take("http", _listen, _DEFAULT_HTTP),
        api_token=t.secret("api_token"),
        shared_budget=t.take("shared_budget", _budget_url, ""),
        store=t.take("store", _store_url, ""),
        retention=t.take("retention", parse_retention, 7 * 86400.0),
        dead_retention=t.take("dead_retention", parse_retention, 30 * 86400.0),
        store_lease=t.take("store_lease", parse_duration, 30.0),
        default_provider=t.take("default_provider", _str, ""),
        log_level=t.take("log_level", _choice("debug", "info", "warning", "error"), "info"),
        log_format=t.take("log_format", _choice("text", "json"), "text"),
    )


def _endpoint(p: _Parser, name: str, data: object) -> EndpointConfig:
    t = _Table(p, f"endpoints.{_toml_key(name)}", data, _ENDPOINT_KEYS)

    def signing(value: object) -> tuple[Secret, ...]:
        if value == "":
            return ()
        secret = p.secret(t.at("signing_secret"), value)
        parts = secret.value.split()
        for index, part in enumerate(parts, 1):
            try:
                ok = part.startswith("whsec_") and bool(decode_secret(part))
            except binascii.Error:
                ok = False
            if not ok:
                raise ValueError(f"secret {index} of {len(parts)} is not 'whsec_' + base64")
        return tuple(Secret(secret.reference, part) for part in parts)

    initial = t.take("retry_initial", parse_duration, 1.0)
    maximum = t.take("retry_max", parse_duration, 600.0)
    if maximum < initial:
        p.problem(t.at("retry_max"), f"must be >= retry_initial ({format_duration(initial)})")
    return EndpointConfig(
        name=name,
        url=t.take("url", _url, "", required=True),
        timeout=t.take("timeout", parse_duration, 10.0),
        events=t.take("events", _events, ("transcript_ready", "transcription.completed")),
        signing_secrets=t.take("signing_secret", signing, ()),
        max_attempts=t.take("max_attempts", _int_at_least(1), 15),
        retry_initial=initial,
        retry_max=maximum,
        max_in_flight=t.take("max_in_flight", _int_at_least(1), 8),
    )


def _provider(p: _Parser, name: str, data: object, endpoints: Collection[str]) -> ProviderConfig:
    t = _Table(p, f"providers.{_toml_key(name)}", data, _PROVIDER_KEYS)
    if name == EVENTS_PROVIDER:
        p.problem(f"providers.{name}", "the name is relayd's own (its operational events)")
    names: tuple[str, ...] = t.take("endpoints", _str_list, (), required=True)
    for index, endpoint in enumerate(names):
        if endpoint not in endpoints:
            p.problem(f"{t.at('endpoints')}[{index}]", f"no endpoint named {endpoint!r}")
    kind = t.take("kind", _choice(*KINDS), "", required=True)
    default_url = DEFAULT_BASE_URLS.get(kind)
    return ProviderConfig(
        name=name,
        kind=kind,
        base_url=t.take("base_url", _url, default_url or "", required=not default_url).rstrip("/"),
        api_key=t.secret("api_key", required=True) or _NO_SECRET,
        rate_limit=t.take("rate_limit", _int_at_least(1), 60),
        rate_window=t.take("rate_window", parse_duration, 60.0),
        poll_interval=t.take("poll_interval", parse_duration, 7.0),
        max_job_age=t.take("max_job_age", parse_duration, 86400.0),
        webhook_secret=t.secret("webhook_secret"),
        link_template=t.take("link_template", _str, ""),
        endpoints=names,
        timeout=t.take("timeout", parse_duration, 30.0),
        auth_header=t.take("auth_header", _auth_header, "Authorization: Bearer"),
        adaptive_polling=t.take("adaptive_polling", _bool, True),
    )


def parse_config(
    data: Mapping[str, Any],
    *,
    base_dir: Path,
    env: Mapping[str, str] = os.environ,
    path: Path | None = None,
) -> Config:
    """Check a parsed TOML document; raise ConfigError listing every problem found."""
    p = _Parser(base_dir, env)
    top = _Table(p, "", data, ("relayd", "providers", "endpoints"))
    settings = _settings(p, top.data.get("relayd", {}))
    endpoints = {
        name: _endpoint(p, name, sub)
        for name, sub in p.tables("endpoints", top.data.get("endpoints", {}))
    }
    providers = {
        name: _provider(p, name, sub, endpoints)
        for name, sub in p.tables("providers", top.data.get("providers", {}))
    }
    if not providers and isinstance(top.data.get("providers", {}), Mapping):
        p.problem("providers", "at least one [providers.NAME] table is required")
    if settings.default_provider and settings.default_provider not in providers:
        p.problem("relayd.default_provider", f"no provider named {settings.default_provider!r}")
    if p.problems:
        raise ConfigError(p.problems)
    return Config(settings, MappingProxyType(providers), MappingProxyType(endpoints), path)


def resolve_config_path(arg: str | None, env: Mapping[str, str] = os.environ) -> Path:
    """`-c FILE`, else $RELAYD_CONFIG, else /etc/relayd/relayd.toml."""
    return Path(arg or env.get("RELAYD_CONFIG") or DEFAULT_CONFIG_PATH)


def load_config(path: Path, env: Mapping[str, str] = os.environ) -> Config:
    """Read and check a config file; relative paths in it start at the file's folder."""
    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    return parse_config(data, base_dir=path.absolute().parent, env=env, path=path)


# ---- rendering ----


def format_duration(seconds: float) -> str:
    """The largest whole unit ("7d", "24h": a single day reads better in hours)."""
    for unit, factor in _UNITS.items():
        count = seconds / factor
        if count >= (2 if unit == "d" else 1) and abs(count - round(count)) < 1e-9:
            return f"{round(count)}{unit}"
    unit, count = ("s", seconds) if seconds >= 1 else ("ms", seconds * 1000)
    return f"{count:.9f}".rstrip("0").rstrip(".") + unit
