"""Start a real jaxserve server process on a free 127.0.0.1 port and wait until it is ready."""
import os
import socket
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def start_server(args: list[str], timeout: float = 300, vllm_spelling: bool = False):
    """-> (process, base_url). The process's stdout is a pipe (text). vllm_spelling starts it as
    `python -m jaxserve.entrypoints.openai.api_server` instead of `jaxserve serve`."""
    port = free_port()
    entry = ["-m", "jaxserve.entrypoints.openai.api_server"] if vllm_spelling else ["-m", "jaxserve", "serve"]
    proc = subprocess.Popen([sys.executable] + entry + ["--port", str(port)] + args,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("server exited:\n" + proc.stdout.read())
        try:
            if httpx.get(base + "/ready", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise RuntimeError("server did not become ready")
