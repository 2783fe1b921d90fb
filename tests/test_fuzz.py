"""Property tests of intake, in the parser and through the live API (issue 8): arbitrary bytes and
arbitrary JSON never crash anything; each input is taken whole or refused with a reason; taken ids
come back exactly. Seeded (derandomize, no example database), so CI sees the same inputs each run.

tests/test_envelope.py holds the parser's example tests and its first, smaller properties; these
add an independent reading of the spec as the oracle, inputs built to reach deep into the parser
(mutations of valid bodies, JSON text with NaN, duplicate keys, huge numbers, deep nesting), and
the same inputs sent to a running daemon.
"""

from __future__ import annotations

import io
import json
import tempfile
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from yarl import URL

from relayd.daemon import Daemon
from relayd.errors import IntakeError
from relayd.intake.envelope import JOB_ID, MAX_BYTES, load_json, parse_bytes, parse_json
from relayd.mock import provider as mock_provider
from relayd.mock.receiver import Receiver
from relayd.models import Submission
from tests.conftest import config_dict, make_config, running
from tests.db import integrity_check
from tests.test_envelope import CATALOG, ID_ALPHABET

PARSER = settings(max_examples=1000, deadline=None, derandomize=True, database=None)
# One daemon per example, many requests per example. Hypothesis's first example is the minimal
# one (every body empty), so the requests that count are those of the other examples. No
# shrinking: each step would start a daemon, for minutes; a failure names its request instead.
LIVE = settings(
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    max_examples=9,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
REASON_CHARS = 400  # a refusal is read by a person, in a JSON answer or a NAME.error file

# -- building inputs -----------------------------------------------------------------------------


def _stretch(length: st.SearchStrategy[int]) -> st.SearchStrategy[str]:
    """A long id-alphabet string, cheap to draw: a short one repeated to the length drawn."""
    return st.builds(lambda s, n: (s * n)[:n], st.text(ID_ALPHABET, min_size=1, max_size=8), length)


ID = st.text(ID_ALPHABET, min_size=1, max_size=16) | _stretch(st.integers(17, 200))
NEAR_ID = st.one_of(
    ID,
    st.text(ID_ALPHABET + "/ é\t\n#\x00\u2028", min_size=0, max_size=12),
    _stretch(st.integers(199, 202)),
    st.text(max_size=12),
)
SCALAR = st.one_of(
    st.sampled_from(["null", "true", "false", "NaN", "Infinity", "-Infinity", "1e999", "-0"]),
    st.integers().map(str),
    st.integers(4290, 4310).map(lambda n: "7" * n),  # around Python's int-conversion limit
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.sampled_from(['"\\ud800"', '"\\udfff\\ud800x"', '"\\u0000"', '"a\\/b"', '"\\"', "'a'"]),
    NEAR_ID.map(json.dumps),
    st.text(max_size=8).map(lambda s: json.dumps(s, ensure_ascii=False)),
)
LONG = st.text(min_size=150, max_size=400)  # a name no reason should echo in full
# numbers and strings at the edges of what JSON, Python and the store can hold
EDGE = st.sampled_from(
    [
        *["NaN", "Infinity", "-Infinity", "1e999", "-1E400", "1e-999", "-0", "0.1e1"],
        *["7" * 4300, "7" * 4301, '"\\ud800"', '"\\u0000"', '"\\udbff\\udfff"'],
    ]
)
KEY = st.sampled_from(["docId", "provider", "metadata", "endpoints"]) | st.text(max_size=6)


def _array(items: list[str]) -> str:
    return "[" + ",".join(items) + "]"


def _object(pairs: list[tuple[str, str]]) -> str:
    return "{" + ",".join(f"{json.dumps(k)}: {v}" for k, v in pairs) + "}"


JSON_VALUE = st.recursive(
    SCALAR,
    lambda kids: (
        st.lists(kids, max_size=4).map(_array)
        | st.lists(st.tuples(KEY, kids), max_size=4).map(_object)
    ),
    max_leaves=8,
)
DEEP = st.integers(1, 3000).map(lambda n: "[" * n + "]" * n)
FIELD = st.one_of(
    st.tuples(st.just("docId"), NEAR_ID.map(json.dumps) | SCALAR),
    st.tuples(
        st.just("provider"),
        st.sampled_from(['"xosum"', '"aitronos"', '"main"', "null", '"nope"', "3", "[]"])
        | LONG.map(json.dumps),
    ),
    st.tuples(
        st.just("metadata"),
        st.lists(st.tuples(st.text(max_size=6), JSON_VALUE | DEEP), max_size=3).map(_object)
        | JSON_VALUE,
    ),
    st.tuples(
        st.just("endpoints"),
        st.sampled_from(['["app"]', '["audit", "app", "audit"]', "[]", "null", '"app"', "[1]"])
        | LONG.map(lambda t: json.dumps(["app", t])),
    ),
    st.tuples(st.text(max_size=6) | LONG, SCALAR),  # an unknown field, now and then
)
# Mostly submission-shaped (a valid docId first, then fields that may repeat it, spoil it or add
# to it), so that a good share of inputs is accepted and the deep checks are reached.
SUBMISSION = st.builds(
    lambda first, rest: _object([first, *rest]),
    st.tuples(st.just("docId"), ID.map(json.dumps)),
    st.lists(FIELD, max_size=3),
)
# a valid job whose metadata holds edge values: to be refused, or kept exactly
EDGY = st.builds(
    lambda doc_id, values: _object([("docId", json.dumps(doc_id)), ("metadata", _object(values))]),
    ID,
    st.lists(st.tuples(st.text(max_size=3), EDGE | JSON_VALUE), min_size=1, max_size=3),
)
DOCUMENT = st.one_of(
    SUBMISSION,
    EDGY,
    st.lists(SUBMISSION, min_size=1, max_size=4).map(_array),
    st.lists(SUBMISSION | JSON_VALUE, max_size=3).map(_array),
    JSON_VALUE,
    DEEP,
)
PADDING = st.sampled_from(["", " ", "\n", "\r\n\t ", "\ufeff", "\u2028", "\x0c"])
JSON_TEXT = st.builds(lambda pad, doc, tail: pad + doc + tail, PADDING, DOCUMENT, PADDING)
LINE = st.one_of(ID, ID.map(lambda i: f"  {i}\t"), NEAR_ID, st.just(""), st.just("# a comment"))
TEXT_FILE = st.builds(
    lambda lines, sep, bom: ("\ufeff" if bom else "") + sep.join(lines),
    st.lists(LINE, min_size=1, max_size=6),
    st.sampled_from(["\n", "\r\n", "\r", "\x1c", "\u2028"]),
    st.booleans(),
)
NOISE = st.sampled_from(
    [b"\x00", b"\xff", b"\xc3", b'"', b"{", b"}", b"[", b"]", b",", b":", b"\n", b"#", b" ",
     b"\\", b"/", b"\xef\xbb\xbf", b"NaN", b"\xe2\x80\xa8", b"\\ud800", b"1" * 4400]
)  # fmt: skip


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid body with a few bytes inserted, deleted or cut off."""
    data = bytearray(draw(SUBMISSION | TEXT_FILE).encode())
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data)))
        how = draw(st.sampled_from(["insert", "delete", "cut"]))
        if how == "insert":
            data[at:at] = draw(NOISE | st.binary(min_size=1, max_size=3))
        elif how == "delete":
            del data[at : at + draw(st.integers(1, 4))]
        else:
            del data[at:]
    return bytes(data)


@st.composite
def body(draw: st.DrawFn) -> bytes:
    """Random bytes 10 %, text files 15 %, JSON documents 35 %, valid jobs with edge values in
    their metadata 20 %, mutated valid bodies 20 %."""
    pick = draw(st.integers(0, 99))
    if pick < 10:
        raw: bytes = draw(st.binary(max_size=64))
        return raw
    if pick < 25:
        text: str = draw(TEXT_FILE)
        return text.encode()
    if pick < 60:
        doc: str = draw(JSON_TEXT)
        return doc.encode()
    if pick < 80:
        return draw(EDGY).encode()
    return draw(mutated())


BODY = body()

# -- the oracle: an independent reading of SPEC §3 ------------------------------------------------


def _strict(name: str) -> None:
    raise ValueError(f"{name} is not JSON")  # RFC 8259 has no NaN nor Infinity


def ids_in(data: bytes, *, spool: bool) -> list[str] | None:
    """The job ids a body names, read straight from the spec: JSON (an object or a list of them)
    or, in the spool only, one id per line. None when it is plainly not a submission."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = None
    if spool and text is not None and not text.lstrip().startswith(("{", "[")):
        # Lines as str.splitlines reads them (\r, \x1c, U+2028 end a line too); no id can hold
        # one of those, so this only decides between refusing and taking the ids around it.
        lines = [line.strip() for line in text.splitlines()]
        return [line for line in lines if line and not line.startswith("#")]
    if spool and text is None:
        return None  # the spool reads UTF-8 only
    try:
        # an HTTP body goes to json.loads as bytes (which also takes UTF-16 and UTF-32)
        doc = json.loads(text if spool and text is not None else data, parse_constant=_strict)
    except (ValueError, TypeError, RecursionError):
        return None
    items = doc if isinstance(doc, list) else [doc]
    if not items or not all(isinstance(i, dict) and "docId" in i for i in items):
        return None
    return [i["docId"] for i in items]


def check_outcome(data: bytes, outcome: list[Submission] | IntakeError, *, spool: bool) -> None:
    """Taken whole, every id exactly as written; or refused with a short, printable reason."""
    named = ids_in(data, spool=spool)
    if isinstance(outcome, IntakeError):
        reason = str(outcome)
        assert reason.strip(), "a refusal without a reason"
        assert len(reason) <= REASON_CHARS, f"a {len(reason)}-char reason"
        reason.encode("utf-8")  # strict: it goes into a JSON answer and a NAME.error file
        return
    assert outcome, "accepted with no job in it"
    # what is taken is stored, answered and delivered as standard JSON
    json.dumps([s.metadata for s in outcome], allow_nan=False)
    assert len(data) <= MAX_BYTES
    assert named is not None, "accepted something that is not a submission"
    assert [s.doc_id for s in outcome] == named
    for s in outcome:
        assert isinstance(s.doc_id, str)
        assert JOB_ID.fullmatch(s.doc_id)
        assert s.provider in CATALOG.providers
        assert s.endpoints is None or set(s.endpoints) <= CATALOG.endpoints


def spool_outcome(data: bytes) -> list[Submission] | IntakeError:
    try:
        return parse_bytes(data, CATALOG)
    except IntakeError as exc:
        return exc


def api_outcome(data: bytes, catalog: Any = CATALOG) -> list[Submission] | IntakeError:
    """What the API does with a body (api.Api.submit): load_json, then parse_json."""
    try:
        return parse_json(load_json(data), catalog)
    except IntakeError as exc:
        return exc


# -- the parser ----------------------------------------------------------------------------------


@PARSER
@given(data=BODY)
def test_any_bytes_are_taken_whole_or_refused_with_a_reason(data: bytes) -> None:
    """Bytes as a spool file and as an API body: all ids exactly as written, or a short reason;
    a JSON object or list gets the same answer from both (one parser for both intakes)."""
    spool, api = spool_outcome(data), api_outcome(data)
    check_outcome(data, spool, spool=True)
    check_outcome(data, api, spool=False)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return  # the spool refuses what is not UTF-8; json.loads also reads UTF-16 and -32
    if text.lstrip().startswith(("{", "[")):  # else the spool reads it as lines of text
        # (the reasons may differ: the spool refuses a NUL byte before reading JSON)
        assert isinstance(spool, IntakeError) == isinstance(api, IntakeError), (spool, api)
        assert isinstance(spool, IntakeError) or spool == api


METADATA = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([10**300, -(10**4299)])  # long, and just under the 4300-digit limit
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6),
    lambda kids: (
        st.lists(kids, max_size=2) | st.dictionaries(st.text(max_size=4), kids, max_size=2)
    ),
    max_leaves=3,
)
GOOD = st.builds(
    Submission,
    doc_id=ID,
    provider=st.sampled_from(sorted(CATALOG.providers)),
    metadata=st.none() | st.dictionaries(st.text(max_size=4), METADATA, max_size=2),
    endpoints=st.none()
    | st.lists(st.sampled_from(["app", "audit"]), min_size=1, max_size=4).map(tuple),
)


