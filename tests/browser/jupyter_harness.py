"""Start and stop an isolated JupyterLab server for browser tests.

The server listens on 127.0.0.1 only, on a free port, behind a random token.
Every folder that Jupyter, IPython or Chromium would otherwise create under
the home folder points into the server's own temporary folder, so a test run
neither reads nor changes the user's Jupyter set-up.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"

# JupyterLab shows a "get notified about Jupyter news" box over the notebook,
# and `LabApp.news_url=None` does not stop it (jupyterlab 4.6.6). These
# settings do, and they also stop the update check, which needs the internet.
NOTIFICATION_SETTINGS = {"fetchNews": "false", "checkForUpdates": False}


@dataclass
class JupyterConfig:
    """Settings of one test server.

    Attributes:
        root_dir: Folder that the server serves, holding the notebooks.
        work_dir: Empty folder for Jupyter's config, data, runtime and
            settings folders, and the server log.
        start_timeout_s: Seconds to wait for `/api/status` to respond.
        stop_timeout_s: Seconds to wait for the process to exit after
            `/api/shutdown` before it is killed.
    """

    root_dir: Path
    work_dir: Path
    start_timeout_s: float = 60.0
    stop_timeout_s: float = 15.0


@dataclass
class JupyterServer:
    """A running JupyterLab server started by `start_server`.

    Attributes:
        process: The server process, leader of its own process group.
        port: TCP port on 127.0.0.1.
        token: Token that every request must carry.
        log_path: File that receives the server's stdout and stderr.
        env: Environment of the server; browsers started for it reuse the
            isolated home folders.
    """

    process: subprocess.Popen
    port: int
    token: str
    log_path: Path
    env: dict[str, str] = field(repr=False)

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def url(self, path: str) -> str:
        """Return the URL of `path` on this server, with the token attached."""
        separator = "&" if "?" in path else "?"
        return f"{self.base_url}/{path.lstrip('/')}{separator}token={self.token}"

    def log_tail(self, max_chars: int = 4000) -> str:
        """Return the end of the server log, for failure messages."""
        if not self.log_path.exists():
            return "(no server log)"
        return self.log_path.read_text(errors="replace")[-max_chars:]


def find_free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def isolated_env(work_dir: Path) -> dict[str, str]:
    """Build an environment whose Jupyter, IPython and XDG folders lie in `work_dir`.

    Args:
        work_dir: Folder that receives one subfolder per setting.

    Returns:
        A copy of `os.environ` with the folder variables replaced.
    """
    env = dict(os.environ)
    folders = {
        "JUPYTER_CONFIG_DIR": "jupyter_config",
        "JUPYTER_DATA_DIR": "jupyter_data",
        "JUPYTER_RUNTIME_DIR": "jupyter_runtime",
        "JUPYTERLAB_SETTINGS_DIR": "lab_settings",
        "JUPYTERLAB_WORKSPACES_DIR": "lab_workspaces",
        "IPYTHONDIR": "ipython",
        "XDG_CONFIG_HOME": "xdg_config",
        "XDG_CACHE_HOME": "xdg_cache",
        "XDG_DATA_HOME": "xdg_data",
    }
    for variable, name in folders.items():
        folder = work_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        env[variable] = str(folder)

    # A JUPYTER_PATH or JUPYTER_PLATFORM_DIRS from the caller would add or move
    # the folders searched for kernels and lab extensions.
    env.pop("JUPYTER_PATH", None)
    env.pop("JUPYTER_PLATFORM_DIRS", None)
    return env


def write_lab_settings(settings_dir: Path) -> None:
    """Write user settings that turn off JupyterLab's news and update checks."""
    plugin_dir = settings_dir / "@jupyterlab" / "apputils-extension"
    plugin_dir.mkdir(parents=True, exist_ok=True)
    settings_file = plugin_dir / "notification.jupyterlab-settings"
    settings_file.write_text(json.dumps(NOTIFICATION_SETTINGS, indent=2))


