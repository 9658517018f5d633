"""Regenerate docs/studio.png: the studio with the embedded demo model, maze_revisit.yaml generated and
chunk 13 (the revisit's first) open in the memory inspector. Needs the studio extra and /usr/bin/chromium.

    .venv/bin/python scripts/studio_screenshot.py [--out docs/studio.png]
"""

from __future__ import annotations

import argparse
import socket
import tempfile
from pathlib import Path

from PIL import Image
from playwright import sync_api

from egolcd.pipeline import EMBEDDED_MODEL_DIR
from egolcd.studio import Studio, StudioConfig, build_app, launch_kwargs

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/studio.png")
    parser.add_argument("--chunk", type=int, default=13, help="chunk to open in the inspector (13: the revisit's first)")
    args = parser.parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        studio = Studio(StudioConfig(model=EMBEDDED_MODEL_DIR, port=port, outputs=Path(tmp)))
        demo = build_app(studio)
        demo.queue().launch(**launch_kwargs(studio.config), prevent_thread_lock=True)
        try:
            with sync_api.sync_playwright() as playwright:
                browser = playwright.chromium.launch(
                    executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS, headless=True
                )
                page = browser.new_context(viewport={"width": 1400, "height": 1800}).new_page()
                page.set_default_timeout(180_000)
                page.goto(f"http://127.0.0.1:{port}/")
                page.click("#example-dropdown input")
                page.get_by_role("option", name="maze_revisit.yaml").click()
                page.wait_for_function("document.querySelector('#validation-message').innerText.startsWith('OK')")
                page.click("#generate-btn")
                page.wait_for_selector("#result-video video")
                page.wait_for_function("document.querySelector('#progress').innerText.includes('frames')")
                box = page.locator("#inspector-chunk input[type=number]")
                box.fill(str(args.chunk))
                box.press("Enter")
                # the inspector must show that chunk (a chunk past the run's end is refused in the server: fail here)
                page.get_by_text(f"Chunk {args.chunk} ·").first.wait_for(timeout=30_000)
                page.wait_for_timeout(2500)
                page.click("#memory-inspector [data-testid=cell-0-1]")
                page.wait_for_timeout(2500)
                raw = Path(tmp) / "studio.png"
                page.screenshot(path=str(raw), full_page=True)
                browser.close()
        finally:
            demo.close()
        image = Image.open(raw).convert("RGB")
        width = 1000
        image = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
        image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(args.out, optimize=True)


if __name__ == "__main__":
    main()
