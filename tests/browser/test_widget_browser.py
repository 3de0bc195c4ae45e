"""Browser test: a person runs the uncertainty notebook in JupyterLab and uses its widget.

The test starts JupyterLab on 127.0.0.1, opens a copy of
`notebooks/02_uncertainty.ipynb` in headless Chromium, runs all cells, moves
the threshold slider with the keyboard and checks that the hard-region
fraction on the page changes.

It needs Debian's `chromium` at /usr/bin/chromium (or HURMACL_CHROMIUM) and
the pip package `playwright`, which drives that binary and never downloads a
browser. Without them the test is skipped, unless HURMACL_REQUIRE_BROWSER=1,
which turns the skip into a failure (.ci/run sets it). The browser may only
reach 127.0.0.1: the test aborts every other request.

Screenshots go to runs/browser/ (or HURMACL_BROWSER_ARTIFACTS). A pass
saves uncertainty_widget_page.png (the whole page) and uncertainty_widget.png
(the widget's output area). A failure saves uncertainty_widget_failure.png
and jupyterlab_failure.log. HURMACL_UPDATE_SCREENSHOTS=1 also copies the pass
screenshot to docs/images/uncertainty_widget.png, the image in the README.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

from jupyter_harness import HOST, JupyterConfig, JupyterServer, start_server, stop_server

REPO_ROOT = Path(__file__).resolve().parents[2]
# HURMACL_BROWSER_NOTEBOOK swaps in another notebook that uses the same CSS classes.
NOTEBOOK = Path(os.environ.get("HURMACL_BROWSER_NOTEBOOK", REPO_ROOT / "notebooks" / "02_uncertainty.ipynb"))
CHROMIUM = Path(os.environ.get("HURMACL_CHROMIUM", "/usr/bin/chromium"))
README_SCREENSHOT = REPO_ROOT / "docs" / "images" / "uncertainty_widget.png"
ARTIFACT_DIR = Path(os.environ.get("HURMACL_BROWSER_ARTIFACTS", REPO_ROOT / "runs" / "browser"))

# Chromium's own background traffic (updates, sync, QUIC probes) is not sent
# through Playwright, so only these flags keep it off the network.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

SLIDER = ".hurmacl-threshold-slider"
FRACTION = ".hurmacl-hard-fraction"
LEVEL_PICKER = ".hurmacl-level-picker"
SLICE_PICKER = ".hurmacl-slice-picker"
FRACTION_PATTERN = re.compile(r"hard-region fraction:\s*([0-9]+(?:\.[0-9]+)?)\s*%")
# Kernel status in JupyterLab's status bar, e.g. "Python 3 (ipykernel) | Idle".
KERNEL_IDLE_PATTERN = re.compile(r"\|\s*Idle\s*$")

# Timeouts in seconds. The notebook trains a small checkpoint when it finds
# none (about 20 steps), so the widget may take minutes on a slow CPU.
PAGE_TIMEOUT_S = 60
KERNEL_IDLE_TIMEOUT_S = 120
NOTEBOOK_TIMEOUT_S = 300
# PageUp moves a noUiSlider handle (ipywidgets 8.1.9) by 5 steps. The
# notebook's slider has steps of 0.05 decades over [1e-4, 0.1], so 8 presses
# reach 0.1 from the default 1e-3. A kernel update that arrives after the next
# press still counts, so only the last press waits SLIDER_UPDATE_TIMEOUT_S.
MAX_SLIDER_PRESSES = 8
SECONDS_PER_PRESS = 1.5
SLIDER_UPDATE_TIMEOUT_S = 30


@pytest.fixture
def sync_api():
    """Return `playwright.sync_api`, or skip (fail under HURMACL_REQUIRE_BROWSER=1) without it."""
    missing = []
    if not CHROMIUM.exists():
        missing.append(f"{CHROMIUM} not found (install it with `apt-get install -y chromium`)")
    try:
        from playwright import sync_api
    except ImportError:
        sync_api = None
        missing.append("Python package playwright not installed (`pip install -e '.[test]'`)")

    if missing:
        reason = "browser test needs: " + "; ".join(missing)
        if os.environ.get("HURMACL_REQUIRE_BROWSER") == "1":
            pytest.fail(f"HURMACL_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    return sync_api


@pytest.fixture
def jupyter_server(tmp_path):
    """Serve a copy of the uncertainty notebook, since JupyterLab autosaves edits."""
    assert NOTEBOOK.exists(), f"notebook not found: {NOTEBOOK}"

    root_dir = tmp_path / "root"
    (root_dir / "notebooks").mkdir(parents=True)
    shutil.copy(NOTEBOOK, root_dir / "notebooks" / NOTEBOOK.name)
    link_repo_folders(root_dir)

    server = start_server(JupyterConfig(root_dir=root_dir, work_dir=tmp_path / "jupyter"))
    try:
        yield server
    finally:
        stop_server(server)


def link_repo_folders(root_dir: Path) -> None:
    """Link the repository's top-level entries beside the copied notebook folder.

    The notebook finds the repository root by looking for `pyproject.toml`
    and `hurmacl_kit/` above its folder, then reads `sample_data/` and reuses
    or writes a checkpoint under `runs/`. Linking `runs/` lets the test reuse
    the checkpoint of `make demo` or of an earlier notebook run.
    """
    (REPO_ROOT / "runs").mkdir(exist_ok=True)
    for entry in REPO_ROOT.iterdir():
        if entry.name.startswith(".") or entry.name == "notebooks":
            continue
        (root_dir / entry.name).symlink_to(entry)


def keep_local(route) -> None:
    """Abort every browser request that is not for the test server."""
    if urlparse(route.request.url).hostname == HOST:
        route.continue_()
    else:
        print(f"blocked request to {route.request.url}")
        route.abort()


def wait_for_kernel_idle(page, timeout_s: float) -> None:
    """Wait until the status bar reports the kernel as idle.

    The notebook toolbar shows "idle" for a moment before the kernel session
    exists, and cells run then are dropped. The status bar item, e.g.
    "Python 3 (ipykernel) | Idle", appears only once the kernel is connected.
    """
    status = page.locator(".jp-StatusBar-Item", has_text=KERNEL_IDLE_PATTERN)
    status.first.wait_for(state="visible", timeout=timeout_s * 1000)


def run_all_cells(page) -> None:
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()


def read_error_output(page) -> str | None:
    """Return the text of the first traceback in the notebook's outputs, if any."""
    errors = page.locator(".jp-OutputArea-output", has_text="Traceback (most recent call last)")
    if errors.count() == 0:
        return None
    return errors.first.inner_text()


