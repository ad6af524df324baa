"""The report in a real browser: headless Chromium loads it offline without a console error,
requests nothing from the network, decodes every image, and renders a screenshot.

Chromium is driven through the DevTools protocol over a pipe (``--remote-debugging-pipe``:
JSON messages separated by NUL bytes on file descriptors 3 and 4), so no websocket library
and no open port are needed. Skipped, with the reason shown, where Chromium is not installed
(CI installs Debian's ``chromium`` package).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import transferlab
from transferlab.evaluation.report import build_report

CHROMIUM = next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium on PATH (CI installs it: apt-get install -y chromium)",
)
FLAGS = (
    "--headless",
    "--no-sandbox",  # CI containers run as root, where the sandbox cannot start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--hide-scrollbars",
    "--mute-audio",
    "--remote-debugging-pipe",
)
WIDTH, HEIGHT = 1280, 2000
TIMEOUT = 60.0


class DevTools:
    """A minimal Chrome DevTools Protocol client over --remote-debugging-pipe."""

    def __init__(self, chromium: str, user_data_dir: Path) -> None:
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        # The browser reads commands on fd 3 and writes replies/events on fd 4. posix_spawn's
        # dup2 actions put our pipe ends there in the child only (no preexec_fn, which is
        # unsafe in a process running torch threads); first lift them above 4 so that one
        # dup2 cannot overwrite the other's source.
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_chrome_r, from_chrome_w)]
        for fd in (to_chrome_r, from_chrome_w):
            os.close(fd)
        log = os.open(
            os.environ.get("TRANSFERLAB_CHROMIUM_LOG", os.devnull), os.O_WRONLY | os.O_CREAT
        )
        args = [chromium, *FLAGS, f"--user-data-dir={user_data_dir}", "about:blank"]
        self.pid = os.posix_spawn(
            chromium,
            args,
            os.environ,
            file_actions=[
                (os.POSIX_SPAWN_DUP2, high[0], 3),
                (os.POSIX_SPAWN_DUP2, high[1], 4),
                (os.POSIX_SPAWN_DUP2, log, 1),
                (os.POSIX_SPAWN_DUP2, log, 2),
            ],
        )
        for fd in (*high, log):
            os.close(fd)
        self._buf = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str) -> dict:
        for i, ev in enumerate(self.events):
            if ev.get("method") == method:
                return self.events.pop(i)
        while True:
            ev = self._read()
            if ev.get("method") == method:
                return ev
            self.events.append(ev)

    def _read(self) -> dict:
        deadline = time.monotonic() + TIMEOUT
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self._from_chrome], [], [], max(0.0, left))
            if not ready:
                raise TimeoutError("chromium did not answer")
            chunk = os.read(self._from_chrome, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium exited (set TRANSFERLAB_CHROMIUM_LOG=FILE to see why)")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.send("Browser.close")
        deadline = time.monotonic() + 10
        while os.waitpid(self.pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)  # our own child, by its pid
                os.waitpid(self.pid, 0)
                break
            time.sleep(0.05)
        os.close(self._to_chrome)
        os.close(self._from_chrome)


def _fit_and_report(root: Path) -> Path:
    rng = np.random.default_rng(0)
    data = root / "data"
    for split, n in (("train", 8), ("val", 4), ("test", 4)):
        for cls, colour in {"cat": (150, 110, 90), "dog": (100, 110, 150)}.items():
            for i in range(n):
                img = np.array(colour) + rng.normal(0, 70, (40, 40, 3))
                p = data / split / cls / f"{cls}.{i}.jpg"
                p.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(p)
    clf = transferlab.fit(
        data,
        out=root / "run",
        backbone="mobilenetv2_035",
        pretrained=False,
        engine="torch",
        cache_dir=str(root / "cache"),
        workers=0,
    )
    return build_report(root / "run", classifier=clf)


def test_report_renders_offline_in_chromium(tmp_path):
    report = _fit_and_report(tmp_path)
    n_img_tags = report.read_text().count("<img ")
    chrome = DevTools(CHROMIUM, tmp_path / "profile")
    try:
        target = chrome.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = chrome.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        for domain in ("Page", "Runtime", "Log", "Network"):
            chrome.send(f"{domain}.enable", session=session)
        chrome.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False},
            session=session,
        )
        chrome.send("Page.navigate", {"url": report.as_uri()}, session=session)
        chrome.wait_for("Page.loadEventFired")
        state = chrome.send(
            "Runtime.evaluate",
            {
                "expression": """JSON.stringify({
                    images: [...document.images].map(i => ({
                        ok: i.complete && i.naturalWidth > 0, alt: i.alt, w: i.naturalWidth})),
                    sections: [...document.querySelectorAll('section h2')].map(h => h.textContent),
                    height: document.documentElement.scrollHeight})""",
                "returnByValue": True,
            },
            session=session,
        )
        page = json.loads(state["result"]["value"])
        shot = chrome.send(
            "Page.captureScreenshot",
            {
                "format": "png",
                "clip": {"x": 0, "y": 0, "width": WIDTH, "height": HEIGHT, "scale": 1},
            },
            session=session,
        )
        events = list(chrome.events)
    finally:
        chrome.close()

    console_errors = [
        e["params"]
        for e in events
        if e.get("method") == "Runtime.exceptionThrown"
        or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] == "error")
        or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")
    ]
    assert console_errors == []
    requests = [
        e["params"]["request"]["url"]
        for e in events
        if e.get("method") == "Network.requestWillBeSent"
    ]
    # the page itself is the only real request; embedded images are data: URIs
    assert [u for u in requests if not u.startswith(("data:", "file:"))] == []
    assert [u for u in requests if u.startswith("file:")] == [report.as_uri()]
    failed = [e["params"] for e in events if e.get("method") == "Network.loadingFailed"]
    assert failed == []

    assert len(page["images"]) == n_img_tags >= 15
    broken = [i["alt"] for i in page["images"] if not i["ok"]]
    assert broken == []
    assert {"Dataset", "Learning curves", "Calibration", "Most confidently wrong"} <= set(
        page["sections"]
    )
    assert page["height"] > HEIGHT  # a long page: the screenshot shows its top

    png = base64.b64decode(shot["data"])
    (tmp_path / "report.png").write_bytes(png)
    with Image.open(tmp_path / "report.png") as im:
        assert im.size == (WIDTH, HEIGHT)
        # rendered, not blank: the header bar is dark, the page body light
        arr = np.asarray(im.convert("L"))
        assert arr[:40].mean() < 120 and arr[400:].mean() > 150
    keep = os.environ.get("TRANSFERLAB_SCREENSHOT_DIR")
    if keep:  # CI can keep the picture as an artifact
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / "report.png", Path(keep) / "report.png")
