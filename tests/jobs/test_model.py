from __future__ import annotations

import pytest

from mlflow_dock.jobs.model import (
    InvalidTransition,
    JobState,
    build_key,
    check_transition,
    retry_delay,
)

ALLOWED = {
    (JobState.QUEUED, JobState.RUNNING),
    (JobState.QUEUED, JobState.FAILED),
    (JobState.RUNNING, JobState.SUCCEEDED),
    (JobState.RUNNING, JobState.FAILED),
    (JobState.RUNNING, JobState.QUEUED),
    (JobState.FAILED, JobState.QUEUED),
}


@pytest.mark.parametrize("current", list(JobState))
@pytest.mark.parametrize("target", list(JobState))
def test_transition_table(current, target):
    if (current, target) in ALLOWED:
        check_transition(current, target)
    else:
        with pytest.raises(InvalidTransition):
            check_transition(current, target)


def test_build_key_separates_name_and_version():
    assert build_key("a1", "2") != build_key("a", "12")


def test_retry_delay_is_exponential_and_capped():
    assert [retry_delay(n, 5) for n in (1, 2, 3)] == [5, 10, 20]
    assert retry_delay(30, 5) == 300


def test_retry_delay_stays_capped_however_many_attempts():
    # A job waiting out a days-long outage keeps counting attempts.
    assert retry_delay(5000, 5.0, 300.0) == 300.0
