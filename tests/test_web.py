"""The chat page at / in a real browser (Playwright driving the system's Chromium) against a live server with the
tiny model, and the headers and origin rules that keep it to its own origin.

Browser tests skip, saying why, where Playwright or a Chromium is missing (.ci/run installs Debian's chromium).
"""

import base64
import json
import re
import shutil
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO, photo
from test_server import LiveServer

N = 12  # answer tokens in the tests
CLIP = REPO.parent / "shared" / "videos" / "hubble_pan.mp4"
WEB = REPO / "src" / "vlcache" / "web"


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def live(engine, tmp_path_factory):
    server = LiveServer(engine, tmp_path_factory.mktemp("web-states"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")
    path = chromium()
    if path is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium); the page's browser tests need one")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path)
        yield browser
        browser.close()


class Page:
    """A fresh browser context (its own localStorage) on the page, collecting page errors and every URL asked."""

    def __init__(self, browser, url: str, **context):
        self.context = browser.new_context(**context)
        self.page = self.context.new_page()
        self.errors, self.requests = [], []
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.page.goto(url + "/")
        self.page.wait_for_selector("html[data-ready]")

    def settings(self, **fields):
        self.page.click("#open-settings")
        for name, value in fields.items():
            self.page.fill(f"#set-{name}", str(value))
        self.page.click("#save-settings")

    def attach(self, *paths):
        self.page.set_input_files("#pick", [str(p) for p in paths])
        self.page.wait_for_function("n => document.querySelectorAll('#attachments li').length === n", arg=len(paths))

    def ask(self, question: str) -> dict:
        """Type a question, press Enter, wait for the answer's numbers or its error; the answer as saved."""
        count = self.page.locator(".message.assistant").count()
        self.page.fill("#input", question)
        self.page.press("#input", "Enter")
        last = f".message.assistant >> nth={count}"
        self.page.locator(last).locator(".stats, .error").first.wait_for(timeout=90_000)
        self.page.wait_for_selector("#send:not([hidden])")
        return self.saved()["messages"][-1]

    def saved(self) -> dict:
        chats = json.loads(self.page.evaluate("localStorage.getItem('vlcache.chats.v1')"))
        return chats[0]

    def stats(self, nth: int) -> dict:
        return self.page.locator(".message.assistant .stats").nth(nth).evaluate("e => ({...e.dataset})")

    def close(self):
        self.context.close()


@pytest.fixture
def page(browser, live):
    opened = Page(browser, live.url)
    yield opened
    assert opened.errors == [], opened.errors  # no script error on the page, whatever the test did
    opened.close()


def data_url(path: Path, kind: str) -> str:
    return f"data:{kind};base64," + base64.b64encode(path.read_bytes()).decode()


def api_answer(live, parts: list[dict], question: str, **extra) -> tuple[str, object]:
    completion = live.client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": parts + [{"type": "text", "text": question}]}],
        max_tokens=N, temperature=0, **extra)
    return completion.choices[0].message.content, completion.usage


