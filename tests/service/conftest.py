"""Service fixtures: real artifacts trained on the SciFact subset the project ships, and real
uvicorn servers on loopback ports (a pre-bound socket, so no port races), talked to with httpx."""

from __future__ import annotations

import contextlib
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn

from service.app import create_app
from service.http_limits import in_process_config
from service.settings import Settings
from tests.conftest import DEMO_DATA, clustered  # noqa: F401 - DEMO_DATA: imported from here by the service tests

TOKEN = "test-admin-token-0123"


@pytest.fixture
def root_copy(artifact_root, tmp_path) -> Path:
    """A private copy of the root for tests that add, corrupt or re-point artifacts."""
    dst = tmp_path / "root"
    shutil.copytree(artifact_root, dst)
    return dst


class Server:
    """The app under uvicorn with the same config `jointpq serve` builds (protocol, timeouts,
    limits), in a thread of this process so tests can read its state."""

    def __init__(self, settings: Settings):
        self.app = create_app(settings)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(in_process_config(settings, self.app))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        with contextlib.suppress(OSError):
            self.sock.close()


@pytest.fixture
def serve() -> Iterator:
    """serve(root, **settings) -> a started Server; all stopped at teardown."""
    started: list[Server] = []

    def start(root: Path, **kw) -> Server:
        kw.setdefault("device", "cpu")
        kw.setdefault("admin_token", TOKEN)
        s = Server(Settings(artifact_root=root, **kw)).__enter__()
        started.append(s)
        return s

    yield start
    for s in started:
        s.__exit__(None, None, None)


@pytest.fixture(scope="session")
def queries() -> list[str]:
    from model.data import load_beir

    data = load_beir(DEMO_DATA, splits=("test",))
    return [data.queries[q] for q in sorted(data.qrels["test"])][:50]


def admin(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def client(server: Server, **kw) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=60, **kw)


def rng_vectors(n: int, d: int, seed: int = 0) -> list[list[float]]:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32).tolist()