def read_fraction(page) -> float | None:
    """Return the hard-region fraction shown on the page in percent, or None before it shows."""
    widget = page.locator(FRACTION)
    if widget.count() == 0 or not widget.first.is_visible():
        return None
    match = FRACTION_PATTERN.search(widget.first.inner_text())
    return float(match.group(1)) if match else None


def is_notebook_done(page) -> bool:
    """Return whether no cell is queued or running and the kernel is idle."""
    running = page.locator(".jp-InputPrompt", has_text="[*]")
    idle = page.locator(".jp-StatusBar-Item", has_text=KERNEL_IDLE_PATTERN)
    return running.count() == 0 and idle.count() > 0


def wait_for_notebook(page, timeout_s: float) -> float:
    """Wait until all cells have run and the fraction widget shows a value.

    Cells after the widget's cell change the threshold through the widget's
    state, so the test reads the fraction only after the last cell.

    Returns:
        The hard-region fraction shown, in percent.

    Raises:
        AssertionError: A cell raised an error.
        TimeoutError: The notebook did not finish within `timeout_s` seconds.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        error = read_error_output(page)
        assert error is None, f"a notebook cell raised an error:\n{error}"

        fraction = read_fraction(page)
        if fraction is not None and is_notebook_done(page):
            return fraction
        page.wait_for_timeout(500)

    raise TimeoutError(
        f"the notebook did not finish with a '{FRACTION}' widget showing a hard-region fraction "
        f"within {timeout_s} s"
    )


def read_threshold(page) -> float:
    readout = page.locator(f"{SLIDER} .widget-readout").first
    return float(readout.inner_text().strip())


def move_slider_until_fraction_changes(page, start_fraction: float) -> tuple[float, int]:
    """Press PageUp on the slider handle, raising T, until the fraction changes.

    A weakly trained model is unsure almost everywhere, so its fraction can
    stay at 100.00% over the first presses.

    Returns:
        The new fraction in percent and the number of key presses.
    """
    handle = page.locator(f"{SLIDER} .noUi-handle").first
    for presses in range(1, MAX_SLIDER_PRESSES + 1):
        handle.focus()
        handle.press("PageUp")

        wait_s = SLIDER_UPDATE_TIMEOUT_S if presses == MAX_SLIDER_PRESSES else SECONDS_PER_PRESS
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            fraction = read_fraction(page)
            if fraction is not None and fraction != start_fraction:
                return fraction, presses
            page.wait_for_timeout(200)

    raise AssertionError(
        f"hard-region fraction stayed at {start_fraction}% after {MAX_SLIDER_PRESSES} PageUp presses "
        f"on the threshold slider (threshold now {read_threshold(page)})"
    )


def pick_last_option(page, picker: str) -> str:
    """Select the last option of a Dropdown widget and return its label."""
    select = page.locator(f"{picker} select").first
    labels = select.locator("option").all_inner_texts()
    assert labels, f"'{picker}' has no options"
    select.select_option(index=len(labels) - 1)

    # Browsers report the spaces of option labels as no-break spaces.
    return labels[-1].replace("\xa0", " ")


def read_figure_title(page) -> str:
    """Return the title of the plotly figure in the slider's output area."""
    cell = page.locator(".jp-Cell", has=page.locator(SLIDER)).first
    return cell.locator(".js-plotly-plot .gtitle").first.text_content() or ""


