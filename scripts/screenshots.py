"""Headless Chromium for the MLflow UI test and the README screenshots.

`python scripts/screenshots.py [--out docs/img]` reproduces docs/img/mlflow-ui.png and
docs/img/report.png: it starts `mlflow server` on 127.0.0.1 (SQLite store, served artifacts, job
execution off), runs a small sweep (examples/quick.yaml made smaller: 4 trials) into it, builds
`driftsweep report`, and renders both pages in headless Chromium.

Chromium is driven through the Chrome DevTools protocol over a pipe (`--remote-debugging-pipe`:
JSON messages ending in a NUL byte, written to the browser's fd 3 and read from its fd 4), so no
extra package and no debugging port are needed. MLflow's UI is a React SPA: pages are read after
rendering by polling `document.body.innerText` until the expected text is there.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

# The flags that work here (Debian's chromium, as root, no display, no network but loopback).
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--hide-scrollbars", "--remote-debugging-pipe",
)
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")
INSTALL_HINT = "install it with `apt-get install -y chromium` (Debian's package; .ci/run does this in CI)"
PAGE_TIMEOUT_S = 90.0
POLL_S = 0.5
VIEWPORT = (1440, 760)  # CSS pixels of the screenshots
REPORT_VIEWPORT = (1200, 1500)  # the report's tables and its first plots
RUN_NAME_COLUMN = "attributes.`Run Name`"
COLUMN_WIDTH_PX = 170  # wide enough for a temperature set "[0.02, 0.05, 0.2]"
REPO = Path(__file__).resolve().parents[1]



class BrowserError(RuntimeError):
    """Chromium missing, crashed, or a page did not show what was expected in time."""


def find_chromium() -> str:
    """Path of a Chromium binary ($CHROMIUM, else the usual names on PATH).

    Raises:
        BrowserError: none found; the message says how to install it.
    """
    candidates = [os.environ.get("CHROMIUM", "")] + [shutil.which(name) or "" for name in CHROMIUM_NAMES]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return candidate
    raise BrowserError(f"no Chromium found (looked for $CHROMIUM and {', '.join(CHROMIUM_NAMES)}); {INSTALL_HINT}")


class Chromium:
    """One headless Chromium with one page, driven over the DevTools pipe.

    Use as a context manager; the browser and its fresh profile directory go away on exit.

    Args:
        viewport: (width, height) in CSS pixels.
    """

    def __init__(self, viewport: tuple[int, int] = VIEWPORT):
        self.viewport = viewport
        self._profile = tempfile.mkdtemp(prefix="chromium_profile_")
        to_browser_read, self._to_browser = os.pipe()
        self._from_browser, from_browser_write = os.pipe()

        def map_fds():  # in the child: fd 3 = commands in, fd 4 = replies out
            # Move both ends above 4 first, so neither dup2 overwrites the other when one is fd 3 or 4.
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser_read, from_browser_write)]
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        self._log = open(Path(self._profile) / "chromium.log", "wb")
        self.process = subprocess.Popen(
            [find_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={self._profile}",
             f"--window-size={viewport[0]},{viewport[1]}", "about:blank"],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            # close_fds runs after preexec_fn and keeps only pass_fds: keep the remapped 3 and 4.
            pass_fds=(3, 4), preexec_fn=map_fds,
        )
        os.close(to_browser_read)
        os.close(from_browser_write)
        self._buffer = b""
        self._next_id = 0
        self._session = None
        targets = self.call("Target.getTargets")["targetInfos"]
        page = next(t["targetId"] for t in targets if t["type"] == "page")
        self._session = self.call("Target.attachToTarget", targetId=page, flatten=True)["sessionId"]
        self.call("Page.enable")
        self.set_viewport(*viewport)

    def set_viewport(self, width: int, height: int) -> None:
        """Resize the page's viewport (CSS pixels, scale 1)."""
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the browser and remove its profile directory."""
        for fd in (self._to_browser, self._from_browser):
            try:
                os.close(fd)
            except OSError:
                pass
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._log.close()
        shutil.rmtree(self._profile, ignore_errors=True)

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise BrowserError(f"Chromium did not answer (exit code {self.process.poll()})")
            # Wait at most a second per read so a hung browser still hits the deadline.
            if not select.select([self._from_browser], [], [], 1.0)[0]:
                continue
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                raise BrowserError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, timeout_s: float = PAGE_TIMEOUT_S, **params) -> dict:
        """Send one DevTools command (to the page once attached) and return its result.

        Raises:
            BrowserError: the command failed or timed out.
        """
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if self._session is not None and not method.startswith("Target."):
            message["sessionId"] = self._session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout_s
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error'].get('message')}")
                return reply.get("result", {})

    def evaluate(self, expression: str):
        """Value of a JavaScript expression in the page (awaited if it is a promise)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise BrowserError(f"script failed: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def goto(self, url: str) -> None:
        """Navigate and wait for the document to load (an SPA may still be rendering)."""
        self.call("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete'", what=f"{url} to load")

    def wait_for(self, condition_js: str, what: str, timeout_s: float = PAGE_TIMEOUT_S):
        """Poll a JavaScript condition until it is truthy.

        Returns:
            The condition's value.

        Raises:
            BrowserError: not true within timeout_s; the message names `what`.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            value = self.evaluate(condition_js)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"timed out after {timeout_s:.0f} s waiting for {what}")
            time.sleep(POLL_S)

    def wait_for_texts(self, texts: list[str], timeout_s: float = PAGE_TIMEOUT_S) -> str:
        """Wait until the rendered page text contains every string of `texts`.

        Returns:
            The page's innerText at that moment.

        Raises:
            BrowserError: some text still missing at the timeout (the message lists which).
        """
        wanted = json.dumps(texts)
        try:
            self.wait_for(f"{wanted}.every(t => document.body && document.body.innerText.includes(t))",
                          what="the page to show " + ", ".join(texts), timeout_s=timeout_s)
        except BrowserError:
            body = self.evaluate("document.body ? document.body.innerText : ''") or ""
            missing = [t for t in texts if t not in body]
            raise BrowserError(f"page never showed {missing}; it shows: {body[:600]!r}") from None
        return self.evaluate("document.body.innerText")

    def screenshot(self, path: str | os.PathLike) -> Path:
        """Save a PNG screenshot of the viewport."""
        data = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path


def runs_view_state(parent_run_id: str, axis_names: list[str], metrics: list[str]) -> dict:
    """The MLflow experiment page's persisted UI state that shows the sweep's columns.

    MLflow's UI keeps it in localStorage under `MLflowLocalStorage-1.1-ExperimentPage-<JSON of the
    sorted experiment ids>-ReactComponentState` (mlflow/server/js: LocalStorageUtils,
    persistSearchState); column ids are `params.\`name\`` / `metrics.\`name\``
    (makeCanonicalSortKey), and widths apply to the columns listed in columnOrder. The parent row
    is expanded so its child runs are listed.

    Args:
        parent_run_id: the sweep's parent run (expanded).
        axis_names: axis names (columns `params.axis.<name>`).
        metrics: metric columns.

    Returns:
        The state object (partial: the UI fills in the rest with its defaults).
    """
    columns = [f"params.`axis.{name}`" for name in axis_names] + [f"metrics.`{m}`" for m in metrics]
    widths = {RUN_NAME_COLUMN: COLUMN_WIDTH_PX * 2, **{column: COLUMN_WIDTH_PX for column in columns}}
    return {"selectedColumns": columns, "runsExpanded": {parent_run_id: True},
            "columnOrder": list(widths), "columnWidths": widths}


def column_headers(browser: Chromium) -> list[str]:
    """Texts of the rendered column headers of the page's grid (ARIA role columnheader)."""
    return browser.evaluate(
        "Array.from(document.querySelectorAll('[role=columnheader]')).map(e => e.innerText.trim())")


def close_assistant(browser: Chromium) -> bool:
    """Close MLflow 3's assistant chat panel (it opens by itself on a first visit) if it is shown.

    Returns:
        True when a panel was closed.
    """
    # The panel's Close button: an aria-label "Close" button within 4 levels of the panel title.
    find_button = """Array.from(document.querySelectorAll('button[aria-label="Close"]')).find(button => {
        for (let node = button, up = 0; node && up < 4; node = node.parentElement, up++)
            if ((node.innerText || '').startsWith('MLflow Assistant')) return true;
        return false;
    })"""
    closed = browser.evaluate(f"(() => {{ const b = {find_button}; if (b) b.click(); return Boolean(b); }})()")
    if closed:
        browser.wait_for(f"!{find_button}", what="the assistant panel to close", timeout_s=10)
    return bool(closed)


def open_experiment(browser: Chromium, tracking_uri: str, experiment_id: str, state: dict) -> str:
    """Open the experiment's runs page with the given persisted UI state.

    Returns:
        The page URL.
    """
    base = tracking_uri.rstrip("/")
    browser.goto(base + "/")
    key = f"MLflowLocalStorage-1.1-ExperimentPage-{json.dumps([experiment_id])}-ReactComponentState"
    browser.evaluate(f"localStorage.setItem({json.dumps(key)}, {json.dumps(json.dumps(state))})")
    url = f"{base}/#/experiments/{experiment_id}/runs"
    browser.goto(url)
    return url


# ---------------------------------------------------------------- README screenshots


def _start_server(root: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--serve-artifacts",
         "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
        stdout=open(root / "server.log", "wb"), stderr=subprocess.STDOUT, env=env, cwd=root,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return process
        except OSError:
            time.sleep(0.5)
    process.terminate()
    raise RuntimeError(f"mlflow server did not start; see {root / 'server.log'}")


def _shrink_png(path: Path) -> None:
    """Quantize to a 256-colour palette: UI screenshots keep their look at a fraction of the size."""
    from PIL import Image

    with Image.open(path) as image:
        image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "docs" / "img"), help="where the PNGs go")
    parser.add_argument("--port", type=int, default=5077, help="port of the temporary mlflow server")
    args = parser.parse_args(argv)
    import yaml

    out = Path(args.out).resolve()
    work = Path(tempfile.mkdtemp(prefix="ds_shots_"))
    server = _start_server(work, args.port)
    uri = f"http://127.0.0.1:{args.port}"
    try:
        # A smaller quick plan: 2 kernels x 2 temperature sets, 200 steps evaluated every 50 (4 trials,
        # about a minute on 2 cores).
        plan = yaml.safe_load((REPO / "examples" / "quick.yaml").read_text())
        plan["axes"].pop("anneal_rate")
        plan["workload"].update(total_steps=200, eval_every_steps=50)
        plan["budget"]["max_trials"] = 4
        plan["tracking"]["uri"] = uri
        plan_path = work / "quick.yaml"
        plan_path.write_text(yaml.safe_dump(plan, sort_keys=False))
        driftsweep = [sys.executable, "-m", "orchestrator"]
        subprocess.run([*driftsweep, "run", str(plan_path)], cwd=work, check=True)
        subprocess.run([*driftsweep, "report", str(plan_path), "--out", str(work / "report")], cwd=work, check=True)

        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name(plan["name"])
        parent = client.search_runs([experiment.experiment_id], "tags.`driftsweep.plan_hash` != ''")[0]
        state = runs_view_state(parent.info.run_id, list(plan["axes"]), ["swd", "mmd", "fd"])
        with Chromium() as browser:
            open_experiment(browser, uri, experiment.experiment_id, state)
            browser.wait_for_texts([plan["name"], "kernel=gaussian", "axis.kernel"])
            close_assistant(browser)
            time.sleep(2)  # let the table take the freed width
            shots = [browser.screenshot(out / "mlflow-ui.png")]
            html = next((work / "report").glob("*.html"))
            browser.set_viewport(*REPORT_VIEWPORT)
            browser.goto(html.as_uri())
            browser.wait_for_texts(["Main effects", "kernel"])
            browser.wait_for("Array.from(document.images).every(i => i.complete)", what="the report's plots")
            shots.append(browser.screenshot(out / "report.png"))
        for shot in shots:
            _shrink_png(shot)
            print(f"{shot} ({shot.stat().st_size // 1024} KiB)")
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