def as_json(sub: Submission) -> dict[str, Any]:
    obj: dict[str, Any] = {"docId": sub.doc_id, "provider": sub.provider}
    if sub.metadata is not None:
        obj["metadata"] = sub.metadata
    if sub.endpoints is not None:
        obj["endpoints"] = list(sub.endpoints)
    return obj


@PARSER
@given(
    subs=st.lists(GOOD, min_size=1, max_size=3),
    as_list=st.booleans(),
    indent=st.none() | st.integers(0, 3),
    ascii_only=st.booleans(),
    bom=st.booleans(),
)
def test_valid_submissions_round_trip_exactly(
    subs: list[Submission], as_list: bool, indent: int | None, ascii_only: bool, bom: bool
) -> None:
    """Valid jobs, however the JSON is laid out, come back with the same id, provider, metadata
    and endpoints (repeats dropped); their ids alone, one per line, come back as written."""
    doc = [as_json(s) for s in subs] if as_list or len(subs) > 1 else as_json(subs[0])
    data = ("\ufeff" if bom else "").encode() + json.dumps(
        doc, indent=indent, ensure_ascii=ascii_only
    ).encode()
    expected = [
        Submission(
            s.doc_id,
            s.provider,
            s.metadata,
            tuple(dict.fromkeys(s.endpoints)) if s.endpoints is not None else None,
        )
        for s in subs
    ]
    assert parse_bytes(data, CATALOG) == expected
    assert api_outcome(data) == expected
    lines = "\r\n".join(f"# {i}\n  {s.doc_id} \n" for i, s in enumerate(subs))
    assert [s.doc_id for s in parse_bytes(lines.encode(), CATALOG)] == [s.doc_id for s in subs]


