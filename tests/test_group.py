"""Group commit of API intake: requests that arrive together share one transaction; each is
answered with its own results once committed; a failed batch refuses only the request that
cannot be stored."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest

from relayd.errors import StoreError
from relayd.intake.group import MAX_GROUP, GroupCommit
from relayd.mock import provider as mock_provider
from relayd.mock.receiver import Receiver
from tests.conftest import api, config_dict, make_config, running


class Recorder:
    """A commit function that records its batches and refuses any batch holding 'bad'."""

    def __init__(self, error: type[Exception] = StoreError) -> None:
        self.batches: list[list[str]] = []
        self.error = error

    async def __call__(self, items: Sequence[str]) -> list[str]:
        self.batches.append(list(items))
        await asyncio.sleep(0)  # the commit is made elsewhere: the loop goes on meanwhile
        if "bad" in items:
            raise self.error("cannot store 'bad'")
        return [item.upper() for item in items]


async def test_callers_in_one_turn_share_one_commit() -> None:
    """Five callers at once: one commit of all their items, in order; each gets its own part."""
    commit = Recorder()
    group = GroupCommit(commit, (StoreError,))
    results = await asyncio.gather(*(group.add([f"a{i}", f"b{i}"]) for i in range(5)))
    assert commit.batches == [[f"{x}{i}" for i in range(5) for x in "ab"]]
    assert results == [[f"A{i}", f"B{i}"] for i in range(5)]
    assert group.commits == 1


async def test_a_shared_commit_takes_max_group_items_and_a_large_request_goes_whole() -> None:
    """Callers that come together beyond MAX_GROUP items share several commits, each request
    whole in one of them; a single request larger than that is one commit of its own."""
    commit = Recorder()
    group = GroupCommit(commit, (StoreError,))
    requests = [[f"r{i}-{j}" for j in range(100)] for i in range(6)]
    requests.insert(3, [f"big-{j}" for j in range(MAX_GROUP + 1)])
    results = await asyncio.gather(*(group.add(r) for r in requests))
    assert results == [[item.upper() for item in r] for r in requests]
    assert [len(b) for b in commit.batches] == [200, 100, MAX_GROUP + 1, 200, 100]
    assert [item for b in commit.batches for item in b] == [i for r in requests for i in r]


async def test_a_lone_caller_waits_for_no_one() -> None:
    """One caller is committed within a few turns of the loop, on its own."""
    commit = Recorder()
    group = GroupCommit(commit, (StoreError,))
    assert await asyncio.wait_for(group.add(["x"]), 0.1) == ["X"]
    assert await group.add(["y"]) == ["Y"]
    assert commit.batches == [["x"], ["y"]]


async def test_a_rolled_back_batch_refuses_only_the_caller_that_cannot_be_stored() -> None:
    """After a batch fails with a rolled-back error, each caller is tried alone."""
    commit = Recorder()
    group = GroupCommit(commit, (StoreError,))
    results = await asyncio.gather(
        group.add(["a"]), group.add(["bad", "b"]), group.add(["c"]), return_exceptions=True
    )
    assert results[0] == ["A"] and results[2] == ["C"]
    assert isinstance(results[1], StoreError)
    assert commit.batches == [["a", "bad", "b", "c"], ["a"], ["bad", "b"], ["c"]]


async def test_other_errors_reach_every_caller_without_a_retry() -> None:
    """An error that may have stored something (not a rollback) is not retried."""
    commit = Recorder(error=RuntimeError)
    group = GroupCommit(commit, (StoreError,))
    results = await asyncio.gather(group.add(["a"]), group.add(["bad"]), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    assert len(commit.batches) == 1


async def test_a_cancelled_caller_leaves_the_batch_whole() -> None:
    """A caller cancelled before the commit: its items are stored, the others answered."""
    commit = Recorder()
    group = GroupCommit(commit, (StoreError,))
    gone = asyncio.ensure_future(group.add(["gone"]))
    kept = asyncio.ensure_future(group.add(["kept"]))
    await asyncio.sleep(0)
    gone.cancel()
    assert await kept == ["KEPT"]
    assert commit.batches == [["gone", "kept"]]
    with pytest.raises(asyncio.CancelledError):
        await gone


async def test_concurrent_api_submissions_share_transactions(
    tmp_path: Path, provider: mock_provider.MockProvider, receiver: Receiver
) -> None:
    """Thirty concurrent POST /v1/jobs: fewer commits than requests, each 202 with its own jobs
    (a job sent twice is created once), every job stored."""
    config = make_config(config_dict(tmp_path, provider.port, {"app": receiver.port}), tmp_path)
    async with running(config) as daemon:
        bodies = [[{"docId": f"g{i}"}, {"docId": f"g{i + 1}"}] for i in range(30)]
        answers = await asyncio.gather(*(api(daemon, "POST", "/v1/jobs", b) for b in bodies))
        commits = daemon._api_intake.commits
        stored = {j.doc_id for j in daemon.store.list_jobs(limit=1000)}
    assert commits < len(bodies)
    created: list[str] = []
    for body, (status, answer) in zip(bodies, answers, strict=True):
        assert status == 202
        assert [j["docId"] for j in answer["jobs"]] == [b["docId"] for b in body]
        created += [j["docId"] for j in answer["jobs"] if j["created"]]
    assert sorted(created) == sorted(stored) == sorted(f"g{i}" for i in range(31))


async def test_callers_that_come_during_a_commit_share_the_next_one() -> None:
    """The loop goes on while a commit is made; whoever comes meanwhile waits for it to end and
    goes in the next commit, all together: one commit at a time, batches grow under load."""
    release, started = asyncio.Event(), asyncio.Event()
    batches: list[list[str]] = []

    async def commit(items: Sequence[str]) -> list[str]:
        batches.append(list(items))
        if len(batches) == 1:
            started.set()
            await release.wait()
        return list(items)

    group: GroupCommit[str, str] = GroupCommit(commit, (StoreError,))
    first = asyncio.ensure_future(group.add(["a"]))
    await started.wait()
    later = [asyncio.ensure_future(group.add([x])) for x in "bcd"]
    for _ in range(20):  # many turns: none of them starts a second commit
        await asyncio.sleep(0)
    assert batches == [["a"]]
    release.set()
    assert await first == ["a"]
    assert [await f for f in later] == [["b"], ["c"], ["d"]]
    assert batches == [["a"], ["b", "c", "d"]]
