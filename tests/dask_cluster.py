"""A real Dask cluster for the tests: Dask's own ``dask scheduler`` and
``dask worker`` commands on 127.0.0.1, on free ports, in a temp dir; plain
TCP or TLS with a self-signed certificate made here with openssl."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import PROJECT, REPO

_BIN = Path(sys.executable).parent


@dataclass
class DaskCluster:
    address: str
    directory: Path
    env: dict[str, str]
    #: (CA, certificate, key) for a TLS cluster.
    tls: tuple[str, str, str] | None = None
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def settings(self) -> dict[str, object]:
        """The crawl's settings to use this cluster."""
        settings: dict[str, object] = {"SPEEDUP_PROCESS_EXECUTOR": "dask",
                                       "SPEEDUP_DASK_SCHEDULER_ADDRESS": self.address,
                                       "SPEEDUP_DASK_CONNECT_TIMEOUT_SECONDS": 20}
        if self.tls is not None:
            ca, cert, key = self.tls
            settings.update({"SPEEDUP_DASK_TLS_CA_FILE": ca, "SPEEDUP_DASK_TLS_CERT_FILE": cert,
                             "SPEEDUP_DASK_TLS_KEY_FILE": key})
        return settings

    def _client(self):  # type: ignore[no-untyped-def]
        from distributed import Client
        from distributed.security import Security

        security = None
        if self.tls is not None:
            ca, cert, key = self.tls
            security = Security(tls_ca_file=ca, tls_client_cert=cert, tls_client_key=key,
                                require_encryption=True)
        return Client(self.address, security=security, timeout=20, set_as_default=False)

    def worker_pids(self) -> set[int]:
        """The pids of the processes that run tasks (not their nannies)."""
        with self._client() as client:
            return set(client.run(os.getpid).values())

    def wait_for_workers(self, count: int, timeout: float = 60) -> None:
        with self._client() as client:
            client.wait_for_workers(count, timeout=timeout)


def _self_signed(directory: Path) -> tuple[str, str, str]:
    """One certificate for 127.0.0.1, its own CA: scheduler, workers and
    the crawl all present it (as Dask's own tests do)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return str(cert_file), str(cert_file), str(key_file)


@contextlib.contextmanager
def dask_cluster(directory: Path, *, workers: int = 2, tls: bool = False,
                 allowed_failures: int = 1) -> Iterator[DaskCluster]:
    """A scheduler and *workers* worker processes (each under a nanny, which
    restarts it if it dies), with the test project importable."""
    directory.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{PROJECT}{os.pathsep}{REPO}",
           "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": str(allowed_failures),
           # A worker then holds only the task it runs: when it dies, only
           # that task is suspected (docs/usage/deployment.rst).
           "DASK_DISTRIBUTED__SCHEDULER__WORKER_SATURATION": "1.0"}
    security: list[str] = []
    certs = None
    if tls:
        certs = _self_signed(directory)
        ca, cert, key = certs
        security = ["--tls-ca-file", ca, "--tls-cert", cert, "--tls-key", key]
    scheduler_file = directory / "scheduler.json"
    cluster = DaskCluster("", directory, env, certs)
    try:
        cluster.processes.append(subprocess.Popen(
            [str(_BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", "0",
             "--no-dashboard", "--scheduler-file", str(scheduler_file),
             *(["--protocol", "tls"] if tls else []), *security],
            cwd=directory, env=env, stdout=subprocess.DEVNULL,
            stderr=open(directory / "scheduler.log", "wb"), process_group=0,
        ))
        deadline = time.monotonic() + 60
        while not scheduler_file.exists() or not scheduler_file.read_text().strip():
            if time.monotonic() > deadline or cluster.processes[0].poll() is not None:
                raise RuntimeError("the Dask scheduler did not start:\n"
                                   + (directory / "scheduler.log").read_text()[-3000:])
            time.sleep(0.05)
        cluster.address = json.loads(scheduler_file.read_text())["address"]
        cluster.processes.append(subprocess.Popen(
            [str(_BIN / "dask"), "worker", cluster.address, "--nworkers", str(workers),
             "--nthreads", "1", "--no-dashboard", "--host", "127.0.0.1", *security],
            cwd=directory, env=env, stdout=subprocess.DEVNULL,
            stderr=open(directory / "workers.log", "wb"), process_group=0,
        ))
        cluster.wait_for_workers(workers)
        yield cluster
    finally:
        for process in cluster.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
