from __future__ import annotations

from datetime import UTC, datetime

from mlflow_dock.jobs.model import Job, JobKind, JobState
from mlflow_dock.jobs.reconcile import plan
from mlflow_dock.mlflow.client import ModelVersionInfo

T0 = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
MS = int(T0.timestamp() * 1000)


def mv(name, version, created_ms=MS + 1000, status="READY"):
    return ModelVersionInfo(name, version, None, None, status, created_ms)


def job(kind=JobKind.BUILD, state=JobState.SUCCEEDED, version="1", permanent=False, alias=None):
    return Job(
        id="j",
        kind=kind,
        model_name="m",
        version=version,
        state=state,
        permanent=permanent,
        alias=alias,
    )


def test_versions_without_jobs_are_queued():
    assert plan([mv("m", "1"), mv("m", "2")], [], {("m", "1"): job()}, {}, since=None).builds == [
        ("m", "2")
    ]


def test_in_progress_and_succeeded_are_left_alone():
    builds = {("m", "1"): job(state=JobState.RUNNING), ("m", "2"): job(state=JobState.QUEUED)}
    assert plan([mv("m", "1"), mv("m", "2")], [], builds, {}, since=None).builds == []


def test_transient_failures_get_another_chance_permanent_ones_do_not():
    builds = {
        ("m", "1"): job(state=JobState.FAILED, permanent=False),
        ("m", "2"): job(state=JobState.FAILED, permanent=True),
    }
    assert plan([mv("m", "1"), mv("m", "2")], [], builds, {}, since=None).builds == [("m", "1")]


def test_since_limits_to_newer_versions_and_pending_registrations_wait():
    versions = [
        mv("m", "1", created_ms=MS - 1),
        mv("m", "2"),
        mv("m", "3", status="PENDING_REGISTRATION"),
    ]
    assert plan(versions, [], {}, {}, since=T0).builds == [("m", "2")]


def test_aliases_are_requeued_when_missing_or_moved():
    versions = [mv("m", "1"), mv("m", "2")]
    aliases = [("m", "champion", "2"), ("m", "staging", "1"), ("m", "old", "1")]
    ops = {
        ("m", "champion"): job(JobKind.ALIAS, version="1", alias="champion"),  # moved since
        ("m", "staging"): job(JobKind.ALIAS, version="1", alias="staging"),  # up to date
    }
    assert plan(versions, aliases, {}, ops, since=None).aliases == [
        ("m", "champion", "2"),
        ("m", "old", "1"),
    ]
