"""The studio end to end: a server on loopback driven by Playwright in headless Debian Chromium.

Playwright cannot download its own browser here, so it is pointed at ``/usr/bin/chromium``
(``scripts/install_system_deps.sh`` installs it). A screenshot is saved to
``outputs/test-artifacts/studio.png``.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "outputs" / "test-artifacts"
TIMEOUT_MS = 120_000
SHORT = (Path(__file__).parent / "narratives" / "short_kitchen.yaml").read_text(encoding="utf-8")
BAD = "segments:\n  - {id: a, seconds: 2, action: walks}\n  - {id: b, seconds: 2, action: turns, revisit: zzz}\n"

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")
pytest.importorskip("gradio", reason='gradio is not installed (pip install -e ".[studio]")')
if not CHROMIUM.is_file():
    pytest.skip(f"{CHROMIUM} is missing (scripts/install_system_deps.sh installs Debian chromium)",
                allow_module_level=True)

from egolcd.pipeline import EgoLCDPipeline  # noqa: E402
from egolcd.studio import Studio, StudioConfig, build_app, launch_kwargs, validate_text  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("one_thread_module"),
    # gradio's queue (not egolcd) calls pandas options that pandas 3 deprecates
    pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting'", "ignore:The copy keyword is deprecated"),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    model = tmp_path_factory.mktemp("browser-model") / "tiny"
    EgoLCDPipeline.from_preset("tiny").save_pretrained(model)
    config = StudioConfig(model=model, port=free_port(), outputs=tmp_path_factory.mktemp("browser-outputs"))
    return Studio(config)


@pytest.fixture(scope="module")
def server(studio):
    demo = build_app(studio)
    demo.queue().launch(**launch_kwargs(studio.config), prevent_thread_lock=True)
    try:
        yield f"http://127.0.0.1:{demo.server_port}/"
    finally:
        demo.close(verbose=False)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def open_studio(browser, url):
    """A page in a fresh browser context (its own cookies: a separate studio session)."""
    context = browser.new_context(viewport={"width": 1400, "height": 1800})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.outside = []  # requests that would leave this machine (none: the studio works offline)
    page.on("request", lambda request: None if request.url.startswith((url, "data:", "blob:"))
            else page.outside.append(request.url))
    page.goto(url)
    page.wait_for_selector("#generate-btn")
    return context, page


def load_example(page, name: str) -> None:
    page.click("#example-dropdown input")
    page.get_by_role("option", name=name).click()
    page.wait_for_function("document.querySelector('#validation-message').innerText.startsWith('OK')")


def set_steps(page, steps: int) -> None:
    box = page.locator("#steps input[type=number]")
    box.fill(str(steps))
    box.press("Enter")


def test_invalid_narrative_shows_the_cli_line_next_to_the_editor(studio, server, browser):
    context, page = open_studio(browser, server)
    try:
        page.locator("#narrative-editor .cm-content").fill(BAD)
        page.wait_for_function("document.querySelector('#validation-message').innerText.includes('error')")
        expected = validate_text(BAD, studio.pipeline)[1]
        assert expected.startswith("egolcd: error: ") and "revisit 'zzz'" in expected
        assert page.inner_text("#validation-message").strip() == expected
        # Generate refuses it with the same line and starts nothing
        page.click("#generate-btn")
        page.wait_for_function("document.querySelector('#progress').innerText.includes('not started')")
        assert page.inner_text("#validation-message").strip() == expected
    finally:
        context.close()


def test_generate_example_then_inspect_memory(studio, server, browser):
    context, page = open_studio(browser, server)
    try:
        set_steps(page, 1)
        load_example(page, "kitchen_revisit.yaml")
        assert "33 chunks" in page.inner_text("#validation-message")

        # cancel a first run once a chunk has streamed in
        page.click("#generate-btn")
        page.wait_for_selector("#chunk-previews img")
        page.click("#cancel-btn")
        page.wait_for_function("document.querySelector('#progress').innerText.includes('cancelled after')")

        # then generate it whole: chunks stream in, then the video plays
        page.click("#generate-btn")
        page.wait_for_selector("#result-video video")
        progress = page.inner_text("#progress")
        assert "egolcd (1 step, seed 0): 33 chunks, 256 frames" in progress
        state = page.evaluate(
            """async () => {
                const v = document.querySelector('#result-video video');
                for (let i = 0; i < 100 && v.readyState < 1; i++) await new Promise(r => setTimeout(r, 100));
                return {ready: v.readyState, duration: v.duration, width: v.videoWidth, src: v.currentSrc};
            }"""
        )
        assert state["ready"] >= 1 and state["width"] == 64 and abs(state["duration"] - 32) < 0.5
        assert state["src"].endswith(".mp4")
        assert page.locator("#chunk-previews img").count() >= 1

        # the memory inspector: the last chunk's entries, its window, the timeline
        page.wait_for_selector("#memory-inspector [data-testid=cell-0-0]")
        kinds = page.locator("#memory-inspector [data-col='0']").all_inner_texts()
        assert "window" in kinds and "retrieved" in kinds
        assert "short-term window" in page.inner_text("#inspector-summary")
        page.wait_for_selector("#memory-timeline img")
        # clicking an entry shows the frames it came from
        page.click("#memory-inspector [data-testid=cell-0-1]")
        page.wait_for_selector("#entry-frames img")
        assert page.locator("#entry-frames img").count() >= 1

        # another chunk of the run: the inspector follows the chunk slider
        box = page.locator("#inspector-chunk input[type=number]")
        box.fill("5")
        page.wait_for_function("document.querySelector('#inspector-summary').innerText.includes('Chunk 5 ')")

        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "studio.png"), full_page=True)
        assert page.outside == []

        # another tab is another session: nothing of this run shows there
        other, other_page = open_studio(browser, server)
        try:
            assert "Generate a video to inspect" in other_page.inner_text("#inspector-summary")
            assert other_page.locator("#result-video video").count() == 0
        finally:
            other.close()
    finally:
        context.close()
    assert (ARTIFACTS / "studio.png").stat().st_size > 10_000


def test_side_by_side_shows_both_videos_and_the_revisit_frames(server, browser):
    context, page = open_studio(browser, server)
    try:
        set_steps(page, 1)
        page.locator("#narrative-editor .cm-content").fill(SHORT)
        page.wait_for_function("document.querySelector('#validation-message').innerText.startsWith('OK')")
        page.get_by_role("tab", name="Side by side").click()
        page.click("#compare-btn")
        page.wait_for_selector("#compare-video-a video")
        page.wait_for_selector("#compare-video-b video")
        progress = page.inner_text("#compare-progress")
        assert "egolcd (1 step, seed 0): 7 chunks" in progress and "window (1 step, seed 0): 7 chunks" in progress
        page.wait_for_function("document.querySelectorAll('#revisit-frames img').length === 4")
        captions = page.inner_text("#revisit-frames")
        assert "egolcd: revisit 'back'" in captions and "window: first visit 'sink'" in captions
    finally:
        context.close()
