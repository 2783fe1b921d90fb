"""relayd's errors: one root, grouped by who must act, the docstring as the default message."""

from __future__ import annotations

import inspect

import pytest

from relayd import errors


def test_every_error_has_one_root() -> None:
    """Every exception class relayd defines descends from RelaydError."""
    classes = [
        c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == errors.__name__
    ]
    assert len(classes) >= 12
    assert all(issubclass(c, errors.RelaydError) for c in classes)


@pytest.mark.parametrize(
    ("error", "group"),
    [
        (errors.StoreError, errors.Unavailable),
        (errors.SharedBudgetUnavailable, errors.Unavailable),
        (errors.Retryable, errors.ProviderError),
        (errors.NotFound, errors.ProviderError),
        (errors.Unauthorized, errors.ProviderError),
        (errors.RateLimited, errors.ProviderError),
        (errors.NotReady, errors.ProviderError),
        (errors.IntakeError, ValueError),
    ],
)
def test_errors_are_grouped_by_who_must_act(error: type[Exception], group: type[Exception]) -> None:
    assert issubclass(error, group)


def test_the_docstring_is_the_default_message() -> None:
    """Raised bare, an error says its docstring's first paragraph, on one line."""
    assert str(errors.StoreError()) == (
        "The database cannot take the change (disk full, read-only, locked for too long)."
    )
    assert str(errors.ProviderError()) == "The poll did not produce an answer about the job."
    assert str(errors.StoreError("disk I/O error")) == "disk I/O error"


def test_config_error_keeps_every_problem() -> None:
    error = errors.ConfigError(["a.b: bad", "c: missing (required)"])
    assert error.problems == ["a.b: bad", "c: missing (required)"]
    assert str(error) == "a.b: bad\nc: missing (required)"
    assert errors.ConfigError("one").problems == ["one"]


def test_rate_limited_carries_retry_after() -> None:
    assert errors.RateLimited("HTTP 429", 7.5).retry_after == 7.5