def metric(live, name: str) -> float:
    with urllib.request.urlopen(live.url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def request(url: str, method="GET", body: bytes | None = None, headers: dict | None = None):
    """(status, headers, body bytes) of one HTTP request."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


# -- in the browser --------------------------------------------------------------------------------------------

def test_photo_answer_streams_the_apis_text_and_a_second_question_is_cached(page, live):
    page.settings(temperature=0, **{"max-tokens": N})
    page.attach(photo("chelsea.png"))
    first = page.ask("What is in this image?")
    assert "error" not in first and first["text"]
    api_text, usage = api_answer(live, [{"type": "image_url", "image_url": {"url": data_url(photo("chelsea.png"), "image/png")}}],
                                 "What is in this image?")
    assert first["text"] == api_text  # the page's streamed text is the API's answer to the same request
    stats = page.stats(0)
    assert int(stats["prompt"]) == usage.prompt_tokens and int(stats["completion"]) == usage.completion_tokens
    assert stats["cached"] == "0"  # the image was new to the server
    assert page.page.locator(".message.user img.thumb").count() == 1

    # Shift+Enter is a new line, Enter sends; the second question starts from the image's state.
    page.page.fill("#input", "line one")
    page.page.press("#input", "Shift+Enter")
    page.page.type("#input", "line two")
    assert page.page.locator(".message.assistant").count() == 1  # nothing sent yet
    page.page.press("#input", "Enter")
    page.page.locator(".message.assistant >> nth=1").locator(".stats").wait_for(timeout=90_000)
    assert page.saved()["messages"][2]["text"] == "line one\nline two"
    second = page.stats(1)
    assert 0 < int(second["cached"]) < int(second["prompt"])
    assert page.page.locator(".message.assistant .stats").nth(1).text_content().startswith(f"{int(second['cached']):,} of")

    # The bar: the model, its family and dtype, and the server's rows, from /health.
    health = live.get("/health")[1]
    assert page.page.text_content("#model") == f"{Path(health['model']).name} · {health['family']} · {health['dtype']}"
    assert re.fullmatch(r"\d+ running · \d+ queued", page.page.text_content("#rows"))

    # Everything the page asked for came from this server (the CSP would refuse the rest anyway).
    assert page.requests and all(u.startswith(live.url + "/") or u.startswith(("data:", "blob:")) for u in page.requests)


def test_a_video_is_asked_about(page, live):
    page.settings(temperature=0, **{"max-tokens": N})
    page.attach(CLIP)
    assert page.page.locator("#attachments video.thumb").count() == 1
    answer = page.ask("What happens in this video?")
    assert "error" not in answer
    api_text, usage = api_answer(live, [{"type": "video_url", "video_url": {"url": data_url(CLIP, "video/mp4")}}],
                                 "What happens in this video?")
    assert answer["text"] == api_text
    assert int(page.stats(0)["prompt"]) == usage.prompt_tokens > 100  # the frames' tokens are in the prompt


def test_a_listed_state_is_asked_about(page, live):
    image = base64.b64encode(photo("rocket.jpg").read_bytes()).decode()
    status, made = live.post("/v1/vlcache/cache", json.dumps({"parts": [{"type": "image", "data": image}]}).encode())
    assert status == 200, made
    status, listing = live.get("/v1/vlcache/states")
    assert status == 200
    listed = {s["id"]: s for s in listing["data"]}
    assert made["id"] in listed
    entry = listed[made["id"]]
    assert (entry["kind"], len(entry["parts"]), entry["tokens"]) == ("image", 1, made["tokens"])
    assert entry["bytes"] > 0 and entry["created"] and entry["parts"][0]["size"] == [640, 427]

    page.settings(temperature=0, **{"max-tokens": N})
    page.page.click("#refresh-states")
    row = page.page.locator(f"#states li[data-id='{made['id']}']")
    row.locator("button", has_text="Ask").click()
    assert made["id"][:12] in page.page.text_content("#bound")
    answer = page.ask("What is this?")
    status, api = live.post("/v1/vlcache/ask", json.dumps({"state": made["id"], "max_new_tokens": N, "temperature": 0,
                                                            "messages": [{"role": "user", "content": "What is this?"}]}).encode())
    assert status == 200 and answer["text"] == api["answer"]["text"]
    assert int(page.stats(0)["cached"]) == made["tokens"]  # the whole state was reused


def test_drop_paste_remove_regenerate_edit_new_chat_export_import(page, browser, live, tmp_path):
    p = page.page
    page.settings(temperature=0, **{"max-tokens": N})
    # A photograph dropped on the page and one pasted: two thumbnails; one removed before sending.
    photo_b64 = base64.b64encode(photo("coffee.png").read_bytes()).decode()
    for event in ("drop", "paste"):
        p.evaluate("""([event, b64]) => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const data = new DataTransfer();
            data.items.add(new File([bytes], event + ".png", {type: "image/png"}));
            const e = event === "drop" ? new DragEvent("drop", {dataTransfer: data, bubbles: true, cancelable: true})
                                       : new ClipboardEvent("paste", {clipboardData: data, bubbles: true, cancelable: true});
            document.getElementById("input").dispatchEvent(e);
        }""", [event, photo_b64])
    p.wait_for_function("() => document.querySelectorAll('#attachments li').length === 2")
    p.click("#attachments li:first-child .remove")
    assert p.get_attribute("#attachments img", "alt") == "paste.png"
    first = page.ask("What is on the table?")
    assert [a["name"] for a in page.saved()["messages"][0]["attachments"]] == ["paste.png"]

    # Regenerate: the same question again (greedy: the same answer), one answer still.
    p.click(".message.assistant button:has-text('Regenerate')")
    p.wait_for_selector("#send:not([hidden])")
    p.locator(".message.assistant .stats").wait_for()
    messages = page.saved()["messages"]
    assert len(messages) == 2 and messages[1]["text"] == first["text"] and messages[1]["stats"]["cached"] > 0

    # Edit and resend: the question changes, what followed it is answered again.
    page.ask("And the colours?")
    p.locator(".message.user button:has-text('Edit')").first.click()
    p.fill(".message.user textarea.edit", "What is in the cup?")
    p.click(".message.user button:has-text('Send')")
    p.wait_for_selector("#send:not([hidden])")
    p.locator(".message.assistant .stats").wait_for()
    messages = page.saved()["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"] and messages[0]["text"] == "What is in the cup?"
    api_text, _ = api_answer(live, [{"type": "image_url", "image_url": {"url": data_url(photo("coffee.png"), "image/png")}}],
                             "What is in the cup?")
    assert messages[1]["text"] == api_text

    # New chat: an empty page; the old chat stays in the list.
    p.click("#new-chat")
    assert p.locator(".message").count() == 0 and p.locator("#chats li").count() == 1

    # Export, then import into a browser that has never seen the chat: the same messages.
    with p.expect_download() as download:
        p.click("#export")
    exported = tmp_path / "chats.json"
    download.value.save_as(exported)
    other = Page(browser, live.url)
    try:
        other.page.set_input_files("#import-file", str(exported))
        other.page.click("#chats button:has-text('What is on the table?')")
        assert other.page.locator(".message.assistant").count() == 1
        assert other.saved()["messages"] == page.saved()["messages"]
        assert other.page.locator(".message.user img.thumb").count() == 1  # the photograph came along
        assert other.errors == []
    finally:
        other.close()


def test_salted_states_are_neither_listed_nor_found_without_their_salt(live, monkeypatch):
    """A state made for one tenant (cache_salt) answers that tenant only: not a request without the salt, even
    after the store has rescanned its folder (which indexes files by the key their metadata gives), and it is
    not listed; neither is the same state made without a salt (a chat completion's: listed only when shared
    through /v1/vlcache/cache or /v1/images, test_hardening3.py::test_2_...)."""
    from vlcache.serving import store

    monkeypatch.setattr(store, "RESCAN_SECONDS", 0.0)  # every miss rescans the folder

    def cached_then_listed(**extra) -> tuple[int, set]:
        completion = live.client.chat.completions.create(model="any", max_tokens=1, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(photo("astronaut.png"), "image/png")}},
            {"type": "text", "text": "Hi"}]}], **extra)
        return completion.usage.prompt_tokens_details.cached_tokens, {s["id"] for s in live.get("/v1/vlcache/states")[1]["data"]}

    before = {s["id"] for s in live.get("/v1/vlcache/states")[1]["data"]}
    assert cached_then_listed(extra_body={"cache_salt": "tenant-a"}) == (0, before)
    cached, listed = cached_then_listed(extra_body={"cache_salt": "tenant-a"})
    assert cached > 0 and listed == before  # its tenant is answered from it
    assert cached_then_listed(extra_body={"cache_salt": "tenant-b"})[0] == 0
    cached, listed = cached_then_listed()
    assert cached == 0 and listed == before  # computed anew, and not listed


def test_stop_cancels_the_row_on_the_server(page, live):
    page.settings(temperature=0, **{"max-tokens": 3000})
    steps = metric(live, "vlcache_batch_size_count")  # decode steps the server has run
    page.page.fill("#input", "Tell me a long story.")
    page.page.press("#input", "Enter")
    page.page.wait_for_function("() => document.querySelector('.message.assistant .body').textContent.length > 0")
    assert metric(live, "vlcache_running_rows") == 1  # the answer is decoding on the server
    page.page.click("#stop")
    page.page.wait_for_selector("#send:not([hidden])")
    deadline = 20
    while metric(live, "vlcache_running_rows") != 0 and deadline > 0:
        page.page.wait_for_timeout(250)
        deadline -= 0.25
    assert metric(live, "vlcache_running_rows") == 0  # the row was freed
    assert metric(live, "vlcache_batch_size_count") - steps < 1500  # by the stop, long before its 3000 tokens
    saved = page.saved()["messages"][-1]
    assert saved.get("stopped") and "stats" not in saved
    assert page.page.locator(".message.assistant .note", has_text="stopped").count() == 1


def test_errors_are_one_line_by_their_message_and_the_page_stays_usable(browser, engine, tmp_path):
    server = LiveServer(engine, tmp_path / "states", max_body_bytes=400_000, max_batch=1, max_queue=0)
    page = Page(browser, server.url, viewport={"width": 390, "height": 800})  # narrow: long errors would wrap
    try:
        page.settings(temperature=0, **{"max-tokens": 4})
        broken = tmp_path / "broken.png"
        broken.write_bytes(b"this is not a PNG file at all")
        page.attach(broken)
        failed = page.ask("What is this?")
        line = page.page.locator(".message.assistant.failed .error")
        assert failed["error"] and line.text_content() == "error: " + failed["error"]
        assert "\n" not in failed["error"]

        # Over the server's body limit: the same limit as the API, its 413 message by the question.
        page.attach(photo("coffee.png"))
        too_large = page.ask("And this?")
        assert "400,000-byte limit" in too_large["error"]

        # The server busy (one row, no queue, another client's long answer running): its 429 message.
        hog = server.client.chat.completions.create(model="any", max_tokens=3000, stream=True,
                                                    messages=[{"role": "user", "content": "Tell me a long story."}])
        next(iter(hog))
        busy = page.ask("Are you there?")
        assert busy["error"].startswith("the server is busy")
        hog.close()
        for _ in range(80):
            if metric(server, "vlcache_running_rows") == 0:
                break
            page.page.wait_for_timeout(250)

        # The next question works: the failed exchanges (and their files) are not sent again.
        page.attach(photo("camera.png"))
        ok = page.ask("What is this?")
        assert "error" not in ok and ok["stats"]["prompt"] > 0
        assert page.page.locator(".message.assistant .stats").count() == 1
        errors = page.page.locator(".message.assistant .error")
        assert errors.count() == 3
        assert errors.evaluate_all("lines => lines.every(e => e.offsetHeight <= 1.5 * parseFloat(getComputedStyle(e).lineHeight))")

        # The server gone: one line, and the page still answers clicks.
        server.close()
        gone = page.ask("Still there?")
        assert gone["error"] == "cannot reach the server"
        assert page.page.is_visible("#send") and page.errors == []
    finally:
        page.close()
        server.close()


HOSTILE = "\n\n".join([
    "**bold** and `code`",
    "<img src=x onerror=\"window.pwned='img'\">",
    "[a link](javascript:window.pwned='markdown-link')",
    "<a href=\"javascript:window.pwned='html-link'\" id=\"evil\">an html link</a>",
    "<script>window.pwned='script'</script>",
    "<svg><script>window.pwned='svg'</script><animate onbegin=\"window.pwned='svg-animate'\"/></svg>",
    "<iframe srcdoc=\"<script>parent.pwned='iframe'</script>\"></iframe>",
    "<details open ontoggle=\"window.pwned='details'\">x</details>",
])


def _import_hostile_chat(page: Page, tmp_path: Path) -> None:
    export = {"format": "vlcache-chats", "version": 1, "chats": [{
        "id": "hostile", "title": "hostile", "updated": 1, "messages": [
            {"role": "user", "text": "<img src=x onerror=\"window.pwned='user'\">", "attachments": []},
            {"role": "assistant", "text": HOSTILE}]}]}
    path = tmp_path / "chats.json"
    path.write_text(json.dumps(export))
    page.page.set_input_files("#import-file", str(path))
    page.page.click("#chats button:has-text('hostile')")
    page.page.wait_for_selector(".message.assistant .markdown strong")


@pytest.mark.parametrize("bypass_csp", [False, True], ids=["with-csp", "sanitizer-alone"])
def test_hostile_markdown_and_html_never_run(browser, live, tmp_path, bypass_csp):
    """An imported chat whose answer is hostile HTML renders as inert markup, with the page's CSP and, to test the
    sanitizer by itself, with the CSP bypassed. Controls: the same HTML put in raw does run once the CSP is
    bypassed (the payload and the flag work), and is stopped by the CSP alone otherwise."""
    page = Page(browser, live.url, bypass_csp=bypass_csp)
    try:
        _import_hostile_chat(page, tmp_path)
        page.page.click(".message.assistant a:has-text('a link')")
        page.page.click(".message.assistant a:has-text('an html link')")
        page.page.wait_for_timeout(500)  # image errors, toggles and frames have had their chance
        assert page.page.evaluate("window.pwned") is None
        markdown = page.page.locator(".message.assistant .markdown")
        assert markdown.locator("script, iframe, svg, [onerror], [ontoggle], [id='evil']").count() == 0
        assert all(not (href or "").startswith("javascript:") for href in
                   markdown.locator("a").evaluate_all("links => links.map(a => a.getAttribute('href'))"))
        assert page.page.text_content(".message.user .body") == "<img src=x onerror=\"window.pwned='user'\">"

        page.page.evaluate("html => { const d = document.createElement('div'); d.innerHTML = html; document.body.append(d) }",
                           "<img src=x onerror=\"window.pwned='raw'\">")
        page.page.wait_for_timeout(500)
        assert page.page.evaluate("window.pwned") == ("raw" if bypass_csp else None)
    finally:
        page.close()


def test_phone_width_and_dark_theme(browser, live):
    page = Page(browser, live.url, viewport={"width": 390, "height": 800}, color_scheme="light")
    try:
        p = page.page
        assert p.evaluate("document.documentElement.scrollWidth") <= 390  # nothing sticks out sideways
        assert p.is_visible("#input") and p.is_visible("#send")
        assert p.evaluate("document.getElementById('side').getBoundingClientRect().right") <= 0  # the side panel is away
        p.click("#toggle-side")
        p.wait_for_function("() => document.getElementById('side').getBoundingClientRect().left >= 0")
        p.click("#toggle-side")
        light = p.evaluate("getComputedStyle(document.body).backgroundColor")
        p.click("#theme")
        assert p.get_attribute("html", "data-theme") == "dark"
        assert p.evaluate("getComputedStyle(document.body).backgroundColor") != light
        p.reload()
        p.wait_for_selector("html[data-ready]")
        assert p.get_attribute("html", "data-theme") == "dark"  # remembered
        assert page.errors == []
    finally:
        page.close()


# -- without a browser -------------------------------------------------------------------------------------------

def test_chat_completions_carry_timings(live):
    parts = [{"type": "image_url", "image_url": {"url": data_url(photo("hubble_deep_field.jpg"), "image/jpeg")}},
             {"type": "text", "text": "What is this?"}]
    completion = live.client.chat.completions.create(model="any", messages=[{"role": "user", "content": parts}],
                                                     max_tokens=N, temperature=0)
    timings = completion.model_extra["timings"]
    usage = completion.usage
    assert timings["predicted_n"] == usage.completion_tokens
    assert timings["cache_n"] == usage.prompt_tokens_details.cached_tokens == 0
    assert timings["prompt_n"] == usage.prompt_tokens and timings["prompt_ms"] > 0 and timings["predicted_ms"] > 0
    assert timings["predicted_per_second"] > 0

    chunks = list(live.client.chat.completions.create(model="any", messages=[{"role": "user", "content": parts}],
                                                      max_tokens=N, temperature=0, stream=True))
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(final) == 1
    streamed = final[0].model_extra["timings"]
    assert streamed["cache_n"] > 0 and streamed["cache_n"] + streamed["prompt_n"] == usage.prompt_tokens
    assert streamed["predicted_n"] == usage.completion_tokens
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == completion.choices[0].message.content


def test_page_headers_and_assets(live):
    status, headers, body = request(live.url + "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html") and b'<script type="module" src="web/app.js">' in body
    csp = dict(part.strip().split(" ", 1) for part in headers["Content-Security-Policy"].split(";"))
    assert csp["script-src"] == "'self'" and csp["default-src"] == "'none'" and csp["connect-src"] == "'self'"
    assert "unsafe" not in headers["Content-Security-Policy"] and "http" not in headers["Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff" and headers["X-Frame-Options"] == "DENY"
    assert headers["Access-Control-Allow-Origin"] is None  # no CORS unless --cors-origin
    assert b"<script>" not in body and b"<style" not in body and not re.search(rb"\s(on[a-z]+|style)=", body)  # nothing inline
    for asset, kind in [("app.js", "javascript"), ("style.css", "text/css"), ("vendor/marked.min.js", "javascript"),
                        ("vendor/purify.min.js", "javascript")]:
        status, headers, _ = request(f"{live.url}/web/{asset}")
        assert status == 200 and kind in headers["Content-Type"] and headers["Content-Security-Policy"]
    assert request(live.url + "/web/../serving/web.py")[0] == 404
    assert request(live.url + "/health")[1]["Content-Security-Policy"]  # the API's answers carry the headers too


def test_other_origins_are_refused_unless_named(engine, live, tmp_path):
    chat = json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}).encode()
    json_type = {"Content-Type": "application/json"}
    status, _, body = request(live.url + "/v1/chat/completions", "POST", chat, {**json_type, "Origin": "http://evil.example"})
    assert status == 403 and json.loads(body)["error"]["message"].startswith("requests from another site")
    assert request(live.url + "/v1/chat/completions", "POST", chat, {**json_type, "Origin": live.url})[0] == 200
    assert request(live.url + "/v1/chat/completions", "POST", chat, json_type)[0] == 200  # no Origin: not a browser page
    status, headers, _ = request(live.url + "/v1/chat/completions", "OPTIONS",
                                 headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert headers["Access-Control-Allow-Origin"] is None

    server = LiveServer(engine, tmp_path / "states", cors_origin="http://allowed.example")
    try:
        preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
        status, headers, _ = request(server.url + "/v1/chat/completions", "OPTIONS",
                                     headers={"Origin": "http://allowed.example", **preflight})
        assert status == 200 and headers["Access-Control-Allow-Origin"] == "http://allowed.example"
        status, headers, _ = request(server.url + "/v1/chat/completions", "OPTIONS",
                                     headers={"Origin": "http://evil.example", **preflight})
        assert headers["Access-Control-Allow-Origin"] is None
        status, headers, _ = request(server.url + "/v1/chat/completions", "POST", chat,
                                     {**json_type, "Origin": "http://allowed.example"})
        assert status == 200 and headers["Access-Control-Allow-Origin"] == "http://allowed.example"
        assert request(server.url + "/v1/chat/completions", "POST", chat, {**json_type, "Origin": "http://evil.example"})[0] == 403
    finally:
        server.close()


def test_no_web_turns_the_page_off(engine, tmp_path):
    server = LiveServer(engine, tmp_path / "states", web=False)
    try:
        status, _, body = request(server.url + "/")
        assert status == 404 and json.loads(body)["error"]["message"]
        assert request(server.url + "/web/app.js")[0] == 404
        assert request(server.url + "/health")[0] == 200  # the API is still there
    finally:
        server.close()


def test_serve_flags():
    from vlcache.cli import build_parser
    from vlcache.commands.serve import serve_options

    args = build_parser().parse_args(["serve", "--no-web", "--cors-origin", "http://localhost:3000/"])
    options = serve_options(args, Path("states"), None)
    assert (options.web, options.cors_origin) == (False, "http://localhost:3000")
    options = serve_options(build_parser().parse_args(["serve"]), Path("states"), None)
    assert (options.web, options.cors_origin) == (True, None)
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["serve", "--cors-origin", "localhost:3000/path"])
    assert exit_.value.code == 2


def test_the_page_ships_as_package_data():
    """Every file of the page is covered by pyproject's package-data (so installs carry it), and each vendored
    library has its license and its version recorded."""
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["vlcache"]
    files = [p.relative_to(WEB.parent).as_posix() for p in WEB.rglob("*") if p.is_file()]
    assert "web/index.html" in files and "web/vendor/purify.min.js" in files
    assert all(any(Path(f).match(p) and f.count("/") == p.count("/") for p in patterns) for f in files), files
    readme = (WEB / "vendor" / "README.md").read_text()
    for library, version, license_file in [("marked", "18.2.1", "LICENSE.marked"), ("dompurify", "3.5.0", "LICENSE.dompurify")]:
        assert f"| {library} | {version} |" in readme and (WEB / "vendor" / license_file).is_file()
        shipped = (WEB / "vendor" / ("marked.min.js" if library == "marked" else "purify.min.js")).read_text()
        assert re.search(rf"(v| ){re.escape(version)} ", shipped[:400])  # the file's own banner names the version