# -- the live API --------------------------------------------------------------------------------


@asynccontextmanager
async def live(
    tmp_path: Path, provider: mock_provider.MockProvider, receiver: Receiver
) -> AsyncIterator[tuple[Daemon, aiohttp.ClientSession]]:
    """A fresh daemon (its own state directory: one per hypothesis example) and a keep-alive
    client session on its unix socket."""
    where = Path(tempfile.mkdtemp(dir=tmp_path, prefix="d"))
    config = make_config(config_dict(where, provider.port, {"app": receiver.port}), where)
    socket = config.settings.socket
    assert socket is not None
    async with (
        running(config) as daemon,
        aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(socket))) as session,
    ):
        yield daemon, session
        async with session.get("http://relayd/healthz") as resp:
            assert resp.status == 200, await resp.text()
        assert integrity_check(daemon.config.settings.state_dir / "relayd.db") == "ok"


async def call(
    session: aiohttp.ClientSession, method: str, url: str | URL, data: bytes | None = None
) -> tuple[int, Any]:
    """One request; a dropped connection or a non-JSON answer fails the test."""
    sent = io.BytesIO(data) if data is not None else None  # big bytes would warn
    async with session.request(method, url, data=sent) as resp:
        body = await resp.read()
        assert resp.content_type == "application/json", (resp.status, body[:200])
        return resp.status, json.loads(body)


