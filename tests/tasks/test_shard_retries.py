"""Extraction shards retry what a retry can mend, and only that."""
from prefect import flow, task

from transfer_flow.storage.errors import WeightsUnavailableError
from transfer_flow.tasks.stages import extracted_shard, worth_retrying


def test_a_shard_refused_for_the_users_reason_runs_once_and_a_passing_fault_is_retried(prefect_api):
    attempts = []

    @task(retries=extracted_shard.retries, retry_condition_fn=extracted_shard.retry_condition_fn)
    def shard(error: Exception) -> None:
        attempts.append(error)
        raise error

    @flow
    def extract(error: Exception):
        return shard(error, return_state=True)

    assert extracted_shard.retry_condition_fn is worth_retrying
    extract(WeightsUnavailableError("ImageNet weights for vgg16 are not cached"), return_state=True)
    assert len(attempts) == 1  # the user sees the error once, not three times
    attempts.clear()
    extract(ConnectionResetError("the worker's connection dropped"), return_state=True)
    assert len(attempts) == 1 + extracted_shard.retries
