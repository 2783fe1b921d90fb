"""The transport a provider polls through: every request spends its key's budget, a 429 closes
the key, and no aiohttp error leaks out (a provider sees an `Answer` or a `ProviderError`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import aiohttp
from multidict import CIMultiDict

from relayd.config import ProviderConfig
from relayd.errors import RateLimited, Retryable
from relayd.keys import MAX_BLOCK, Key
from relayd.metrics import Metrics
from relayd.providers.base import Answer
from relayd.retry import parse_retry_after

log = logging.getLogger("relayd.providers")

MAX_ANSWER_BYTES = 32 * 1024 * 1024
BLANK_MIN = 12  # keys shorter than this are not blanked: they could be words of a transcript


class Upstream:
    """The `Http` a provider uses for one poll. The first request goes out on the slot the
    poll loop already took (`prepaid`); every further one waits for a slot of its own."""

    def __init__(
        self,
        *,
        session: aiohttp.ClientSession,
        key: Key,
        provider: ProviderConfig,
        slot: str | None,
        metrics: Metrics,
        max_bytes: int = MAX_ANSWER_BYTES,
    ) -> None:
        self._session = session
        self._max_bytes = max_bytes  # a longer answer is a failed poll, not a full memory
        self._key = key
        self._provider = provider
        self._metrics = metrics
        self.slot = slot  # the shared budget's grant for the prepaid request
        self.prepaid_used = False

    async def get(
        self,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        prepaid: bool = False,
    ) -> Answer:
        key, provider = self._key, self._provider
        if prepaid and not self.prepaid_used:
            self.prepaid_used = True
            slot = self.slot
        else:
            slot = await key.acquire()
        code = "error"
        sent_at = key.clock.time()
        try:
            timeout = aiohttp.ClientTimeout(total=provider.timeout)
            async with self._session.get(
                url, headers=headers, params=params, timeout=timeout, allow_redirects=False
            ) as resp:
                code = str(resp.status)
                chunks, size = [], 0
                async for chunk in resp.content.iter_chunked(65536):
                    size += len(chunk)
                    if size > self._max_bytes:
                        raise Retryable(f"answer larger than {self._max_bytes} bytes")
                    chunks.append(chunk)
                body = blank(b"".join(chunks), provider.api_key.value)
                answer = Answer(resp.status, CIMultiDict(resp.headers), body)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise Retryable(f"{type(exc).__name__}: {exc}".rstrip(": ")) from None
        finally:
            key.release(slot)
            key.requests.sent(sent_at, limited=code == "429")
            self._metrics.upstream_requests.labels(provider.name, code).inc()
        if answer.status == 429:
            self._metrics.rate_limited.labels(provider.name).inc()
            retry_after = parse_retry_after(
                answer.headers.get("Retry-After"), answer.headers.get("Date"), key.clock.time()
            )
            if retry_after is not None and retry_after > MAX_BLOCK:
                log.warning(
                    "Retry-After of %.0fs is implausible; honouring %ds",
                    retry_after,
                    MAX_BLOCK,
                    extra={"provider": provider.name},
                )
            seconds = key.block(retry_after, provider.rate_window)
            log.warning(
                "rate limited: key paused for %.3fs", seconds, extra={"provider": provider.name}
            )
            raise RateLimited("HTTP 429", retry_after)
        return answer


def blank(body: bytes, key: str) -> bytes:
    """The answer without the API key. Some APIs quote the key they refuse, and error bodies
    reach the log, the poll history and status; the key never belongs in a delivery either.
    A short key (a test key, say) might also occur in a transcript, which must arrive intact."""
    raw = key.encode()
    return body.replace(raw, b"********") if len(raw) >= BLANK_MIN and raw in body else body
