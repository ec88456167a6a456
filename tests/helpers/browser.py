"""A real headless Chromium, driven over the DevTools protocol (for luigid's web page).

Debian's ``chromium`` runs with ``--remote-debugging-port``; the protocol is JSON over a
WebSocket, spoken here with tornado's client (a luigi dependency, so no browser driver
package is needed). Only what the tests use: open a page, wait for a JavaScript condition,
run JavaScript (a click), read the DOM, take a PNG screenshot.
"""
from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    """The Chromium executable on PATH, or None."""
    for name in CANDIDATES:
        if path := shutil.which(name):
            return path
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Browser:
    """One headless Chromium with one page; a context manager that ends the browser."""

    def __init__(self, executable: str, width: int = 1280, height: int = 800, timeout: float = 60.0):
        self.timeout = timeout
        self._profile = tempfile.mkdtemp(prefix="chromium-profile-")
        port = _free_port()
        self.process = subprocess.Popen(
            [executable, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", f"--user-data-dir={self._profile}", f"--remote-debugging-port={port}",
             "--remote-debugging-address=127.0.0.1", f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._ws_url = self._page_socket(port)
        self._next_id = 0
        from tornado.ioloop import IOLoop

        self._loop = IOLoop(make_current=False)
        self._ws = self._loop.run_sync(self._connect, timeout=timeout)

    def _page_socket(self, port: int) -> str:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.process.returncode}: "
                                   f"{self.process.stderr.read().decode(errors='replace')[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as answer:
                    pages = [t for t in json.load(answer) if t.get("type") == "page"]
                if pages:
                    return pages[0]["webSocketDebuggerUrl"]
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError("chromium's DevTools endpoint did not come up")

    async def _connect(self):
        from tornado.websocket import websocket_connect

        return await websocket_connect(self._ws_url, max_message_size=64 * 1024 * 1024)

    def send(self, method: str, **params):
        """One DevTools command; its result (events in between are skipped)."""
        self._next_id += 1
        ident = self._next_id

        async def call():
            await self._ws.write_message(json.dumps({"id": ident, "method": method, "params": params}))
            while True:
                message = await self._ws.read_message()
                if message is None:
                    raise RuntimeError("chromium closed the DevTools connection")
                data = json.loads(message)
                if data.get("id") == ident:
                    if "error" in data:
                        raise RuntimeError(f"{method}: {data['error']}")
                    return data.get("result", {})

        return self._loop.run_sync(call, timeout=self.timeout)

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url: str) -> None:
        self.send("Page.enable")
        self.send("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete'")

    def wait_for(self, expression: str, timeout: float | None = None):
        """Poll a JavaScript expression until it is truthy; its value."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"never true in the page: {expression}")
            time.sleep(0.2)

    def dom(self) -> str:
        """The page's DOM as HTML, after its scripts ran."""
        return self.evaluate("document.documentElement.outerHTML")

    def screenshot(self, path: Path) -> Path:
        """A PNG of the visible page."""
        data = self.send("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self._loop.run_sync(self._close_ws, timeout=5)
        except Exception:  # the browser may be gone already
            pass
        self._loop.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self._profile, ignore_errors=True)

    async def _close_ws(self):
        self._ws.close()

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
