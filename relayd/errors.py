"""Every error relayd raises on purpose, under one root and split by who must act.

Modelled on procrastinate's `exceptions.py`: a class's docstring is its default message, so
`raise StoreError()` still says something useful, and `except RelaydError` catches them all.

- the operator: `ConfigError` (fix the config), `CliError` (a command could not do it);
- the submitter: `IntakeError` (fix the submission);
- nobody, relayd waits and retries on its own: `Unavailable` (`StoreError`,
  `SharedBudgetUnavailable`);
- the provider's answer, which the poll loop turns into a retry, a pause or an end:
  `ProviderError` and its kinds.
"""

from __future__ import annotations

from collections.abc import Iterable


class RelaydError(Exception):
    """relayd could not do what was asked."""

    def __init__(self, message: str | None = None) -> None:
        default = " ".join((self.__doc__ or "").strip().split("\n\n")[0].split())
        super().__init__(message or default)


# -- the operator must act -------------------------------------------------------------------


class ConfigError(RelaydError):
    """The config is unusable; `problems` lists every problem, each naming its TOML path."""

    def __init__(self, problems: str | Iterable[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class CliError(RelaydError):
    """A command failed: reported in one line, exit 1."""


# -- the submitter must act ------------------------------------------------------------------


class IntakeError(RelaydError, ValueError):
    """The submission is refused; the message says why, for a person."""


# -- relayd waits and retries by itself ------------------------------------------------------


class Unavailable(RelaydError):
    """Something relayd depends on cannot be used now; relayd tries again on its own."""


class StoreError(Unavailable):
    """The database cannot take the change (disk full, read-only, locked for too long)."""


class SharedBudgetUnavailable(Unavailable):
    """Redis cannot be reached or answered an error: nothing is sent on its keys meanwhile."""


# -- what the provider answered --------------------------------------------------------------


class ProviderError(RelaydError):
    """The poll did not produce an answer about the job.

    `status`: what the provider said of the job before the poll failed (a `completed` whose
    paragraphs could not be read), so the job's history shows the last status actually seen.
    """

    status: str | None = None


class Retryable(ProviderError):
    """5xx, timeout, connection error, garbage body: poll again later with backoff."""


class NotFound(ProviderError):
    """The provider does not know the job (404)."""


class Unauthorized(ProviderError):
    """401/403: the API key is wrong; pause every job on that key."""

    def __init__(self, message: str, http_status: int | None = None) -> None:
        super().__init__(message)
        self.http_status = http_status


class RateLimited(ProviderError):
    """429: the key's budget is closed; `retry_after` seconds (None: until the next window)."""

    def __init__(self, message: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NotReady(ProviderError):
    """The provider says the job is done, but the rest of its result is not there yet."""
