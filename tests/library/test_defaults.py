"""The constants defaults.py writes out by hand agree with their sources."""

from taskman.api import task_manager_pb2
from taskman.defaults import JOB_STATUS_NAMES, JOB_STATUS_PREFIX
from taskman.task import JobStatus


def test_job_status_names_follow_the_enum_and_the_proto():
    assert JOB_STATUS_NAMES == tuple(JOB_STATUS_PREFIX + status.name for status in JobStatus)
    assert JOB_STATUS_NAMES == tuple(task_manager_pb2.JobStatus.Name(number)
                                     for number in range(len(JOB_STATUS_NAMES)))
