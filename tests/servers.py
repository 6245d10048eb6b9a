"""Starting and stopping a server the way a user does: ``convgpt serve ENGINE DIR ...``.

Used by the engine suites, the reliability suite and the demo."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from helpers import free_port

SERVED_NAME = "convgpt"


@dataclass
class Server:
    """A running ``convgpt serve`` (the supervisor) and the server under it."""

    engine: str
    proc: subprocess.Popen
    port: int
    descendants: list[psutil.Process] = field(default_factory=list)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def server_pid(self) -> int:
        """The engine's server process (the supervisor's one child)."""
        return psutil.Process(self.proc.pid).children()[0].pid

    def remember_processes(self) -> None:
        self.descendants = psutil.Process(self.proc.pid).children(recursive=True)

    def survivors(self) -> list[psutil.Process]:
        """Processes this server started that are still alive (zombies count as gone)."""
        alive = []
        for p in self.descendants:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
        return alive

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base}/health", timeout=10) as r:
                return r.status == 200
        except OSError:
            return False

    def post(self, path: str, body, timeout: float = 300) -> tuple[int, dict | str]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as err:
            text = err.read().decode(errors="replace")
            try:
                return err.code, json.loads(text)
            except ValueError:
                return err.code, text

    def stop(self, timeout: float = 90) -> None:
        """SIGTERM to the supervisor (as Ctrl-C would), SIGKILL if it does not end."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def convgpt_command() -> list[str]:
    """The installed ``convgpt`` script of this environment."""
    script = Path(sys.executable).with_name("convgpt")
    return [str(script)] if script.exists() else [sys.executable, "-m", "convgpt"]


def start(engine: str, model: str, *args: str, timeout: float = 900, log=None) -> Server:
    """``convgpt serve ENGINE MODEL --port P ARGS``; returns once /health answers."""
    port = free_port()
    cmd = [*convgpt_command(), "serve", engine, model, "--port", str(port), "--served-model-name", SERVED_NAME, *args]
    proc = subprocess.Popen(cmd, stdout=log or sys.stderr, stderr=subprocess.STDOUT, env=dict(os.environ))
    server = Server(engine, proc, port)
    deadline = time.time() + timeout
    while not server.healthy():
        if proc.poll() is not None:
            raise RuntimeError(f"`{' '.join(cmd)}` exited with {proc.returncode} before it answered")
        if time.time() > deadline:
            server.stop()
            raise TimeoutError(f"`{' '.join(cmd)}` did not answer within {timeout:.0f} s")
        time.sleep(1)
    server.remember_processes()
    return server


def engine_args(engine: str, max_len: int = 512, embeds: bool = False) -> list[str]:
    """Options the test servers share: float32, a short context, embeddings input if asked."""
    if engine == "vllm":
        args = ["--dtype", "float32", "--max-model-len", str(max_len), "--enforce-eager", "--seed", "0"]
        return args + (["--enable-prompt-embeds"] if embeds else [])
    args = ["--dtype", "float32", "--context-length", str(max_len), "--random-seed", "0"]
    # SGLang takes input_embeds only with the radix cache off
    return args + (["--disable-radix-cache"] if embeds else [])
