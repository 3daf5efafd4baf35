"""The process pool on a real Dask cluster (SPEEDUP_PROCESS_EXECUTOR = "dask"):
Dask's own scheduler and worker processes on 127.0.0.1, real ``scrapy crawl``
runs of the test project."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import DemoSite, assert_process_stats_add_up, run_crawl
from tests.dask_cluster import DaskCluster, dask_cluster

pytestmark = pytest.mark.subprocess

COUNT = 30


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaskCluster]:
    with dask_cluster(tmp_path_factory.mktemp("dask")) as running:
        yield running


def _check_items(result, cluster: DaskCluster, count: int = COUNT) -> None:
    assert result.returncode == 0, result.log[-5000:]
    assert sorted(item["id"] for item in result.items) == list(range(count))
    for item in result.items:
        assert item["words"] == len(item["text"].split())
    # The work ran on the cluster's workers, not in the crawl's processes.
    pids = {item["pid"] for item in result.items}
    assert pids and pids <= cluster.worker_pids(), (pids, cluster.worker_pids())
    assert not pids & result.descendants
    assert_process_stats_add_up(result)


@pytest.mark.parametrize("runtime", ["asyncio", "epoll"])
def test_pipeline_runs_on_the_dask_workers(demo_site: DemoSite, cluster: DaskCluster,
                                           runtime: str, tmp_path: Path) -> None:
    result = run_crawl(tmp_path, runtime=runtime, settings={
        **cluster.settings,
        "SPEEDUP_PROCESS_PIPELINES": "testproj.pipelines.FaultPipeline",
        "TEST_MARKER_DIR": tmp_path,
    }, args={"site": demo_site.url, "count": COUNT})
    _check_items(result, cluster)
    assert result.stat("speedup/process/succeeded_count") == COUNT
    # Stats of the workers' pipelines, close_spider's too, are the crawl's.
    assert result.stat("test/pipeline_items") == COUNT
    opened = {p.name.split("-")[1] for p in tmp_path.glob("opened-*")}
    closed = {p.name.split("-")[1] for p in tmp_path.glob("closed-*")}
    assert opened == closed == {str(pid) for pid in cluster.worker_pids()}
    assert result.stat("test/pipeline_closed") == len(opened)
    assert f"process pool on the Dask cluster at {cluster.address}" in result.log


def test_run_in_process_on_the_dask_workers(demo_site: DemoSite, cluster: DaskCluster,
                                            tmp_path: Path) -> None:
    result = run_crawl(tmp_path, settings={
        **cluster.settings, "TEST_PIPELINE_ENABLED": False,
        "SPEEDUP_PROCESS_INLINE_BELOW_MS": 0,
    }, args={"site": demo_site.url, "count": COUNT, "mode": "call"})
    _check_items(result, cluster)


def test_errors_and_drops_are_the_local_pools(demo_site: DemoSite, cluster: DaskCluster,
                                              tmp_path: Path) -> None:
    """A pipeline that raises, or drops, on the cluster: the crawl sees the
    same exception as with the local pool, with the worker's traceback."""
    result = run_crawl(tmp_path, settings={
        **cluster.settings,
        "SPEEDUP_PROCESS_PIPELINES": "testproj.pipelines.FaultPipeline",
        "TEST_FAULTS": {"3": "raise", "5": "drop"},
    }, args={"site": demo_site.url, "count": 10})
    assert result.returncode == 0, result.log[-5000:]
    assert sorted(item["id"] for item in result.items) == [0, 1, 2, 4, 6, 7, 8, 9]
    assert result.stat("speedup/process/error_count") == 1
    assert result.stat("speedup/process/dropped_count") == 1
    assert "ValueError: bad product 3" in result.log
    assert "Traceback (most recent call last)" in result.log  # the worker's
    assert_process_stats_add_up(result)