def job_total(daemon: Daemon) -> int:
    return sum(sum(per.values()) for per in daemon.store.job_counts().values())


OVERSIZE = (1, 4096)  # bytes over MAX_BYTES: drawn as a count, built in the test (short repr)


def oversize(over: int) -> bytes:
    return b'[{"docId": "big", "metadata": {"x": "' + b"x" * (MAX_BYTES + over) + b'"}}]'


LIVE_JOB = st.fixed_dictionaries(  # valid for the test daemon: provider "main", endpoint "app"
    {"docId": ID},
    optional={
        "provider": st.sampled_from(["main", None]),
        "metadata": st.dictionaries(st.text(max_size=5), METADATA, max_size=3),
        "endpoints": st.lists(st.just("app"), min_size=1, max_size=2),
    },
)
VALID_BODY = (LIVE_JOB | st.lists(LIVE_JOB, min_size=1, max_size=5)).map(
    lambda doc: json.dumps(doc).encode()
)


@st.composite
def api_body(draw: st.DrawFn) -> bytes | int:
    """40 % valid, 30 % submission-shaped, the rest anything, 2 % over the size cap (drawn as
    the excess only, so that a failing example prints short)."""
    pick = draw(st.integers(0, 99))
    if pick < 40:
        return draw(VALID_BODY)
    if pick < 70:
        return draw(SUBMISSION).encode()
    if pick < 98:
        return draw(BODY)
    return draw(st.sampled_from(OVERSIZE))


