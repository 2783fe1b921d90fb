"""The `relayd` command: parses arguments, loads the config, calls one function per sub-command.

Exit codes: 0 ok, 1 failure, 2 bad usage, 78 bad config (systemd's RestartPreventExitStatus).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from relayd.cli_text import age, key_rows, size_text, store_line, table, when
from relayd.errors import CliError

EX_CONFIG = 78


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from relayd.errors import ConfigError

    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"relayd: bad config:\n{exc}", file=sys.stderr)
        return EX_CONFIG
    except CliError as exc:
        print(f"relayd: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    from relayd import __version__

    p = argparse.ArgumentParser(prog="relayd", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"relayd {__version__}")
    sub = p.add_subparsers(metavar="COMMAND")

    def cmd(name: str, func: Any, help: str, config: bool = True) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(func=func)
        if config:
            sp.add_argument("-c", "--config", metavar="FILE", help="config file")
        return sp

    cmd("run", cmd_run, "run the daemon in the foreground")
    sp = cmd("demo", cmd_demo, "the whole pipeline on this machine, no account needed", False)
    sp.add_argument("--jobs", type=int, default=6, help="how many jobs to submit (default 6)")
    sp = cmd("submit", cmd_submit, "hand job ids to the running daemon")
    sp.add_argument("doc_ids", nargs="+", metavar="DOCID")
    sp.add_argument("--provider", help="provider table name")
    sp.add_argument("--endpoint", action="append", dest="endpoints", help="endpoint name")
    sp.add_argument("--meta", action="append", default=[], metavar="K=V", help="metadata")
    sp = cmd("status", cmd_status, "budgets, jobs by state, deliveries by endpoint")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp = cmd("jobs", cmd_jobs, "list jobs")
    sp.add_argument("--state")
    sp.add_argument("--provider")
    sp.add_argument("--limit", type=int, default=50)
    sp.add_argument("--json", action="store_true")
    sp = cmd("show", cmd_show, "one job with its polls and deliveries")
    sp.add_argument("doc_id", metavar="DOCID")
    sp.add_argument("--provider")
    sp.add_argument("--json", action="store_true")
    sp = cmd("redeliver", cmd_redeliver, "deliver finished jobs again (also dead ones)")
    sp.add_argument("doc_ids", nargs="*", metavar="DOCID", help="jobs (or use the filters)")
    sp.add_argument("--provider")
    sp.add_argument("--endpoint", help="only deliveries to this endpoint")
    sp.add_argument("--state", choices=["dead", "delivered", "pending"], help="only these")
    sp.add_argument(
        "--since", metavar="WHEN", help="only jobs finished since: a duration ('2h') or ISO time"
    )
    sp = cmd("cancel", cmd_cancel, "stop polling and delivering jobs")
    sp.add_argument("doc_ids", nargs="+", metavar="DOCID")
    sp.add_argument("--provider")
    sp = cmd("init", cmd_init, "write a commented starter config", False)
    sp.add_argument("path", nargs="?", default="relayd.toml")
    sp.add_argument("--force", action="store_true", help="overwrite an existing file")
    cmd("check-config", cmd_check_config, "validate and print the effective config")
    cmd("vacuum", cmd_vacuum, "give the database's free space back to the file system")
    sp = cmd("migrate-store", cmd_migrate_store, "copy the SQLite jobs into the PostgreSQL store")
    sp.add_argument(
        "--from",
        dest="source",
        metavar="FILE",
        help="the SQLite file (default state_dir/relayd.db)",
    )
    sp = cmd("mock-provider", cmd_mock_provider, "a local fake of the providers' APIs", False)
    sp.add_argument("--port", type=int, default=8900)
    sp.add_argument(
        "--window",
        type=float,
        default=60.0,
        help="rate window in seconds; Aitronos's Cache-Control max-age (5 s, 1 day) scales with it",
    )
    sp.add_argument("--limit", type=int, default=60, help="requests per window per key")
    sp.add_argument("--ready-after", type=float, default=10.0, help="seconds until a job is done")
    return p


# -- helpers -------------------------------------------------------------------------------------


def _config(args: argparse.Namespace) -> Any:
    from relayd.config import load_config, resolve_config_path

    return load_config(resolve_config_path(args.config))


def _open_store(config: Any, *, write: bool = False) -> Any:
    from relayd.errors import StoreError
    from relayd.store import DATABASE, open_store

    path = config.settings.state_dir / DATABASE
    if not config.settings.store and not path.exists():
        raise CliError(f"no database at {path} (has relayd run with this config?)")
    try:
        return open_store(config.settings, readonly=not write)
    except StoreError as exc:
        raise CliError(str(exc)) from None


def _find_jobs(store: Any, doc_id: str, provider: str | None) -> list[Any]:
    if provider:
        job = store.get_job(provider, doc_id)
        return [job] if job else []
    return list(store.find_jobs(doc_id))


async def _api(config: Any, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    import aiohttp

    settings = config.settings
    headers = {}
    if settings.socket is not None:
        connector: aiohttp.BaseConnector = aiohttp.UnixConnector(path=str(settings.socket))
        base = "http://relayd"
    elif settings.http is not None:
        connector = aiohttp.TCPConnector()
        base = f"http://{settings.http.host}:{settings.http.port}"
        if settings.api_token:
            headers["Authorization"] = f"Bearer {settings.api_token.value}"
    else:
        raise CliError("the config disables both the socket and the TCP API")
    async with aiohttp.ClientSession(connector=connector) as session:
        try:
            async with session.request(
                method, base + path, json=body, headers=headers, timeout=aiohttp.ClientTimeout(30)
            ) as resp:
                return resp.status, await resp.json(content_type=None)
        except (aiohttp.ClientError, OSError) as exc:
            raise CliError(f"cannot reach the daemon: {exc}") from None


# -- commands ------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from relayd import daemon, logs
    from relayd.errors import StoreError

    config = _config(args)
    logs.setup(config.settings.log_level, config.settings.log_format)
    try:
        asyncio.run(daemon.run(config))
    except* (OSError, StoreError) as group:
        raise CliError("; ".join(str(e) for e in group.exceptions)) from None
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from relayd.mock.demo import demo

    return asyncio.run(demo(jobs=args.jobs))


def cmd_submit(args: argparse.Namespace) -> int:
    config = _config(args)
    metadata = {}
    for item in args.meta:
        key, sep, value = item.partition("=")
        if not sep or not key:
            print(f"relayd: --meta {item!r}: expected K=V", file=sys.stderr)
            return 2
        metadata[key] = value
    from relayd.client import Client, RelaydError

    settings = config.settings
    if settings.socket is not None:
        client = Client(socket=settings.socket)
    elif settings.http is not None:
        token = settings.api_token.value if settings.api_token else None
        client = Client(url=f"http://{settings.http.host}:{settings.http.port}", token=token)
    else:
        raise CliError("the config disables both the socket and the TCP API")
    try:
        jobs = client.submit(
            args.doc_ids,
            provider=args.provider or None,
            metadata=metadata or None,
            endpoints=args.endpoints or None,
        )
    except RelaydError as exc:
        if exc.status is None:
            raise CliError(f"cannot reach the daemon: {exc.message}") from None
        raise CliError(f"refused ({exc.status}): {exc.message}") from None
    for job in jobs:
        note = "accepted" if job["created"] else f"already known ({job['state']})"
        print(f"{job['provider']}/{job['docId']}: {note}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from relayd.views import status_from_store

    config = _config(args)
    try:
        _status, info = asyncio.run(_api(config, "GET", "/v1/status"))
    except CliError as exc:
        store = _open_store(config)
        info = status_from_store(store, config, time.time())
        info["running"] = False
        info["note"] = str(exc)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"relayd {'running' if info.get('running') else 'NOT RUNNING (database view)'}")
    if info.get("intake_error"):
        print(f"INTAKE REFUSING: {info['intake_error']}")
    rows = []
    for name, p in info["providers"].items():
        jobs = p["jobs"]
        budget = p.get("budget") or {}
        used = f"{budget['budget_used']}/{budget['rate_limit']}" if budget else None
        flag = budget.get("paused")
        rows.append(
            [
                name,
                p["kind"],
                used,
                jobs.get("polling", 0),
                jobs.get("delivering", 0),
                jobs.get("delivered", 0),
                sum(v for k, v in jobs.items() if k not in {"polling", "delivering", "delivered"}),
                age(p["oldest_waiting_seconds"]),
                f"PAUSED: {flag}" if flag else "",
            ]
        )
    headers = [
        "PROVIDER",
        "KIND",
        "BUDGET",
        "POLLING",
        "DELIVERING",
        "DELIVERED",
        "OTHER",
        "OLDEST WAITING",
        "",
    ]
    print(table(rows, headers))
    keys = key_rows(info["providers"])
    if keys:
        print()
        headers = ["KEY", "PROVIDERS", "USED", "JOBS", "EACH POLLED", "DUE NOW", "CLEARS IN"]
        print(table(keys, headers))
    print()
    rows = [
        [
            name,
            e["pending"],
            e.get("in_flight", "-"),
            e["dead"],
            e["delivered"],
            "probing (endpoint down)" if e.get("probing") else "",
        ]
        for name, e in info["endpoints"].items()
    ]
    print(table(rows, ["ENDPOINT", "PENDING", "IN FLIGHT", "DEAD", "DELIVERED", ""]))
    if store := info.get("store"):
        print()
        print(store_line(store))
    return 0


VACUUM_STEP = 2048  # pages given back per transaction: a running daemon waits that long at most


def cmd_jobs(args: argparse.Namespace) -> int:
    store = _open_store(_config(args))
    jobs = store.list_jobs(state=args.state, provider=args.provider, limit=args.limit)
    if args.json:
        print(json.dumps([j.as_dict() for j in jobs], indent=2))
        return 0
    rows = [
        [j.provider, j.doc_id, j.state, j.last_status, j.polls, when(j.submitted_at)] for j in jobs
    ]
    print(table(rows, ["PROVIDER", "DOCID", "STATE", "LAST STATUS", "POLLS", "SUBMITTED"]))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from relayd.models import HISTORY_FIRST
    from relayd.views import job_detail

    store = _open_store(_config(args))
    jobs = _find_jobs(store, args.doc_id, args.provider)
    if not jobs:
        raise CliError(f"no job {args.doc_id}")
    details = [job_detail(store, j.provider, j.doc_id) for j in jobs]
    if args.json:
        print(json.dumps(details if len(details) > 1 else details[0], indent=2))
        return 0
    for detail in details:
        assert detail is not None
        job = detail["job"]
        print(f"{job['provider']}/{job['docId']}: {job['state']}")
        print(f"  submitted {when(job['submitted_at'])} via {job['source']}, {job['polls']} polls")
        for n, poll in enumerate(detail["polls"]):
            if n == HISTORY_FIRST and detail["polls_dropped"]:
                print(f"  ... {detail['polls_dropped']} poll(s) not kept ...")
            print(
                f"  poll {when(poll['at'])}  {poll['http_status'] or '-'}  {poll['outcome']}"
                f"  {poll['detail'] or ''}".rstrip()
            )
        for d in detail["deliveries"]:
            print(
                f"  delivery to {d['endpoint']} ({d['event']}, {d['webhook_id']}): {d['state']}"
                f", {d['attempts']} attempt(s)"
            )
            for n, a in enumerate(d["history"]):
                if n == HISTORY_FIRST and d["history_dropped"]:
                    print(f"    ... {d['history_dropped']} attempt(s) not kept ...")
                print(
                    f"    {when(a['at'])}  {a['status'] or '-'}  {a['outcome']}"
                    f"  {a['error'] or ''}".rstrip()
                )
    return 0


def _act_on_jobs(args: argparse.Namespace, act: Callable[[Any, Any], tuple[bool, str]]) -> int:
    """Run `act(store, job)` on every job named; it works with or without a running daemon."""
    store = _open_store(_config(args), write=True)
    failures = 0
    for doc_id in args.doc_ids:
        jobs = _find_jobs(store, doc_id, args.provider)
        if not jobs:
            print(f"{doc_id}: no such job", file=sys.stderr)
            failures += 1
        for job in jobs:
            ok, message = act(store, job)
            print(f"{job.provider}/{doc_id}: {message}", file=sys.stdout if ok else sys.stderr)
            failures += not ok
    return 1 if failures else 0


def _since(value: str | None) -> float | None:
    from relayd.views import parse_since

    if value is None:
        return None
    try:
        return parse_since(value, time.time())
    except ValueError as exc:
        raise CliError(f"--since {exc}") from None


def cmd_redeliver(args: argparse.Namespace) -> int:
    since = _since(args.since)
    filters: dict[str, Any] = {"endpoint": args.endpoint, "since": since}
    if args.state:
        filters["states"] = (args.state,)
    if not args.doc_ids:
        if not (args.endpoint or args.state or args.since):
            print("relayd: redeliver needs DOCIDs or a filter (--endpoint/--state/--since)",
                  file=sys.stderr)  # fmt: skip
            return 2
        store = _open_store(_config(args), write=True)
        n = store.redeliver(now=time.time(), **filters)
        print(f"{n} delivery(ies) queued again")
        return 0

    def redeliver(store: Any, job: Any) -> tuple[bool, str]:
        n = store.redeliver(now=time.time(), job_id=job.id, **filters)
        if n:
            return True, f"{n} delivery(ies) queued again"
        return False, f"nothing to deliver ({job.state})"

    return _act_on_jobs(args, redeliver)


def cmd_cancel(args: argparse.Namespace) -> int:
    def cancel(store: Any, job: Any) -> tuple[bool, str]:
        if store.cancel(job.id, now=time.time()):
            return True, "cancelled"
        return False, f"already {job.state}"

    return _act_on_jobs(args, cancel)


def cmd_init(args: argparse.Namespace) -> int:
    from relayd.config_text import starter_config

    path = Path(args.path)
    if path.exists() and not args.force:
        raise CliError(f"{path} exists (use --force to overwrite)")
    path.write_text(starter_config())
    print(f"wrote {path}: set XOSUM_API_KEY (or edit api_key), then `relayd run -c {path}`")
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    from relayd.config_text import render_effective

    config = _config(args)
    print(f"# {config.path}: OK")
    print(render_effective(config), end="")
    return 0


def cmd_vacuum(args: argparse.Namespace) -> int:
    """Free pages back to the file system. A database relayd created gives them back in short
    steps, with the daemon running; an older one is rewritten once by a full VACUUM, which needs
    the daemon stopped (and makes the file give space back step by step from then on).
    PostgreSQL: a plain VACUUM of relayd's tables, which its autovacuum does by itself anyway
    and which holds nothing relayd needs: with the daemon running."""
    from relayd.errors import StoreError
    from relayd.store import SqliteStore

    config = _config(args)
    store = _open_store(config, write=True)
    if not isinstance(store, SqliteStore):
        try:
            before = sum(store.disk_usage())
            store.vacuum()
            after = sum(store.disk_usage())
        except StoreError as exc:
            raise CliError(str(exc)) from None
        finally:
            store.close()
        print(
            f"PostgreSQL tables {size_text(before)} -> {size_text(after)}"
            " (autovacuum does this too)"
        )
        return 0
    before = sum(store.disk_usage())
    free, page = store.free_pages()
    if store.incremental():
        while free:
            store.give_back(VACUUM_STEP)
            left, _ = store.free_pages()
            if left >= free:  # nothing given back (a reader holds the pages): stop, not spin
                break
            free = left
    else:
        try:
            asyncio.run(_api(config, "GET", "/healthz"))
        except CliError:
            store.vacuum()
        else:
            raise CliError(
                "this database predates step-by-step vacuum: a full VACUUM rewrites the file and"
                " holds it meanwhile; stop relayd (systemctl stop relayd), run `relayd vacuum`,"
                " then start it again"
            )
    store.checkpoint()
    after = sum(store.disk_usage())
    print(f"database {size_text(before)} -> {size_text(after)} ({page}-byte pages)")
    return 0


def cmd_migrate_store(args: argparse.Namespace) -> int:
    """Copy state_dir/relayd.db (or --from) into the PostgreSQL store the config names, with
    relayd stopped; see relayd/store/migrate.py."""
    from pathlib import Path

    from relayd.errors import StoreError
    from relayd.store import DATABASE

    config = _config(args)
    if not config.settings.store:
        raise CliError('store is not set: point it at PostgreSQL first (store = "postgresql://…")')
    try:
        asyncio.run(_api(config, "GET", "/healthz"))
    except CliError:
        pass  # nobody answers: stopped, as it must be
    else:
        raise CliError("relayd is running: stop it (systemctl stop relayd) and migrate then")
    source = Path(args.source) if args.source else config.settings.state_dir / DATABASE
    store = _open_store(config, write=True)
    try:
        from relayd.store.migrate import migrate

        copied = migrate(source, store)
    except StoreError as exc:
        raise CliError(str(exc)) from None
    finally:
        store.close()
    print(
        f"copied {copied['jobs']} job(s) and {copied['deliveries']} delivery(ies) from {source}"
        f" to {store.where}; {source.name} is left as it was: start relayd, check"
        " `relayd status`, then remove it"
    )
    return 0


def cmd_mock_provider(args: argparse.Namespace) -> int:
    from relayd.mock.provider import main as mock_main

    return mock_main(args.port, args.window, args.limit, args.ready_after)
