"""Hostile tests of SPEEDUP_PROCESS_EXECUTOR = "dask": a real Dask scheduler
and workers on 127.0.0.1 (tests/dask_cluster.py), real ``scrapy crawl`` runs
of the test project, each bounded in time. Destructive cases (killed
scheduler, killed workers, a stuck worker) get a cluster of their own."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Crawl, DemoSite, assert_process_stats_add_up, run_crawl
from tests.dask_cluster import DaskCluster, dask_cluster

# The machine is shared and slow (a crawl can take 40 s to start): generous
# bounds; each test still ends in bounded time.
pytestmark = [pytest.mark.subprocess, pytest.mark.timeout(420)]

PIPE = "testproj.pipelines.FaultPipeline"
READY = r"process pool on the Dask cluster at"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaskCluster]:
    with dask_cluster(tmp_path_factory.mktemp("dask-hostile")) as running:
        yield running


def _sleeps(ids: range, seconds: float) -> dict[str, str]:
    return {str(i): f"sleep:{seconds}" for i in ids}


def _wait_for_running_tasks(cluster: DaskCluster, crawl: Crawl, count: int,
                            timeout: float = 150) -> None:
    """Wait until the scheduler says *count* tasks are running on workers."""
    deadline = time.monotonic() + timeout
    with cluster._client() as client:
        while time.monotonic() < deadline:
            running = sum(len(keys) for keys in client.processing().values())
            if running >= count:
                return
            assert crawl.process.poll() is None, crawl.log_file.read_text()[-3000:]
            time.sleep(0.2)
    raise AssertionError(f"fewer than {count} tasks running after {timeout} s:\n"
                         + crawl.log_file.read_text()[-3000:])


# -- a task that never returns ------------------------------------------------------


def test_a_task_past_its_timeout_does_not_hang_the_crawl_at_close(
        demo_site: DemoSite, tmp_path: Path) -> None:
    """Item 3 never returns (sleeps 600 s). SPEEDUP_PROCESS_TIMEOUT_SECONDS
    fails it after 2 s; the rest of the crawl finishes; the crawl then closes
    the pipelines on every worker. The stuck Dask worker still runs item 3
    (Dask cannot stop it) and holds the crawl's plugin lock: the close must
    not wait for it past SPEEDUP_SHUTDOWN_TIMEOUT_SECONDS."""
    with dask_cluster(tmp_path / "cluster", workers=2) as own:
        began = time.monotonic()
        result = run_crawl(tmp_path, settings={
            **own.settings, "SPEEDUP_PROCESS_PIPELINES": PIPE,
            "TEST_FAULTS": {"3": "sleep:600"},
            "SPEEDUP_PROCESS_TIMEOUT_SECONDS": 10,
            "SPEEDUP_SHUTDOWN_TIMEOUT_SECONDS": 3,
        }, args={"site": demo_site.url, "count": 10}, timeout=240)
        took = time.monotonic() - began
    assert result.returncode == 0, result.log[-5000:]
    assert sorted(item["id"] for item in result.items) == [i for i in range(10) if i != 3]
    assert result.stat("speedup/process/timeout_count") == 1
    assert_process_stats_add_up(result)
    # Start-up, 10 s of timeout, 3 s to close the workers' pipelines.
    assert took < 200, (took, result.log[-3000:])


# -- Ctrl-C -------------------------------------------------------------------------


def test_ctrl_c_once_with_tasks_stuck_on_the_cluster_exits_in_bounded_time(
        demo_site: DemoSite, tmp_path: Path) -> None:
    """Every item sleeps 600 s on the workers; Ctrl-C once: after
    SPEEDUP_SHUTDOWN_TIMEOUT_SECONDS the tasks are abandoned (counted) and
    the crawl exits, although the workers still run them."""
    with dask_cluster(tmp_path / "cluster", workers=2) as own:
        crawl = Crawl(tmp_path, settings={
            **own.settings, "SPEEDUP_PROCESS_PIPELINES": PIPE,
            "TEST_FAULTS": _sleeps(range(6), 600),
            "SPEEDUP_SHUTDOWN_TIMEOUT_SECONDS": 3,
        }, args={"site": demo_site.url, "count": 6})
        _wait_for_running_tasks(own, crawl, 2)
        crawl.interrupt()
        began = time.monotonic()
        result = crawl.result(timeout=150)
        took = time.monotonic() - began
    assert result.returncode == 0, result.log[-5000:]
    assert result.stats.get("finish_reason") == "shutdown", result.log[-3000:]
    assert result.stat("speedup/process/abandoned_count") >= 1
    assert_process_stats_add_up(result)
    # 3 s to give up, 3 s for the workers' close, and slack for a busy machine.
    assert took < 60, (took, result.log[-3000:])
    assert not result.alive_descendants()


def test_ctrl_c_twice_with_tasks_on_the_cluster_exits_at_once(
        demo_site: DemoSite, tmp_path: Path) -> None:
    # A cluster of its own: the shared one may still be busy with the tasks
    # of the tests before, which is not what this one is about.
    with dask_cluster(tmp_path / "cluster", workers=2) as own:
        crawl = Crawl(tmp_path, settings={
            **own.settings, "SPEEDUP_PROCESS_PIPELINES": PIPE,
            "TEST_FAULTS": _sleeps(range(6), 4),
            "SPEEDUP_SHUTDOWN_TIMEOUT_SECONDS": 20,
        }, args={"site": demo_site.url, "count": 6})
        _wait_for_running_tasks(own, crawl, 2)
        crawl.interrupt()
        crawl.wait_for_log(r"the crawl is stopping", timeout=20)
        time.sleep(0.5)
        crawl.interrupt()
        began = time.monotonic()
        result = crawl.result(timeout=150)
        took = time.monotonic() - began
    assert result.returncode != -signal.SIGKILL, result.log[-3000:]
    assert took < 10, (took, result.log[-3000:])
    assert not result.alive_descendants(grace=2)


# -- the cluster goes away ----------------------------------------------------------


def test_scheduler_killed_mid_crawl_ends_the_crawl_with_errors_counted(
        demo_site: DemoSite, tmp_path: Path) -> None:
    with dask_cluster(tmp_path / "cluster", workers=2) as own:
        crawl = Crawl(tmp_path, settings={
            **own.settings, "SPEEDUP_PROCESS_PIPELINES": PIPE,
            "SPEEDUP_DASK_CONNECT_TIMEOUT_SECONDS": 3,
            "TEST_FAULTS": _sleeps(range(20), 1),
            "SPEEDUP_SHUTDOWN_TIMEOUT_SECONDS": 5,
        }, args={"site": demo_site.url, "count": 20})
        _wait_for_running_tasks(own, crawl, 2)
        os.killpg(own.processes[0].pid, signal.SIGKILL)  # the scheduler
        result = crawl.result(timeout=180)
    assert result.returncode == 0, result.log[-5000:]
    assert result.stats.get("finish_reason") == "finished"
    assert len(result.items) < 20
    assert result.stat("speedup/process/error_count") >= 1
    assert_process_stats_add_up(result)


def test_all_workers_killed_ends_the_crawl_with_errors_counted(
        demo_site: DemoSite, tmp_path: Path) -> None:
    """Every worker and its nanny killed (none restarts): the tasks can never
    run. With SPEEDUP_PROCESS_TIMEOUT_SECONDS they fail after it, counted."""
    with dask_cluster(tmp_path / "cluster", workers=2) as own:
        crawl = Crawl(tmp_path, settings={
            **own.settings, "SPEEDUP_PROCESS_PIPELINES": PIPE,
            "TEST_FAULTS": _sleeps(range(10), 1),
            "SPEEDUP_PROCESS_TIMEOUT_SECONDS": 3,
            "SPEEDUP_SHUTDOWN_TIMEOUT_SECONDS": 3,
        }, args={"site": demo_site.url, "count": 10})
        _wait_for_running_tasks(own, crawl, 2)
        os.killpg(own.processes[1].pid, signal.SIGKILL)  # workers and nannies
        result = crawl.result(timeout=180)
    assert result.returncode == 0, result.log[-5000:]
    assert len(result.items) < 10
    assert result.stat("speedup/process/error_count") + result.stat(
        "speedup/process/timeout_count") >= 1
    assert_process_stats_add_up(result)


# -- what the tasks carry -----------------------------------------------------------


def test_unpicklable_items_and_results_are_errors_counted(
        demo_site: DemoSite, cluster: DaskCluster, tmp_path: Path) -> None:
    result = run_crawl(tmp_path, settings={
        **cluster.settings, "SPEEDUP_PROCESS_PIPELINES": PIPE,
        "TEST_FAULTS": {"5": "unpicklable_result"},
    }, args={"site": demo_site.url, "count": 10, "unpicklable": "2"})
    assert result.returncode == 0, result.log[-5000:]
    assert sorted(item["id"] for item in result.items) == [0, 1, 3, 4, 6, 7, 8, 9]
    assert result.stat("speedup/process/unpicklable_count") >= 1
    assert result.stat("speedup/process/error_count") == 2
    assert_process_stats_add_up(result)


# -- other runtimes, engine processes -----------------------------------------------


def test_reactorless_crawl_on_the_cluster(demo_site: DemoSite, cluster: DaskCluster,
                                          tmp_path: Path) -> None:
    result = run_crawl(tmp_path, runtime="reactorless", settings={
        **cluster.settings, "SPEEDUP_PROCESS_PIPELINES": PIPE,
    }, args={"site": demo_site.url, "count": 10})
    assert result.returncode == 0, result.log[-5000:]
    assert sorted(item["id"] for item in result.items) == list(range(10))
    assert {item["pid"] for item in result.items} <= cluster.worker_pids()
    assert_process_stats_add_up(result)


def test_run_in_process_from_engine_processes_on_the_cluster(
        demo_site: DemoSite, cluster: DaskCluster, tmp_path: Path) -> None:
    result = run_crawl(tmp_path, settings={
        **cluster.settings, "SPEEDUP_CRAWL_PROCESSES": 2, "TEST_PIPELINE_ENABLED": False,
        "SPEEDUP_PROCESS_INLINE_BELOW_MS": 0,
    }, args={"site": demo_site.url, "count": 20, "mode": "call"}, timeout=240)
    assert result.returncode == 0, result.log[-5000:]
    assert sorted(item["id"] for item in result.items) == list(range(20))
    pids = {item["pid"] for item in result.items}
    assert pids <= cluster.worker_pids(), pids
    assert_process_stats_add_up(result)


# -- pipelines on the workers -------------------------------------------------------


def test_open_spider_failing_on_the_workers_stops_the_crawl_clearly(
        demo_site: DemoSite, cluster: DaskCluster, tmp_path: Path) -> None:
    result = run_crawl(tmp_path, settings={
        **cluster.settings, "SPEEDUP_PROCESS_PIPELINES": PIPE, "TEST_FAIL_OPEN": True,
    }, args={"site": demo_site.url, "count": 10}, timeout=150)
    assert result.returncode != 0, result.log[-5000:]
    assert "SPEEDUP_PROCESS_PIPELINES failed to start on Dask worker" in result.log
    assert "open_spider failed on purpose" in result.log
    assert not result.items


def test_two_crawls_share_one_cluster(demo_site: DemoSite, cluster: DaskCluster,
                                      tmp_path: Path) -> None:
    crawls = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        crawls.append(Crawl(tmp_path / name, settings={
            **cluster.settings, "SPEEDUP_PROCESS_PIPELINES": PIPE,
            "TEST_MARKER_DIR": tmp_path / name,
        }, args={"site": demo_site.url, "count": 15}))
    results = [crawl.result(timeout=240) for crawl in crawls]
    for name, result in zip(("a", "b"), results, strict=True):
        assert result.returncode == 0, result.log[-5000:]
        assert sorted(item["id"] for item in result.items) == list(range(15))
        assert result.stat("test/pipeline_items") == 15
        assert_process_stats_add_up(result)
        # Each crawl opened and closed its own pipelines once per worker.
        opened = sorted(p.name for p in (tmp_path / name).glob("opened-*"))
        closed = sorted(p.name.replace("closed", "opened")
                        for p in (tmp_path / name).glob("closed-*"))
        assert opened == closed and len(opened) == 2, (opened, closed)


# -- addresses ----------------------------------------------------------------------


@pytest.mark.parametrize("spelling", ["upper", "slash", "localhost"])
def test_odd_spellings_of_a_good_address(demo_site: DemoSite, cluster: DaskCluster,
                                         tmp_path: Path, spelling: str) -> None:
    """A spelling that the settings accept must reach the cluster (or be
    refused by the settings with a clear message, not at connect time as if
    the scheduler were down)."""
    host_port = cluster.address.split("://", 1)[1]
    address = {"upper": f"TCP://{host_port}",
               "slash": f"tcp://{host_port}/",
               "localhost": f"tcp://localhost:{host_port.rsplit(':', 1)[1]}"}[spelling]
    result = run_crawl(tmp_path, settings={
        **cluster.settings, "SPEEDUP_DASK_SCHEDULER_ADDRESS": address,
        "SPEEDUP_DASK_CONNECT_TIMEOUT_SECONDS": 5,
        "SPEEDUP_PROCESS_PIPELINES": PIPE,
    }, args={"site": demo_site.url, "count": 5}, timeout=150)
    if result.returncode != 0:
        assert "SPEEDUP_DASK_SCHEDULER_ADDRESS" in result.log
        assert "could not reach the Dask scheduler" not in result.log, result.log[-3000:]
    else:
        assert sorted(item["id"] for item in result.items) == list(range(5))


# -- deadlines ------------------------------------------------------------------------


def test_a_task_waiting_in_the_clusters_queue_is_not_timed_out(
        demo_site: DemoSite, cluster: DaskCluster, tmp_path: Path) -> None:
    """SPEEDUP_PROCESS_TIMEOUT_SECONDS bounds how long a task *runs* (the
    local pool counts from the moment its worker starts it). Twelve items of
    2 s each on the two single-threaded workers: none runs past 6 s, but the
    last ones wait about 10 s in the cluster's queue before they start."""
    result = run_crawl(tmp_path, settings={
        **cluster.settings, "SPEEDUP_PROCESS_PIPELINES": PIPE,
        "TEST_FAULTS": _sleeps(range(12), 2),
        "SPEEDUP_PROCESS_TIMEOUT_SECONDS": 6,
        "SPEEDUP_PROCESS_MAX_IN_FLIGHT": 12,
    }, args={"site": demo_site.url, "count": 12}, timeout=240)
    assert result.returncode == 0, result.log[-5000:]
    assert result.stat("speedup/process/timeout_count") == 0, result.log[-3000:]
    assert sorted(item["id"] for item in result.items) == list(range(12))
    assert_process_stats_add_up(result)