@LIVE
@given(bodies=st.lists(api_body(), min_size=40, max_size=40))
async def test_live_api_takes_bodies_whole_or_refuses_them(
    tmp_path: Path,
    provider: mock_provider.MockProvider,
    receiver: Receiver,
    bodies: list[bytes | int],
) -> None:
    """POST /v1/jobs: 202 with every id as sent (each then found), or 400/413 with a reason and
    nothing stored; never a 500 nor a dropped connection; healthy and consistent afterwards."""
    async with live(tmp_path, provider, receiver) as (daemon, session):
        known: set[str] = set()
        for drawn in bodies:
            body = oversize(drawn) if isinstance(drawn, int) else drawn
            before = job_total(daemon)
            sent_as = f"for body {body[:300]!r}"
            status, answer = await call(session, "POST", "http://relayd/v1/jobs", body)
            expected = api_outcome(body, daemon.catalog()) if len(body) <= MAX_BYTES else None
            if expected is None:
                assert status == 413 and "too large" in answer["error"], sent_as
            elif isinstance(expected, IntakeError):
                assert (status, answer) == (400, {"error": str(expected)}), sent_as
            else:
                assert status == 202, (answer, sent_as)
                sent = [s.doc_id for s in expected]
                assert [j["docId"] for j in answer["jobs"]] == sent, sent_as
                firsts = [i not in known and i not in sent[:n] for n, i in enumerate(sent)]
                assert [j["created"] for j in answer["jobs"]] == firsts, sent_as
                known.update(sent)
                for doc_id in dict.fromkeys(sent):
                    # "." and ".." are ids, but a URL path segment must spell them %2E
                    segment = doc_id.replace(".", "%2E") if doc_id in (".", "..") else doc_id
                    url = URL(f"http://relayd/v1/jobs/main/{segment}", encoded=True)
                    assert (await call(session, "GET", url))[1]["job"]["docId"] == doc_id
            if status != 202:
                assert answer["error"].strip()
                assert job_total(daemon) == before, f"a refused body stored something {sent_as}"
        assert job_total(daemon) == len(known)


SEGMENT = st.one_of(  # as sent: percent-encoded, or raw oddities
    ID,
    st.text(max_size=20).map(lambda t: urllib.parse.quote(t, safe="")),
    st.binary(max_size=12).map(lambda b: urllib.parse.quote_from_bytes(b, safe="")),
    st.sampled_from([".", "..", "%", "%zz", "%2F", "%2e%2e", "%00", "%ff", "%C3", "a" * 300, "~"]),
)
QUERY_KEY = st.sampled_from(["state", "provider", "limit", "x", ""]) | st.text(max_size=4)
QUERY_VALUE = st.one_of(
    st.sampled_from(["polling", "done", "", "0", "1", "10000", "10001", "-1", "1e3", "0x10"]),
    st.sampled_from(["9" * 30, "9" * 5000, "\uff11\uff12", "1_0", " 5 ", "NaN", "main", "\x00"]),
    st.text(max_size=10),
)
REQUEST = st.one_of(
    st.tuples(st.sampled_from(["GET", "DELETE"]), SEGMENT, SEGMENT),
    st.tuples(st.just("POST"), SEGMENT, SEGMENT),  # .../redeliver
    st.tuples(st.just("LIST"), st.lists(st.tuples(QUERY_KEY, QUERY_VALUE), max_size=4)),
)


@LIVE
@given(requests=st.lists(REQUEST, min_size=40, max_size=40))
async def test_live_api_lookups_never_fail_on_odd_paths_or_queries(
    tmp_path: Path,
    provider: mock_provider.MockProvider,
    receiver: Receiver,
    requests: list[tuple[Any, ...]],
) -> None:
    """Any path segments for GET/DELETE/redeliver and any query for GET /v1/jobs: a JSON answer,
    never a 500; the daemon stays healthy and the store consistent."""
    async with live(tmp_path, provider, receiver) as (_, session):
        status, _ = await call(
            session, "POST", "http://relayd/v1/jobs", json.dumps([{"docId": "a"}]).encode()
        )
        assert status == 202
        for request in requests:
            if request[0] == "LIST":
                query = urllib.parse.urlencode(request[1])
                url = URL(f"http://relayd/v1/jobs?{query}", encoded=True)
                status, answer = await call(session, "GET", url)
                assert status in (200, 400), (request, answer)
                continue
            method, provider_name, doc_id = request
            path = f"/v1/jobs/{provider_name}/{doc_id}"
            if method == "POST":
                path += "/redeliver"
            status, answer = await call(session, method, URL("http://relayd" + path, encoded=True))
            assert status in (200, 202, 400, 404, 405, 409), (request, status, answer)
            if status >= 400:
                assert isinstance(answer["error"], str) and answer["error"].strip()