def wait_for_figure_title(page, text: str, timeout_s: float) -> str:
    """Wait until the figure title contains `text`, and return the title."""
    deadline = time.monotonic() + timeout_s
    title = ""
    while time.monotonic() < deadline:
        title = read_figure_title(page)
        if text in title:
            return title
        page.wait_for_timeout(200)
    raise AssertionError(f"figure title {title!r} did not show {text!r} within {timeout_s} s")


def save_screenshot(page, name: str) -> Path:
    ARTIFACT_DIR.mkdir(parents=True, exist_ok=True)
    path = ARTIFACT_DIR / name
    page.screenshot(path=str(path))
    return path


def save_widget_screenshot(page, name: str) -> Path:
    """Save a screenshot of the output area of the cell that shows the slider."""
    ARTIFACT_DIR.mkdir(parents=True, exist_ok=True)
    path = ARTIFACT_DIR / name
    cell = page.locator(".jp-Cell", has=page.locator(SLIDER)).first
    output = cell.locator(".jp-Cell-outputWrapper").first
    output.scroll_into_view_if_needed()
    output.screenshot(path=str(path))
    return path


def save_failure_artifacts(page, server: JupyterServer) -> None:
    """Save a screenshot and the server log. Call it before the browser closes."""
    try:
        path = save_screenshot(page, "uncertainty_widget_failure.png")
        print(f"failure screenshot: {path}")
    except Exception as error:  # a crashed page must not hide the original failure
        print(f"saving the failure screenshot failed: {error!r}")

    log_copy = ARTIFACT_DIR / "jupyterlab_failure.log"
    log_copy.write_text(server.log_tail(max_chars=200_000))
    print(f"server log: {log_copy}\n--- end of server log ---\n{server.log_tail()}")


def test_uncertainty_widget_slider(sync_api, jupyter_server):
    for stale in ("uncertainty_widget_failure.png", "jupyterlab_failure.log"):
        (ARTIFACT_DIR / stale).unlink(missing_ok=True)
    notebook_path = f"lab/tree/notebooks/{NOTEBOOK.name}"

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            env=jupyter_server.env,
        )
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1000})
            context.route("**/*", keep_local)
            context.set_default_timeout(PAGE_TIMEOUT_S * 1000)
            page = context.new_page()

            try:
                page.goto(jupyter_server.url(notebook_path), timeout=PAGE_TIMEOUT_S * 1000)
                wait_for_kernel_idle(page, KERNEL_IDLE_TIMEOUT_S)
                run_all_cells(page)

                start_fraction = wait_for_notebook(page, NOTEBOOK_TIMEOUT_S)
                start_threshold = read_threshold(page)
                assert page.locator(LEVEL_PICKER).first.is_visible(), f"no visible '{LEVEL_PICKER}'"
                assert page.locator(SLICE_PICKER).first.is_visible(), f"no visible '{SLICE_PICKER}'"

                end_fraction, presses = move_slider_until_fraction_changes(page, start_fraction)
                end_threshold = read_threshold(page)
                print(
                    f"threshold {start_threshold} -> {end_threshold} after {presses} PageUp presses; "
                    f"hard-region fraction {start_fraction}% -> {end_fraction}%"
                )

                # A higher threshold keeps fewer pixels above it.
                assert end_threshold > start_threshold
                assert end_fraction < start_fraction
                assert 0.0 <= end_fraction <= 100.0

                save_screenshot(page, "uncertainty_widget_page.png")
                screenshot = save_widget_screenshot(page, "uncertainty_widget.png")

                # The pickers redraw the figure, whose title names the level
                # and the slice, e.g. "slice z = 42, level 3, T = 3.2e-02".
                level_label = pick_last_option(page, LEVEL_PICKER)
                level = level_label.split()[1]
                wait_for_figure_title(page, f"level {level}", SLIDER_UPDATE_TIMEOUT_S)

                slice_label = pick_last_option(page, SLICE_PICKER)
                title = wait_for_figure_title(page, f"slice {slice_label}", SLIDER_UPDATE_TIMEOUT_S)
                assert f"level {level}" in title
                assert read_fraction(page) is not None
            except BaseException:
                save_failure_artifacts(page, jupyter_server)
                raise
        finally:
            browser.close()

    if os.environ.get("HURMACL_UPDATE_SCREENSHOTS") == "1":
        README_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, README_SCREENSHOT)