def test_a_task_that_kills_its_worker_is_retried_then_errors(
        demo_site: DemoSite, tmp_path: Path) -> None:
    """Item 4 kills every Dask worker that runs it: Dask runs it again on
    another (allowed-failures = 1), then gives up (KilledWorker); the item
    errors, counted, and every other item is scraped. Item 7 kills its
    worker once: the retry succeeds."""
    with dask_cluster(tmp_path / "cluster", workers=2, allowed_failures=1) as cluster:
        result = run_crawl(tmp_path, settings={
            **cluster.settings,
            "SPEEDUP_PROCESS_PIPELINES": "testproj.pipelines.FaultPipeline",
            "TEST_FAULTS": {"4": "poison", "7": "kill_once"},
            "TEST_MARKER_DIR": tmp_path,
        }, args={"site": demo_site.url, "count": 12}, timeout=120)
    assert result.returncode == 0, result.log[-5000:]
    assert sorted(item["id"] for item in result.items) == [i for i in range(12) if i != 4]
    assert result.stat("speedup/process/worker_crash_count") == 1
    assert result.stat("speedup/process/error_count") == 1
    assert "WorkerCrashedError" in result.log and "allowed-failures" in result.log
    assert_process_stats_add_up(result)


def test_tls_on_loopback(demo_site: DemoSite, tmp_path: Path) -> None:
    with dask_cluster(tmp_path / "cluster", workers=1, tls=True) as cluster:
        assert cluster.address.startswith("tls://127.0.0.1:")
        result = run_crawl(tmp_path, settings={
            **cluster.settings,
            "SPEEDUP_PROCESS_PIPELINES": "testproj.pipelines.FaultPipeline",
        }, args={"site": demo_site.url, "count": 10})
        assert result.returncode == 0, result.log[-5000:]
        assert sorted(item["id"] for item in result.items) == list(range(10))
        # The same cluster without the certificates: refused by the settings.
        plain = cluster.settings
        for key in ("SPEEDUP_DASK_TLS_CA_FILE", "SPEEDUP_DASK_TLS_CERT_FILE",
                    "SPEEDUP_DASK_TLS_KEY_FILE"):
            plain.pop(key)
        (tmp_path / "plain").mkdir()
        refused = run_crawl(tmp_path / "plain", settings={
            **plain, "SPEEDUP_PROCESS_PIPELINES": "testproj.pipelines.FaultPipeline",
        }, args={"site": demo_site.url, "count": 10})
    assert refused.returncode != 0
    assert "is a TLS address: set SPEEDUP_DASK_TLS_CA_FILE" in refused.log
    assert not refused.items


def test_plain_tcp_to_another_host_is_refused(demo_site: DemoSite, tmp_path: Path) -> None:
    result = run_crawl(tmp_path, settings={
        "SPEEDUP_PROCESS_EXECUTOR": "dask",
        "SPEEDUP_DASK_SCHEDULER_ADDRESS": "tcp://192.0.2.10:8786",
        "SPEEDUP_PROCESS_PIPELINES": "testproj.pipelines.FaultPipeline",
    }, args={"site": demo_site.url, "count": 5})
    assert result.returncode != 0
    assert "sends pickles in clear to another machine" in result.log
    assert "SPEEDUP_DASK_INSECURE_ALLOW_PLAIN_TCP" in result.log
    assert not result.items


def test_an_unreachable_scheduler_stops_the_crawl_with_its_address(
        demo_site: DemoSite, tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = run_crawl(tmp_path, settings={
        "SPEEDUP_PROCESS_EXECUTOR": "dask",
        "SPEEDUP_DASK_SCHEDULER_ADDRESS": f"tcp://127.0.0.1:{port}",
        "SPEEDUP_DASK_CONNECT_TIMEOUT_SECONDS": 2,
        "SPEEDUP_PROCESS_PIPELINES": "testproj.pipelines.FaultPipeline",
    }, args={"site": demo_site.url, "count": 5}, timeout=60)
    assert result.returncode != 0, result.log[-3000:]
    assert f"could not reach the Dask scheduler at tcp://127.0.0.1:{port}" in result.log
    assert not result.items
