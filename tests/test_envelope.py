"""Intake validation: a file or body is taken whole or refused whole, with a reason a person can
act on; nothing but IntakeError ever comes out of it."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relayd.errors import IntakeError
from relayd.intake.envelope import MAX_BYTES, Catalog, check_job_id, parse_bytes, parse_json
from relayd.models import Submission

CATALOG = Catalog(
    providers=frozenset({"xosum", "aitronos"}),
    endpoints=frozenset({"app", "audit"}),
    default_provider="xosum",
)
NO_DEFAULT = Catalog(
    providers=frozenset({"xosum", "aitronos"}),
    endpoints=frozenset({"app"}),
    default_provider=None,
)
ID_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.:-"
PROPERTY = settings(max_examples=150, deadline=None, derandomize=True)


def sub(
    doc_id: str,
    provider: str = "xosum",
    metadata: dict[str, Any] | None = None,
    endpoints: tuple[str, ...] | None = None,
) -> Submission:
    return Submission(doc_id, provider, metadata, endpoints)


GOOD: list[tuple[str, bytes, list[Submission]]] = [
    ("one-line", b"abc\n", [sub("abc")]),
    ("no-final-newline", b"abc", [sub("abc")]),
    ("crlf", b"a\r\nb\r\n", [sub("a"), sub("b")]),
    ("comments-blanks-spaces", b"# batch 7\n\n  a-1  \n\t\nb.2\n", [sub("a-1"), sub("b.2")]),
    ("bom-text", b"\xef\xbb\xbfabc\n", [sub("abc")]),
    ("all-punctuation", b"A_b-c.d:e9\n", [sub("A_b-c.d:e9")]),
    ("longest-id", b"x" * 200, [sub("x" * 200)]),
    ("json-object", b'{"docId": "a"}', [sub("a")]),
    ("json-leading-space", b'  \n{"docId": "a"}', [sub("a")]),
    ("bom-json", b'\xef\xbb\xbf[{"docId": "a"}]', [sub("a")]),
    (
        "json-all-fields",
        b'{"docId": "a", "provider": "aitronos", "metadata": {"k": [1]}, "endpoints": ["audit"]}',
        [sub("a", "aitronos", {"k": [1]}, ("audit",))],
    ),
    ("json-null-provider", b'{"docId": "a", "provider": null}', [sub("a")]),
    ("json-null-endpoints", b'{"docId": "a", "endpoints": null}', [sub("a")]),
    (
        "json-endpoints-deduplicated",
        b'{"docId": "a", "endpoints": ["audit", "app", "audit"]}',
        [sub("a", endpoints=("audit", "app"))],
    ),
    ("json-list", b'[{"docId": "a"}, {"docId": "b"}]', [sub("a"), sub("b")]),
]


@pytest.mark.parametrize(("data", "expected"), [g[1:] for g in GOOD], ids=[g[0] for g in GOOD])
def test_good_input(data: bytes, expected: list[Submission]) -> None:
    """Accepted spool files and bodies give exactly these submissions, in order."""
    assert parse_bytes(data, CATALOG) == expected


BAD: list[tuple[str, bytes, str]] = [
    ("too-large", b"a\n" * (MAX_BYTES // 2 + 1), f"too large: {MAX_BYTES + 2} bytes"),
    ("nul-byte", b"abc\x00\n", "binary content (NUL byte)"),
    ("latin-1", b"ab\xe9\n", "not UTF-8 text: invalid byte at offset 2"),
    ("empty", b"", "no job id in it"),
    ("only-comments", b"# nothing\n\n   \n", "no job id in it"),
    ("slash", b"good-1\n\n# x\nbad/id\n", "line 4: invalid job id 'bad/id'"),
    ("inner-space", b"has space\n", "line 1: invalid job id 'has space' (9 chars)"),
    ("too-long", b"x" * 201, "(201 chars)"),
    ("long-id-shown-short", b"y" * 5000, "'" + "y" * 57 + "...' (5000 chars)"),
    ("json-string-is-a-line", b'"abc"', "invalid job id '\"abc\"'"),
    ("malformed-json", b'{"docId": "a",', "malformed JSON: Expecting property name"),
    ("malformed-json-position", b'[\n{"docId": }]', "at line 2 column 11"),
    (
        "float-overflow",  # json.loads makes it inf, which json.dumps writes as Infinity
        b'{"docId": "a", "metadata": {"x": -1e999}}',
        "malformed JSON: number out of range: '-1e999'",
    ),
    ("empty-list", b"[]", "empty list: no job id in it"),
    ("list-of-numbers", b"[1, 2]", "[0]: expected an object, got a number"),
    ("list-of-lists", b"[[]]", "[0]: expected an object, got a list"),
    ("missing-docid", b'{"provider": "xosum"}', "job: docId is required"),
    ("docid-number", b'{"docId": 12345}', "job.docId: docId must be a string, got a number"),
    ("docid-bool", b'{"docId": true}', "docId must be a string, got a boolean"),
    ("docid-null", b'{"docId": null}', "docId must be a string, got null"),
    ("docid-empty", b'{"docId": ""}', "invalid job id '' (0 chars)"),
    ("unknown-field", b'{"docId": "a", "callback": "http://x"}', "job: unknown field 'callback'"),
    ("unknown-provider", b'{"docId": "a", "provider": "nope"}', "unknown provider 'nope'"),
    ("provider-number", b'{"docId": "a", "provider": 3}', "job.provider: expected a string"),
    ("metadata-list", b'{"docId": "a", "metadata": [1]}', "job.metadata: expected an object"),
    ("endpoints-empty", b'{"docId": "a", "endpoints": []}', "expected a non-empty list"),
    ("endpoints-string", b'{"docId": "a", "endpoints": "app"}', "expected a non-empty list"),
    ("endpoint-number", b'{"docId": "a", "endpoints": [1]}', "endpoints[0]: expected a string"),
    (
        "endpoint-unknown",
        b'{"docId": "a", "endpoints": ["app", "nope"]}',
        "endpoints[1]: unknown endpoint 'nope' (known: app, audit)",
    ),
    ("second-item-bad", b'[{"docId": "a"}, {"docId": "b/"}]', "[1].docId: invalid job id 'b/'"),
]


@pytest.mark.parametrize(("data", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_refused_with_a_reason(data: bytes, message: str) -> None:
    """Each refusal names the problem (and where it is)."""
    with pytest.raises(IntakeError) as info:
        parse_bytes(data, CATALOG)
    assert message in str(info.value)


def test_text_without_default_provider_is_refused() -> None:
    """A plain-text file names no provider, so it needs default_provider."""
    with pytest.raises(IntakeError, match="no provider named and no default_provider"):
        parse_bytes(b"abc\n", NO_DEFAULT)


def test_json_without_provider_and_no_default_names_the_known_ones() -> None:
    """Without a default, a JSON job must name a provider; the message lists the known ones."""
    with pytest.raises(IntakeError, match=r"\[0\]\.provider: .*known: aitronos, xosum"):
        parse_bytes(b'[{"docId": "a"}]', NO_DEFAULT)
    assert parse_bytes(b'{"docId": "a", "provider": "aitronos"}', NO_DEFAULT) == [
        sub("a", "aitronos")
    ]


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ("abc", "expected a JSON object or a list of objects, got a string"),
        (None, "got null"),
        (3.5, "got a number"),
        (True, "got a boolean"),
    ],
)
def test_parse_json_refuses_non_documents(doc: object, message: str) -> None:
    """An API body that is not an object or a list is refused by type."""
    with pytest.raises(IntakeError, match=message):
        parse_json(doc, CATALOG)


def test_parse_json_keeps_metadata_as_given() -> None:
    """Metadata is passed through untouched for the delivered body."""
    meta = {"user": 7, "tags": ["a", "b"], "nested": {"x": None}}
    assert parse_json({"docId": "a", "metadata": meta}, CATALOG) == [sub("a", metadata=meta)]


@pytest.mark.parametrize("value", ["a", "A-b_c.d:e", "9" * 200])
def test_check_job_id_accepts(value: str) -> None:
    """Ids of 1-200 letters, digits and _ - . : pass unchanged."""
    assert check_job_id(value, "docId") == value


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "docId: invalid job id '' (0 chars)"),
        ("a/b", "invalid job id 'a/b'"),
        ("a\nb", "invalid job id 'a\\nb'"),
        ("é", "invalid job id 'é'"),
        ("../etc", "invalid job id '../etc'"),
        (7, "docId: docId must be a string, got a number"),
        (["a"], "got a list"),
    ],
)
def test_check_job_id_refuses(value: object, message: str) -> None:
    """Anything outside the id alphabet, or not a string, is refused with the value shown."""
    with pytest.raises(IntakeError) as info:
        check_job_id(value, "docId")
    assert message in str(info.value)


# -- properties ----------------------------------------------------------------------------------

IDS = st.lists(st.text(ID_ALPHABET, min_size=1, max_size=200), min_size=1, max_size=20)


@PROPERTY
@given(data=st.binary(max_size=2000))
def test_arbitrary_bytes_raise_only_intake_error(data: bytes) -> None:
    """Whatever lands in the spool, the parser accepts it or raises IntakeError."""
    with contextlib.suppress(IntakeError):
        parse_bytes(data, CATALOG)


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["docId", "provider", "metadata", "endpoints", "x"]),
            children,
            max_size=4,
        )
    ),
    max_leaves=12,
)


@PROPERTY
@given(doc=JSONISH)
def test_arbitrary_json_raises_only_intake_error(doc: object) -> None:
    """Any decoded JSON document, as bytes or as an API body, is accepted or refused cleanly."""
    with contextlib.suppress(IntakeError):
        parse_json(doc, CATALOG)
    with contextlib.suppress(IntakeError):
        parse_bytes(_dump(doc), CATALOG)


def _dump(doc: object) -> bytes:
    return json.dumps(doc).encode()


def test_deeply_nested_json_is_refused() -> None:
    """A file of 100 000 '[' (well under MAX_BYTES) is refused as IntakeError, not a crash."""
    with pytest.raises(IntakeError):
        parse_bytes(b"[" * 100_000, CATALOG)


def test_huge_integer_in_metadata_is_refused() -> None:
    """A number longer than Python's int-conversion limit is refused as IntakeError."""
    data = b'{"docId": "a", "metadata": {"n": ' + b"1" * 5000 + b"}}"
    with pytest.raises(IntakeError):
        parse_bytes(data, CATALOG)


