"""Site time limits read from a job ad as HTCondor writes it."""
from __future__ import annotations

import time

import pytest

from ckpt_tasks.jobenv.htcondor import read_job_ad
from ckpt_tasks.jobenv.limits import DEFAULT_WALLTIME_ATTRIBUTES, SiteLimits, parse_attribute_list, read_site_limits


def ad(tmp_path, text):
    path = tmp_path / ".job.ad"
    path.write_text(text)
    return read_job_ad(path)


def test_the_earliest_limit_wins_counted_from_the_current_start(tmp_path):
    limits = read_site_limits(ad(tmp_path, "JobCurrentStartDate = 1000\nMaxRuntime = 7200\n"
                                           "RequestRuntime = 3600\nAllowedExecuteDuration = 5000\n"),
                              process_start=1005.0)
    assert limits.deadline == 4600 and limits.source == "RequestRuntime"
    assert limits.stop_at(margin=600) == 4000


def test_executing_date_is_preferred_to_start_date(tmp_path):
    limits = read_site_limits(ad(tmp_path, "JobCurrentStartDate = 1000\nJobCurrentStartExecutingDate = 1030\n"
                                           "RequestWalltime = 100\n"), process_start=1040.0)
    assert limits.deadline == 1130


def test_without_a_start_date_the_process_start_is_the_clock(tmp_path):
    limits = read_site_limits(ad(tmp_path, "MaxRuntime = 60\n"), process_start=500.0)
    assert limits.deadline == 560


def test_no_limits_and_no_ad(tmp_path):
    assert read_site_limits(None) == SiteLimits()
    limits = read_site_limits(ad(tmp_path, "ClusterId = 3\n"))
    assert limits.deadline is None and limits.stop_at() is None
    assert "no site time limit" in limits.describe()


def test_site_names_are_configurable(tmp_path):
    job = ad(tmp_path, "JobCurrentStartDate = 1\nMaxRuntime = 100\nMySiteLimit = 50\n")
    assert read_site_limits(job, parse_attribute_list("+MySiteLimit"), process_start=2.0).deadline == 51
    assert read_site_limits(job, parse_attribute_list("MaxRuntime"), process_start=2.0).deadline == 101
    assert parse_attribute_list("") == DEFAULT_WALLTIME_ATTRIBUTES
    with pytest.raises(ValueError, match="walltime_attributes"):
        parse_attribute_list("Max Runtime; rm")


def test_the_shorter_vacate_time_bounds_the_stop_deadline(tmp_path):
    limits = read_site_limits(ad(tmp_path, "JobMaxVacateTime = 120\nMachineMaxVacateTime = 600\n"))
    assert limits.vacate_time == 120
    assert limits.stop_deadline(300) == pytest.approx(108)
    assert SiteLimits().stop_deadline(300) == 300


def test_values_that_are_not_seconds_are_ignored(tmp_path):
    limits = read_site_limits(ad(tmp_path, 'JobCurrentStartDate = 1\nMaxRuntime = "soon"\nRequestRuntime = -1\n'
                                           "RequestWalltime = 10\n"), process_start=2.0)
    assert limits.deadline == 11 and limits.source == "RequestWalltime"


def test_describe_names_the_source(tmp_path):
    now = time.time()
    limits = read_site_limits(ad(tmp_path, f"JobCurrentStartDate = {now:.0f}\nMaxRuntime = 3600\n"))
    assert "MaxRuntime ends the job" in limits.describe()


def test_a_limit_passed_before_this_process_started_counts_from_this_process(tmp_path):
    # A stale ad after restarts in place: counted from its start, the job would stop at once.
    job = ad(tmp_path, "JobCurrentStartDate = 1000\nAllowedExecuteDuration = 60\nMaxRuntime = 7200\n")
    limits = read_site_limits(job, process_start=5000.0)
    assert limits.deadline == 5060 and limits.source == "AllowedExecuteDuration"
    assert read_site_limits(job, process_start=1010.0).deadline == 1060
