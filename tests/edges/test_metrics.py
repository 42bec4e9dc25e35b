"""carod.edges.metrics: each job state change counts where docs/operations.md says (pure, no broker)."""

from __future__ import annotations

import pytest

from carod.edges.metrics import Metrics
from carod.holdcodes import HoldCode
from carod.states import REQUEUED, RUN_ENDS, JobState


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_the_life_of_a_job_is_counted() -> None:
    metrics = Metrics()
    metrics.job_state(JobState.RECEIVED, {})
    metrics.job_state(JobState.RUNNING, {"start_latency_s": 0.004})
    metrics.job_state(JobState.EXITED, {"duration_s": 1.5})
    assert value(metrics, "carod_jobs_received_total") == 1
    assert value(metrics, "carod_jobs_started_total") == 1
    assert value(metrics, "carod_jobs_completed_total") == 1
    assert value(metrics, "carod_job_start_latency_seconds_count") == 1
    assert value(metrics, "carod_job_run_seconds_sum") == pytest.approx(1.5)


def test_held_jobs_are_counted_by_their_hold_code() -> None:
    metrics = Metrics()
    metrics.job_state(JobState.HELD, {"code": int(HoldCode.JOB_DURATION_EXCEEDED)})
    metrics.job_state(JobState.HELD, {"code": 9999})
    assert value(metrics, "carod_jobs_held_total", code="job_duration_exceeded") == 1
    assert value(metrics, "carod_jobs_held_total", code="9999") == 1


@pytest.mark.parametrize("state", list(REQUEUED))
def test_every_state_that_requeues_counts_its_reason(state: JobState) -> None:
    metrics = Metrics()
    metrics.job_state(state, {})
    assert value(metrics, "carod_jobs_requeued_total", reason=REQUEUED[state]) == 1


@pytest.mark.parametrize("state", sorted(RUN_ENDS))
def test_every_end_of_a_run_observes_how_long_it_ran(state: JobState) -> None:
    metrics = Metrics()
    metrics.job_state(state, {"duration_s": 2.0, "code": 0})
    assert value(metrics, "carod_job_run_seconds_count") == 1


def test_states_that_are_only_logged_count_nothing() -> None:
    metrics = Metrics()
    for state in (JobState.WAITING, JobState.ADOPTED, JobState.RESEND, JobState.INTERRUPTED, JobState.DUPLICATE):
        metrics.job_state(state, {"duration_s": 1.0})
    counted = [
        sample
        for family in metrics.registry.collect()
        for sample in family.samples
        if sample.value and not sample.name.endswith("_created")
    ]
    assert counted == []