@PROPERTY
@given(ids=IDS, crlf=st.booleans(), final_newline=st.booleans())
def test_ids_round_trip_as_text_lines(ids: list[str], crlf: bool, final_newline: bool) -> None:
    """Valid ids written one per line come back exactly, in order."""
    sep = "\r\n" if crlf else "\n"
    text = sep.join(ids) + (sep if final_newline else "")
    assert [s.doc_id for s in parse_bytes(text.encode(), CATALOG)] == ids


@PROPERTY
@given(ids=IDS)
def test_ids_round_trip_as_json(ids: list[str]) -> None:
    """Valid ids written as a JSON list (and each as a single object) come back exactly."""
    data = json.dumps([{"docId": i} for i in ids]).encode()
    assert [s.doc_id for s in parse_bytes(data, CATALOG)] == ids
    for i in ids:
        assert parse_bytes(json.dumps({"docId": i}).encode(), CATALOG) == [sub(i)]


BAD_CHARS = st.sampled_from(["/", " ", "é", "\t", '"', "'", "*", "?", "\\", "#", "@"])


@PROPERTY
@given(ids=IDS, where=st.integers(0, 20), bad=BAD_CHARS, too_long=st.booleans())
def test_one_bad_line_rejects_the_whole_file(
    ids: list[str], where: int, bad: str, too_long: bool
) -> None:
    """A single invalid id anywhere refuses the file, naming that line; nothing is taken."""
    where = min(where, len(ids))
    wrong = "x" * 201 if too_long else "ok" + bad + "ok"
    lines = [*ids[:where], wrong, *ids[where:]]
    with pytest.raises(IntakeError) as info:
        parse_bytes("\n".join(lines).encode(), CATALOG)
    assert str(info.value).startswith(f"line {where + 1}: invalid job id")


@PROPERTY
@given(ids=IDS, where=st.integers(0, 20), bad=BAD_CHARS)
def test_one_bad_item_rejects_the_whole_json_list(ids: list[str], where: int, bad: str) -> None:
    """A single invalid id in a JSON list refuses the list, naming its index."""
    where = min(where, len(ids))
    items = [{"docId": i} for i in ids]
    items.insert(where, {"docId": "ok" + bad + "ok"})
    with pytest.raises(IntakeError) as info:
        parse_bytes(json.dumps(items).encode(), CATALOG)
    assert str(info.value).startswith(f"[{where}].docId: invalid job id")
