"""Configs written out as text: the effective config `check-config` prints (every key with its
value, secrets masked) and the commented starter `relayd init` writes."""

from __future__ import annotations

from dataclasses import fields
from urllib.parse import urlsplit

import tomli_w

from relayd.config import (
    LITERAL,
    MASK,
    Config,
    EndpointConfig,
    HttpListen,
    ProviderConfig,
    Secret,
    Settings,
    format_duration,
    table_keys,
)


def _mask_url(url: str) -> str:
    """The URL with its password masked, in the user part or in libpq's `password=` parameter;
    the rest as written (a round trip through urlunsplit would drop the `//` of
    `postgresql:///db?host=/run/postgresql`)."""
    parts = urlsplit(url)
    masked = url
    if parts.password is not None:
        userinfo, _, host = parts.netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        masked = masked.replace(f"//{parts.netloc}", f"//{user}:{MASK}@{host}", 1)
    if parts.query:
        params = [
            f"password={MASK}" if param.partition("=")[0] == "password" else param
            for param in parts.query.split("&")
        ]
        masked = masked.replace(f"?{parts.query}", "?" + "&".join(params), 1)
    return masked


def _masked(secrets: tuple[Secret, ...]) -> str:
    shown: list[str] = []
    for secret in secrets:  # one reference may hold several rotated secrets: show it once
        if str(secret) not in shown or secret.reference == LITERAL:
            shown.append(str(secret))
    return " ".join(shown)


def _plain(key: str, value: object) -> object:
    """One config value as TOML shows it; every float in the config is a duration."""
    if value is None:
        return ""
    if isinstance(value, float):
        return "0" if value == 0 else format_duration(value)  # 0: a retention kept forever
    if isinstance(value, HttpListen):
        host = f"[{value.host}]" if ":" in value.host else value.host
        return f"{host}:{value.port}"
    if isinstance(value, tuple):
        return _masked(value) if key == "signing_secret" else list(value)
    if key in ("url", "base_url", "shared_budget", "store"):
        return _mask_url(str(value))
    return value if isinstance(value, int | str) else str(value)  # Path, Secret (masked)


def _plain_table(obj: Settings | ProviderConfig | EndpointConfig) -> dict[str, object]:
    values = (getattr(obj, f.name) for f in fields(obj) if f.name != "name")
    return {
        key: _plain(key, value) for key, value in zip(table_keys(type(obj)), values, strict=True)
    }


def render_effective(config: Config) -> str:
    """The effective config as TOML: every key with its value, secrets masked."""
    doc = {
        "relayd": _plain_table(config.settings),
        "providers": {name: _plain_table(pc) for name, pc in config.providers.items()},
        "endpoints": {name: _plain_table(ec) for name, ec in config.endpoints.items()},
    }
    source = f" from {config.path}" if config.path else ""
    return f"# relayd effective configuration{source}; secrets masked\n\n{tomli_w.dumps(doc)}"


_STARTER: tuple[tuple[str, tuple[tuple[str, object, str], ...]], ...] = (
    ("relayd", (
        ("state_dir", "./state", "SQLite database relayd.db lives here (relative to this file)"),
        ("spool_dir", "./spool", "drop files here to submit job ids"),
        ("socket", "./relayd.sock", 'HTTP API on a unix socket; "" disables'),
        ("http", "127.0.0.1:8787", 'same API plus /metrics and /healthz on TCP; "" disables'),
        ("api_token", "", 'if set, the TCP API requires "Authorization: Bearer <token>"'),
        ("shared_budget", "", '"redis://host:6379/0": one budget for every relayd on a key'),
        ("store", "", '"" = SQLite in state_dir; "postgresql://user@host/db": one shared store'),
        ("retention", "7d", 'an ended job is forgotten this long after it ended; "0": never'),
        ("dead_retention", "30d", 'a dead delivery and its job are kept this long; "0": forever'),
        ("store_lease", "30s", "with a shared store: how soon others take over a dead one's work"),
        ("default_provider", "", 'provider for submissions naming none ("" = the only one)'),
        ("log_level", "info", "debug | info | warning | error"),
        ("log_format", "text", "text | json"),
    )),
    ("providers.main", (
        ("kind", "xosum", "xosum | aitronos"),
        ("base_url", "https://app.xosum.am", "API root (aitronos: https://api.aitronos.com)"),
        ("api_key", "env:XOSUM_API_KEY", "env:NAME, file:/path or credential:NAME"),
        ("rate_limit", 60, "requests per window for this key"),
        ("rate_window", "60s", "fixed window, aligned to the wall clock"),
        ("poll_interval", "7s", "target time between two polls of one job"),
        ("max_job_age", "24h", "stop polling a job this long after it was submitted"),
        ("webhook_secret", "", 'xosum: sent as `secret`; e.g. "env:XOSUM_WEBHOOK_SECRET"'),
        ("link_template", "", 'xosum: e.g. "https://app.xosum.am/…/{docId}" fills `link`'),
        ("endpoints", ["app"], "where finished jobs of this provider go"),
        ("timeout", "30s", "limit on one request to the provider"),
        ("auth_header", "Authorization: Bearer", '"Header: Prefix" sends "Prefix <key>"'),
        ("adaptive_polling", True, "poll by expected finish; false: every poll_interval"),
    )),
    ("endpoints.app", (
        ("url", "http://127.0.0.1:8080/webhooks/xosum", "your existing webhook receiver"),
        ("timeout", "10s", "limit on one POST"),
        ("events", ["transcript_ready", "transcription.completed"],
         'add "transcript_failed" / "transcription.failed" to hear about failed jobs'),
        ("signing_secret", "", '"whsec_…" adds Standard Webhooks signature headers'),
        ("max_attempts", 15, "then the delivery is dead (relayd redeliver sends it again)"),
        ("retry_initial", "1s", "first retry delay; grows exponentially with jitter"),
        ("retry_max", "10m", "cap on one retry delay"),
        ("max_in_flight", 8, "concurrent POSTs to this endpoint"),
    )),
)  # fmt: skip


def _toml_value(value: object) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return tomli_w.dumps({"v": value}).strip().removeprefix("v = ")


def starter_config() -> str:
    """The commented starter config written by `relayd init`."""
    lines = ["# relayd configuration: see config.example.toml for every key explained.", ""]
    for table, keys in _STARTER:
        lines.append(f"[{table}]")
        for key, value, comment in keys:
            assignment = f"{key} = {_toml_value(value)}"
            line = f"{assignment:<40}  # {comment}"
            lines += [line] if len(line) <= 100 else [f"# {comment}", assignment]
        lines.append("")
    return "\n".join(lines)
