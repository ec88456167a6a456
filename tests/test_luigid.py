"""A training's progress reaches a real luigi central scheduler (``luigid``) and its web page.

``luigid`` runs on a free loopback port with its own state file; ``law run TrainTask`` talks
to it (``--scheduler-host/--scheduler-port``, ``--local-scheduler False``). The scheduler's
JSON API must show the progress percentage and the status line of
:class:`ckpt_tasks.progress.SchedulerProgress` while the task trains, and Debian's Chromium,
headless, must show that line on luigid's page (DOM and a PNG screenshot).
Set ``CKPT_TASKS_SCREENSHOTS=DIR`` to keep the screenshot.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from conftest import IN_CI, unavailable
from helpers.browser import Browser, find_chromium
from test_train_task import LAW, ROOT, law_env
from waiting import wait_until

from ckpt_tasks.progress import SchedulerProgress

LUIGID = Path(sys.executable).with_name("luigid")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def api(url: str, method: str, **data) -> dict:
    """One call of luigid's JSON API (``/api/<method>?data=<json>``)."""
    query = urllib.parse.urlencode({"data": json.dumps(data)})
    with urllib.request.urlopen(f"{url}/api/{method}?{query}", timeout=10) as answer:
        return json.load(answer)["response"]


@pytest.fixture
def luigid(tmp_path):
    """A real luigid on a free loopback port; its base URL."""
    if not LUIGID.exists():
        unavailable(f"no luigid next to {sys.executable}")
    port = _free_port()
    (tmp_path / "luigid").mkdir()
    log = open(tmp_path / "luigid" / "luigid.log", "w")
    server = subprocess.Popen([str(LUIGID), "--address", "127.0.0.1", "--port", str(port),
                               "--state-path", str(tmp_path / "luigid" / "state.pickle"),
                               "--logdir", str(tmp_path / "luigid")], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def answers():
        if server.poll() is not None:
            raise AssertionError((tmp_path / "luigid" / "luigid.log").read_text()[-2000:])
        try:
            return api(url, "task_list", status="", upstream_status="", search="") is not None
        except OSError:
            return False

    try:
        wait_until(answers, 60, "luigid to answer")
        yield url, port
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def train_tasks(url: str, status: str) -> dict:
    return {key: task for key, task in api(url, "task_list", status=status, upstream_status="", search="").items()
            if key.startswith("TrainTask")}


def test_the_status_line_says_step_checkpoint_and_evictions():
    class Task:  # what luigi's worker gives a running task: the reporter callables
        _message_cache = ["resuming from step 100"]

        def __init__(self):
            self.sent = []
            self.set_status_message = self.sent.append

    class Newest:
        step, created = 100, "2026-12-01T10:00:00+00:00"

    task, newest = Task(), None
    progress = SchedulerProgress(task, 400, newest=lambda: newest, evictions=lambda: 2, interval=3600)
    assert progress.update(10) and task.sent == ["step 10 of 400 (2%); no checkpoint yet; evictions: 2\n"
                                                 "resuming from step 100"]
    assert not progress.update(11)  # within the interval, no new commit: nothing sent
    newest = Newest()
    assert progress.update(100)  # a new commit is sent at once
    line = progress.message(120, now=1796119230.0)  # 30 s after the commit
    assert line == "step 120 of 400 (30%); newest checkpoint: step 100, 30.0 s ago; evictions: 2", line
    assert not SchedulerProgress(object(), 400).update(1)  # no scheduler: nothing to do


def test_training_progress_on_luigids_api_and_web_page(luigid, tmp_path):
    url, port = luigid
    chromium = find_chromium()
    if chromium is None:
        reason = "Debian's chromium is not installed (apt-get install chromium)"
        if IN_CI:
            pytest.fail(f"CI=true: {reason}")
        pytest.skip(reason)
    # 5 epochs of 45 steps at 0.1 s: about 25 s of training, time to look at it while it runs.
    command = [LAW, "run", "TrainTask", "--branch", "0", "--epochs", "5", "--checkpoint-every", "20",
               "--step-delay", "0.1", "--local-scheduler", "False", "--scheduler-host", "127.0.0.1",
               "--scheduler-port", str(port)]
    with open(tmp_path / "law.log", "w") as log:
        runner = subprocess.Popen(command, cwd=ROOT, env=law_env(tmp_path / "data"), stdout=log,
                                  stderr=subprocess.STDOUT)
    try:
        def running_with_progress():
            for task in train_tasks(url, "RUNNING").values():
                if "newest checkpoint: step" in (task.get("status_message") or "") and \
                        (task.get("progress_percentage") or 0) > 0:
                    return task
            assert runner.poll() is None, (tmp_path / "law.log").read_text()[-3000:]
            return None

        task = wait_until(running_with_progress, 180, "the training's progress on luigid")
        assert 0 < task["progress_percentage"] < 100, task
        line = task["status_message"].splitlines()[0]
        assert line.startswith("step ") and " of 225 (" in line and "evictions: 0" in line, line
        assert "starting from scratch" in task["status_message"]  # law's own messages stay

        with Browser(chromium, height=1000) as browser:
            browser.open(f"{url}/static/visualiser/index.html")
            # the task list, then the task's status-message button, as a user would click it
            browser.wait_for("document.querySelector('button.statusMessage') !== null", 60)
            browser.evaluate("document.querySelector('button.statusMessage').click()")
            shown = browser.wait_for("(document.querySelector('#statusMessageModal pre') || {}).innerText", 30)
            time.sleep(1.0)  # the modal fades in
            browser.evaluate("document.querySelector('#statusMessageModal pre').scrollIntoView(false)")
            dom = browser.dom()
            png = browser.screenshot(tmp_path / "luigid.png")
        assert "newest checkpoint: step" in shown and " of 225 (" in shown, shown
        assert "TrainTask" in dom and "newest checkpoint: step" in dom
        assert_not_blank_png(png)
        if os.environ.get("CKPT_TASKS_SCREENSHOTS"):
            shutil.copy(png, Path(os.environ["CKPT_TASKS_SCREENSHOTS"]) / "luigid-progress.png")
        assert runner.wait(timeout=300) == 0, (tmp_path / "law.log").read_text()[-3000:]
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
    (done,) = train_tasks(url, "DONE").values()
    assert done["progress_percentage"] == 100, done
    assert done["status_message"].splitlines()[0].startswith("step 225 of 225 (100%); newest checkpoint: step ")


def assert_not_blank_png(path: Path) -> None:
    """A real PNG with a picture in it: the PNG signature, a browser-sized image, many colours."""
    from PIL import Image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        assert image.width >= 800 and image.height >= 600, image.size
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50, f"{path} looks blank ({len(colours or [])} colours)"


def test_a_slow_store_does_not_hold_up_the_first_status_line():
    import threading

    class Task:
        def __init__(self):
            self.sent = []
            self.set_status_message = self.sent.append

    answer = threading.Event()

    def slow_listing() -> int:  # a store that answers only when the test lets it
        answer.wait(30)
        return 3

    task = Task()
    progress = SchedulerProgress(task, 10, evictions=slow_listing, interval=0, count_wait=0.05)
    started = time.monotonic()
    assert progress.update(1)
    assert time.monotonic() - started < 5
    assert task.sent[-1].endswith("evictions: counting"), task.sent
    answer.set()
    progress._counter.join(10)
    assert progress.update(2, force=True) and task.sent[-1].endswith("evictions: 3"), task.sent
