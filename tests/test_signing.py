"""Signatures checked by the official Standard Webhooks library, as a receiver would check them."""

from __future__ import annotations

import base64
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from relayd.signing import decode_secret, sign

OLD = "whsec_" + base64.b64encode(b"old-secret-32-bytes-long-enough!").decode()
NEW = "whsec_" + base64.b64encode(b"new-secret-that-replaces-the-old").decode()
OTHER = "whsec_" + base64.b64encode(b"a-secret-nobody-signed-with-1234").decode()
BODY = b'{"event_type":"transcript_ready","docId":"doc-1","text":"h\xc3\xa9llo"}'
MSG_ID = "msg_0123456789abcdef0123456789abcdef"


def headers(msg_id: str, timestamp: int, signature: str) -> dict[str, str]:
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature,
    }


def test_reference_vector() -> None:
    """The signature matches the Standard Webhooks specification's published example."""
    secret = decode_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    got = sign([secret], "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}')
    assert got == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_decode_secret_with_and_without_prefix() -> None:
    """`whsec_` + base64 and bare base64 decode to the same key bytes."""
    raw = b"\x00\x01binary key\xff"
    encoded = base64.b64encode(raw).decode()
    assert decode_secret("whsec_" + encoded) == raw
    assert decode_secret(encoded) == raw


@pytest.mark.parametrize("bad", ["whsec_not base64!", "whsec_a", "***"])
def test_decode_secret_refuses_invalid_base64(bad: str) -> None:
    """A secret that is not valid base64 is refused, not silently truncated."""
    with pytest.raises(ValueError):
        decode_secret(bad)


def test_signature_verifies_with_the_official_library() -> None:
    """A receiver using the standardwebhooks package accepts relayd's signature."""
    ts = int(time.time())
    signature = sign([decode_secret(NEW)], MSG_ID, ts, BODY)
    assert signature.startswith("v1,")
    assert " " not in signature
    payload = Webhook(NEW).verify(BODY, headers(MSG_ID, ts, signature))
    assert payload["docId"] == "doc-1"


def test_rotation_signs_with_every_secret() -> None:
    """Two secrets give two `v1,` signatures; a receiver holding either one verifies."""
    ts = int(time.time())
    signature = sign([decode_secret(OLD), decode_secret(NEW)], MSG_ID, ts, BODY)
    parts = signature.split(" ")
    assert len(parts) == 2
    assert all(p.startswith("v1,") for p in parts)
    assert parts[0] != parts[1]
    for secret in (OLD, NEW):
        Webhook(secret).verify(BODY, headers(MSG_ID, ts, signature))
    with pytest.raises(WebhookVerificationError):
        Webhook(OTHER).verify(BODY, headers(MSG_ID, ts, signature))


@pytest.mark.parametrize(
    ("body", "msg_id", "ts_shift"),
    [
        (BODY.replace(b"doc-1", b"doc-2"), MSG_ID, 0),
        (BODY + b" ", MSG_ID, 0),
        (BODY, MSG_ID + "x", 0),
        (BODY, MSG_ID, 1),
    ],
    ids=["tampered-body", "appended-byte", "other-id", "other-timestamp"],
)
def test_tampering_fails_verification(body: bytes, msg_id: str, ts_shift: int) -> None:
    """Changing the body, the webhook-id or the timestamp breaks the signature."""
    ts = int(time.time())
    signature = sign([decode_secret(OLD), decode_secret(NEW)], MSG_ID, ts, BODY)
    with pytest.raises(WebhookVerificationError):
        Webhook(NEW).verify(body, headers(msg_id, ts + ts_shift, signature))


@settings(max_examples=50, deadline=None, derandomize=True)
@given(
    key=st.binary(min_size=1, max_size=64),
    msg_id=st.from_regex(r"msg_[A-Za-z0-9]{1,40}", fullmatch=True),
    text=st.text(st.characters(exclude_categories=["Cs"]), max_size=200),
)
def test_any_body_and_key_verify(key: bytes, msg_id: str, text: str) -> None:
    """For any key, id and UTF-8 body, the official verifier accepts the signature."""
    body = text.encode()
    ts = int(time.time())
    secret = "whsec_" + base64.b64encode(key).decode()
    signature = sign([decode_secret(secret)], msg_id, ts, body)
    Webhook(secret).verify(body, headers(msg_id, ts, signature), json_parse=False)


def test_unpadded_secrets_are_accepted_like_the_reference_library() -> None:
    """A whsec_ secret without '=' padding decodes, as standardwebhooks itself allows."""
    assert decode_secret("whsec_YWI") == b"ab"