def server_command(config: JupyterConfig, port: int, token: str) -> list[str]:
    """Build the command line of a JupyterLab server bound to 127.0.0.1."""
    command = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        f"--ServerApp.ip={HOST}",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--ServerApp.root_dir={config.root_dir}",
        f"--IdentityProvider.token={token}",
        "--ServerApp.allow_remote_access=False",
        "--ServerApp.open_browser=False",
        "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.handlers.announcements.NeverCheckForUpdate",
        "--ServerApp.terminals_enabled=False",
    ]

    # CI containers run as root, which Jupyter Server rejects without this flag.
    if os.geteuid() == 0:
        command.append("--allow-root")
    return command


def request_json(server: JupyterServer, path: str, method: str = "GET", timeout_s: float = 5.0) -> dict:
    """Send one request to the server's REST API and decode the JSON reply.

    Raises:
        urllib.error.URLError: The server did not respond or returned an error.
    """
    request = urllib.request.Request(
        f"{server.base_url}/{path.lstrip('/')}",
        method=method,
        headers={"Authorization": f"token {server.token}"},
        data=b"" if method == "POST" else None,
    )
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        body = response.read()
    return json.loads(body) if body else {}


def wait_until_ready(server: JupyterServer, timeout_s: float) -> None:
    """Poll `/api/status` until the server responds.

    Raises:
        RuntimeError: The server exited before it responded.
        TimeoutError: The server did not respond within `timeout_s` seconds.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"JupyterLab exited with code {server.process.returncode} before it responded to /api/status. "
                f"Server log:\n{server.log_tail()}"
            )
        try:
            request_json(server, "api/status", timeout_s=2.0)
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.25)

    raise TimeoutError(
        f"JupyterLab on port {server.port} did not respond to /api/status within {timeout_s:.0f} s. "
        f"Server log:\n{server.log_tail()}"
    )


def start_server(config: JupyterConfig) -> JupyterServer:
    """Start JupyterLab on 127.0.0.1 and wait until its REST API responds.

    Args:
        config: Folders and timeouts of the server.

    Returns:
        The running server. Call `stop_server` on it in a `finally` block.

    Raises:
        RuntimeError: The server exited during start-up.
        TimeoutError: The server did not respond in time. It is stopped first.
    """
    env = isolated_env(config.work_dir)
    write_lab_settings(Path(env["JUPYTERLAB_SETTINGS_DIR"]))

    port = find_free_port()
    token = secrets.token_hex(24)
    log_path = config.work_dir / "jupyterlab.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            server_command(config, port, token),
            cwd=config.root_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = JupyterServer(process=process, port=port, token=token, log_path=log_path, env=env)
    logger.info("started JupyterLab, pid %d, port %d", process.pid, port)

    try:
        wait_until_ready(server, config.start_timeout_s)
    except BaseException:
        stop_server(server, config.stop_timeout_s)
        raise
    return server


def stop_server(server: JupyterServer, timeout_s: float = 15.0) -> None:
    """Shut the server and its kernels down, killing them if they hang.

    A POST to `/api/shutdown` lets the server stop its kernels. If the server
    does not exit within `timeout_s` seconds, its process group (the server
    and the kernels it started) receives SIGTERM and then SIGKILL.
    """
    if server.process.poll() is None:
        try:
            request_json(server, "api/shutdown", method="POST")
        except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
            logger.warning("POST /api/shutdown to port %d failed: %s", server.port, error)

    try:
        server.process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        logger.warning("JupyterLab pid %d did not exit within %.0f s, sending SIGTERM then SIGKILL", server.process.pid, timeout_s)
        kill_process_group(server.process, timeout_s)

    # Kernels that outlived the server are still in its process group.
    try:
        os.killpg(server.process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    logger.info("stopped JupyterLab, pid %d", server.process.pid)


def kill_process_group(process: subprocess.Popen, timeout_s: float) -> None:
    """Send SIGTERM, then SIGKILL, to the process group that `process` leads."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=timeout_s)
            return
        except subprocess.TimeoutExpired:
            continue
