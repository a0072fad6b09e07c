"""Start the real `deepserve serve` in a child process and wait for its ready line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

READY = re.compile(r"deepserve ready: url=(\S+) model=(\S+) api_key=(\S+)")


@dataclass
class RunningServer:
    process: subprocess.Popen
    base_url: str  # ends in /v1
    model: str
    api_key: str
    log_path: str

    @property
    def root_url(self) -> str:
        return self.base_url.removesuffix("/v1")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()


def start_server(
    *args: str, api_key: str | None = "sk-test-key", env: dict[str, str] | None = None, threads: int | None = 2,
    cwd: str | None = None,
) -> RunningServer:
    """Start `deepserve serve` on a free port. threads=None leaves llama.cpp's thread count at the serve default;
    `python -m deepserve` run in `cwd` imports deepserve from there (benchmarks/bench_ab.py compares checkouts)."""
    cmd = [sys.executable, "-m", "deepserve", "serve", "--port", "0"]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    cmd += args  # after the default: a test's own "--threads N" wins (the last one given does)
    if api_key:
        cmd += ["--api-key", api_key]
    log = tempfile.NamedTemporaryFile(prefix="deepserve-", suffix=".log", delete=False)
    process = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=log, text=True, env={**os.environ, **(env or {})}, cwd=cwd
    )
    for line in process.stdout:  # blocks until the server prints; pytest-timeout bounds it
        match = READY.search(line)
        if match:
            url, model, key = match.groups()
            return RunningServer(process, url, model, api_key or key, log.name)
    process.wait()
    raise RuntimeError(f"deepserve exited with {process.returncode} before it was ready:\n" + open(log.name).read())