def test_a_close_spider_that_never_ends_on_a_worker_is_bounded(
        demo_site: DemoSite, tmp_path: Path) -> None:
    """The workers' close_spider takes 120 s (a flush that hangs): as with
    the local pool, the crawl gives it SPEEDUP_SHUTDOWN_TIMEOUT_SECONDS (3 s)
    and ends, instead of waiting for it."""
    with dask_cluster(tmp_path / "cluster", workers=1) as own:
        crawl = Crawl(tmp_path, settings={
            **own.settings, "SPEEDUP_PROCESS_PIPELINES": PIPE,
            "TEST_CLOSE_SLEEP_S": 120, "TEST_MARKER_DIR": tmp_path,
            "SPEEDUP_SHUTDOWN_TIMEOUT_SECONDS": 3,
        }, args={"site": demo_site.url, "count": 5})
        crawl.wait_for_log(r"Closing spider \(finished\)", timeout=200)
        began = time.monotonic()
        result = crawl.result(timeout=150)
        took = time.monotonic() - began
    assert result.returncode == 0, result.log[-5000:]
    assert sorted(item["id"] for item in result.items) == list(range(5))
    assert list(tmp_path.glob("closing-*")), "close_spider never began"
    # 3 s for the close; well under the 120 s that close_spider takes.
    assert took < 60, (took, result.log[-3000:])
