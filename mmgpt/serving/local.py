"""The app of one ModelService on uvicorn in a thread of this process, on a free localhost port: what the tests and
the HTTP-overhead benchmark query (Ray Serve runs the same app in each replica)."""
from __future__ import annotations

import socket
import threading
import time

from mmgpt.serving.app import build_app
from mmgpt.serving.service import ModelService


class LocalServer:
    def __init__(self, service: ModelService, start_timeout_s: float = 30.0):
        import uvicorn
        self.service = service
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(build_app(service), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + start_timeout_s
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the local server did not start within {start_timeout_s} s")
            time.sleep(0.05)

    def stop(self, drain_s: float = 5.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.service.shutdown(drain_s)
