"""The sidecar container without a container engine: the Containerfile read as data, and the real
daemon started the way its ENTRYPOINT/CMD start it, with container/relayd.toml moved to tmp_path."""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import tomli_w

from relayd.mock.net import free_port
from relayd.store import SqliteStore

ROOT = Path(__file__).resolve().parents[1]
CONTAINERFILE = ROOT / "Containerfile"
CONFIG = ROOT / "container" / "relayd.toml"
START_TIMEOUT = 15.0


def instructions() -> list[tuple[str, str]]:
    """The Containerfile as (INSTRUCTION, arguments): continuations joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in CONTAINERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        out.append((keyword.upper(), args.strip()))
        pending = ""
    assert not pending, "the Containerfile ends inside a continuation"
    return out


def args_of(keyword: str) -> list[str]:
    return [args for kw, args in instructions() if kw == keyword]


def last(keyword: str) -> str:
    found = args_of(keyword)
    assert found, f"no {keyword} in the Containerfile"
    return found[-1]  # the one that wins at run time


def exec_form(args: str) -> list[str]:
    """An exec-form (JSON array) command as argv; a shell-form one as the engine runs it."""
    if args.startswith("["):
        argv = json.loads(args)
        assert isinstance(argv, list) and all(isinstance(a, str) for a in argv)
        return argv
    return ["/bin/sh", "-c", args]


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for args in args_of("ENV"):
        words = shlex.split(args)
        if words and "=" not in words[0]:  # legacy form: ENV KEY value
            env[words[0]] = " ".join(words[1:])
            continue
        for word in words:
            name, _, value = word.partition("=")
            env[name] = value
    return env


def healthcheck_argv() -> list[str]:
    match = re.fullmatch(r"(?:--\S+\s+)*CMD\s+(.+)", last("HEALTHCHECK"), re.S)
    assert match, "HEALTHCHECK has no CMD"
    return exec_form(match[1])


def container_config() -> dict[str, Any]:
    with CONFIG.open("rb") as file:
        return tomllib.load(file)


def env_references(value: object) -> set[str]:
    """Every NAME in an "env:NAME" secret reference anywhere in the config."""
    if isinstance(value, dict):
        return set().union(*(env_references(v) for v in value.values()))
    if isinstance(value, str) and value.startswith("env:"):
        return {value[4:]}
    return set()


def get(url: str, token: str | None = None) -> tuple[int, Any]:
    """Status and JSON body of a GET on loopback, never through a proxy; 0 if nothing answered."""
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=2) as resp:
            return int(resp.status), json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except OSError:
        return 0, None


@dataclass
class Sidecar:
    proc: subprocess.Popen[bytes]
    port: int
    env: dict[str, str]
    log: Path
    state: Path
    spool: Path
    run: Path
    cwd: Path
    home: Path
    tmp: Path

    def healthcheck(self) -> subprocess.CompletedProcess[str]:
        """The image's HEALTHCHECK command, with the port set by its documented variable, a
        dead proxy in the environment, and python -I -S: only the stdlib is importable."""
        argv = healthcheck_argv()
        assert argv[0] == "python", argv
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "RELAYD_HEALTHCHECK_URL": f"http://127.0.0.1:{self.port}/healthz",
            "HTTP_PROXY": f"http://127.0.0.1:{free_port()}",
            "http_proxy": f"http://127.0.0.1:{free_port()}",
        }
        return subprocess.run(
            [sys.executable, "-I", "-S", *argv[1:]],
            env=env, capture_output=True, text=True, timeout=10,
        )  # fmt: skip

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=START_TIMEOUT)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


@contextlib.contextmanager
def sidecar(tmp_path: Path) -> Iterator[Sidecar]:
    """`python -m relayd` + the image's CMD, no -c: the config found by $RELAYD_CONFIG, with only
    the writable paths, the listen address and the provider moved to loopback and tmp_path."""
    port = free_port()
    dirs = {name: tmp_path / name for name in ("state", "spool", "run", "cwd", "home", "tmp")}
    for name in ("cwd", "home", "tmp"):
        dirs[name].mkdir()
    data = container_config()
    data["relayd"].update(
        state_dir=str(dirs["state"]),
        spool_dir=str(dirs["spool"]),
        socket=str(dirs["run"] / "relayd.sock"),
        http=f"127.0.0.1:{port}",
    )
    for provider in data["providers"].values():
        provider["base_url"] = f"http://127.0.0.1:{free_port()}"  # closed: no network in CI
    etc = tmp_path / "etc"
    etc.mkdir()
    config = etc / "relayd.toml"
    config.write_text(tomli_w.dumps(data))
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(ROOT),  # this checkout's relayd, as pip installs it in the image
        **image_env(),
        "RELAYD_CONFIG": str(config),
        "HOME": str(dirs["home"]),
        "TMPDIR": str(dirs["tmp"]),
        **{name: f"dummy-{name.lower()}" for name in env_references(data)},
    }
    entrypoint, cmd = exec_form(last("ENTRYPOINT")), exec_form(last("CMD"))
    assert entrypoint == ["relayd"], entrypoint
    log = tmp_path / "relayd.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "relayd", *cmd],
            cwd=dirs["cwd"], env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while get(f"http://127.0.0.1:{port}/healthz")[0] != 200:
            if proc.poll() is not None:
                raise AssertionError(f"relayd exited {proc.returncode}:\n{log.read_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"relayd never answered /healthz:\n{log.read_text()}")
            time.sleep(0.05)
        yield Sidecar(proc, port, env, log, **dirs)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_image_runs_relayd_as_a_fixed_non_root_uid_with_the_config_from_relayd_config() -> None:
    """The image's user is a numeric non-root UID:GID, it starts `relayd run` with no -c, finds
    its config through RELAYD_CONFIG, and ships container/relayd.toml there as a default."""
    user, _, group = last("USER").partition(":")
    assert user.isdigit() and int(user) != 0, f"USER {last('USER')!r} is not a numeric non-root UID"
    assert not group or (group.isdigit() and int(group) != 0), f"USER group {group!r}"
    env = image_env()
    assert env["RELAYD_CONFIG"] == "/etc/relayd/relayd.toml"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1" and env["PYTHONUNBUFFERED"] == "1"
    assert last("FROM").split()[0] == "python:3.11-slim"
    assert exec_form(last("ENTRYPOINT")) == ["relayd"] and exec_form(last("CMD")) == ["run"]
    assert last("STOPSIGNAL") == "SIGTERM"
    assert f"container/relayd.toml {env['RELAYD_CONFIG']}" in args_of("COPY")


def test_image_ports_volumes_and_healthcheck_agree_with_the_container_config() -> None:
    """EXPOSE, the healthcheck's default URL and the config's http port are one port; the config
    listens beyond loopback only behind an api_token; state and spool are declared volumes."""
    settings = container_config()["relayd"]
    host, _, port = settings["http"].rpartition(":")
    assert host == "0.0.0.0" and settings["api_token"].startswith(("env:", "file:"))
    assert last("EXPOSE").split() == [port]
    script = healthcheck_argv()[-1]
    default = re.search(r"'(http://[^']+)'", script)
    assert default, "the healthcheck has no default URL"
    url = urlsplit(default[1])
    assert (url.hostname, str(url.port), url.path) == ("127.0.0.1", port, "/healthz")
    volumes = {v for args in args_of("VOLUME") for v in exec_form(args)}
    assert {settings["state_dir"], settings["spool_dir"]} <= volumes


def test_build_context_excludes_local_clutter_but_keeps_what_the_image_copies() -> None:
    """.dockerignore keeps .git and .venv out of the build context, and excludes none of the
    files the Containerfile COPYs (pip needs README.md, which pyproject names as the readme)."""
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert {".git", ".venv"} <= set(patterns)
    sources = [
        src
        for args in args_of("COPY")
        if not args.startswith("--from")
        for src in (exec_form(args)[:-1] if args.startswith("[") else args.split()[:-1])
    ]
    assert "README.md" in sources and "relayd" in sources
    for src in sources:
        assert (ROOT / src).exists(), src
        parts = Path(src).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        hits = [p for p in patterns if any(fnmatch.fnmatch(x, p) for x in prefixes)]
        assert not hits, f"{src} is excluded from the build context by {hits}"


def test_container_config_passes_check_config_with_its_environment_set(tmp_path: Path) -> None:
    """`relayd check-config`, found through RELAYD_CONFIG, accepts container/relayd.toml once its
    env: secrets are set, masks them, and names each missing one when they are not."""
    names = env_references(container_config())
    assert {"RELAYD_API_TOKEN", "XOSUM_API_KEY"} <= names
    base = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(ROOT),
        "RELAYD_CONFIG": str(CONFIG),
    }
    secrets = {name: f"s3cret-{name.lower()}" for name in names}
    argv = [sys.executable, "-m", "relayd", "check-config"]
    ok = subprocess.run(argv, env=base | secrets, cwd=tmp_path, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert not [v for v in secrets.values() if v in ok.stdout + ok.stderr]
    bad = subprocess.run(argv, env=base, cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode == 78
    assert all(f"environment variable {name} is not set" in bad.stderr for name in names)


def test_healthcheck_passes_while_relayd_runs_and_fails_after_sigterm(tmp_path: Path) -> None:
    """Started like the image starts it, relayd passes the image's HEALTHCHECK (through a dead
    proxy, stdlib only), guards its TCP API with the token but leaves /healthz open, exits 0 on
    SIGTERM, and the HEALTHCHECK then fails."""
    with sidecar(tmp_path) as relayd:
        check = relayd.healthcheck()
        assert check.returncode == 0, check.stderr + relayd.output()
        status = f"http://127.0.0.1:{relayd.port}/v1/status"
        assert get(status)[0] == 401
        assert get(status, token=relayd.env["RELAYD_API_TOKEN"])[0] == 200
        assert relayd.stop() == 0, relayd.output()
        check = relayd.healthcheck()
        assert check.returncode != 0 and "unhealthy" in check.stderr, check


def test_relayd_writes_only_to_its_state_spool_and_socket_folders(tmp_path: Path) -> None:
    """A read-only root is enough: taking a spool file, polling a provider that is down and
    stopping leave the working directory, HOME and TMPDIR empty, and write nothing in tmp_path
    but the state, spool and socket folders."""
    with sidecar(tmp_path) as relayd:
        part = relayd.spool / ".job.part"
        part.write_text("doc-abc\n")
        part.rename(relayd.spool / "job.txt")
        job = f"http://127.0.0.1:{relayd.port}/v1/jobs/main/doc-abc"
        deadline = time.monotonic() + START_TIMEOUT
        while not (get(job, relayd.env["RELAYD_API_TOKEN"])[1] or {}).get("polls"):
            assert time.monotonic() < deadline, relayd.output()
            time.sleep(0.05)
        assert not (relayd.spool / "job.txt").exists()  # taken: stored, then deleted
        assert relayd.stop() == 0, relayd.output()
        assert (relayd.state / "relayd.db").is_file()
        for folder in (relayd.cwd, relayd.home, relayd.tmp):
            assert not list(folder.iterdir()), f"relayd wrote in {folder.name}"
    made = {p.name for p in tmp_path.iterdir()}
    assert made <= {"etc", "relayd.log", "state", "spool", "run", "cwd", "home", "tmp"}


def test_store_keeps_sqlite_temp_files_in_memory(tmp_path: Path) -> None:
    """On a read-only root there is no temp directory: SQLite must sort in memory, or a big
    query fails with 'disk I/O error' (the pragma is per connection, so ask the store's own)."""
    store = SqliteStore(tmp_path / "relayd.db")
    try:
        assert store._db.execute("PRAGMA temp_store").fetchone()[0] == 2  # MEMORY
    finally:
        store.close()
