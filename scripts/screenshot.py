#!/usr/bin/env python3
"""The README's pictures of the chat page, taken from a real run: `vlcache serve`'s app on 127.0.0.1 and a headless
Chromium that picks a photograph, asks two questions about it and is photographed (desktop, light; phone, dark).

Without --model the server runs the tests' tiny random checkpoint (no weights can be downloaded here), so the
answers are nonsense; the page, its numbers and the cached second question are real.

    python scripts/screenshot.py                      # docs/web-page.png and docs/web-page-phone.png
    python scripts/screenshot.py --model Qwen/Qwen3-VL-2B-Instruct
"""

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import _bootstrap  # noqa: F401

REPO = Path(__file__).resolve().parent.parent
PHOTO = REPO.parent / "shared" / "images" / "chelsea.png"
QUESTIONS = ["What is in this picture?", "What colour are the cat's eyes?"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Screenshots of vlcache serve's chat page from a headless Chromium.")
    parser.add_argument("--model", default=None, help="model id or folder (default: a tiny random checkpoint built here)")
    parser.add_argument("--image", type=Path, default=PHOTO, help=f"the photograph to ask about (default: {PHOTO.name})")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "web-page.png")
    parser.add_argument("--phone-out", type=Path, default=REPO / "docs" / "web-page-phone.png")
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"),
                        help="the browser (default: the system's chromium)")
    args = parser.parse_args(argv)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("error: the screenshot needs playwright: pip install -e '.[test]'", file=sys.stderr)
        return 1
    if not args.chromium:
        print("error: no Chromium found: apt-get install chromium, or pass --chromium PATH", file=sys.stderr)
        return 1
    if not args.image.is_file():
        print(f"error: no such photograph: {args.image}", file=sys.stderr)
        return 1

    with tempfile.TemporaryDirectory(prefix="vlcache-screenshot-") as tmp:
        url, stop = serve(args.model, Path(tmp))
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=args.chromium)
                desktop(browser, url, args)
                phone(browser, url, args)
                browser.close()
        finally:
            stop()
    print(f"wrote {args.out} and {args.phone_out}")
    return 0


def serve(model: str | None, tmp: Path):
    """Start the app on a free port in this process; its URL and a function that stops it."""
    import uvicorn

    from vlcache import Engine
    from vlcache.serving.server import ServeOptions, create_app, server_config
    from vlcache.testing import build_tiny_checkpoint

    engine = Engine.load(model or str(build_tiny_checkpoint(tmp / "tiny-random-qwen3-vl")), device="cpu")
    app = create_app(engine, ServeOptions(cache_dir=tmp / "states", memory_budget=2**30))
    server = uvicorn.Server(server_config(app, "127.0.0.1", 0, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]

    def stop():
        server.should_exit = True
        thread.join(timeout=30)

    return f"http://127.0.0.1:{port}", stop


def ask(page, question: str, answers_before: int) -> None:
    page.fill("#input", question)
    page.press("#input", "Enter")
    page.locator(f".message.assistant >> nth={answers_before}").locator(".stats, .error").first.wait_for(timeout=300_000)
    page.wait_for_selector("#send:not([hidden])")


def desktop(browser, url: str, args) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 760}, color_scheme="light")
    page = context.new_page()
    page.goto(url + "/")
    page.wait_for_selector("html[data-ready]")
    page.click("#open-settings")
    page.fill("#set-system", "You are describing photographs for a curious reader.")  # shown in the state list
    page.fill("#set-temperature", "0")
    page.fill("#set-max-tokens", str(args.max_tokens))
    page.click("#save-settings")
    page.set_input_files("#pick", str(args.image))
    page.wait_for_selector("#attachments img")
    for i, question in enumerate(QUESTIONS):
        ask(page, question, i)
    page.click("#refresh-states")
    page.wait_for_selector("#states li.state")
    page.set_input_files("#pick", str(args.image))  # the next question's attachment, as a user sees it before sending
    page.wait_for_selector("#attachments img")
    page.fill("#input", "Is it indoors?")
    page.wait_for_timeout(2500)  # the server's row counts have refreshed
    args.out.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(args.out))
    # The phone keeps this chat: the same browser storage.
    args.storage = context.storage_state()
    context.close()


def phone(browser, url: str, args) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 760}, color_scheme="dark", storage_state=args.storage)
    page = context.new_page()
    page.goto(url + "/")
    page.wait_for_selector("html[data-ready]")
    page.click("#toggle-side")
    page.click("#chats button.grow")  # opens the chat and closes the side panel
    page.wait_for_selector(".message.assistant .stats")
    page.wait_for_timeout(500)
    page.screenshot(path=str(args.phone_out))
    context.close()


if __name__ == "__main__":
    sys.exit(main())
