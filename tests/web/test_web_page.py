"""The web page at ``/``: its routes, and the page itself driven in a real browser.

The browser tests run Debian's chromium headless through selenium against the
real app under uvicorn on 127.0.0.1 (``LiveServer``), with the real embedder
and a scripted model that streams word by word.  They need the browser and its
driver: ``apt-get install chromium chromium-driver``.  Chrome is told to resolve
no host but 127.0.0.1, and the tests check that the page asked for nothing else.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import Select, WebDriverWait

from rag_service.config import Settings
from rag_service.embedding import SentenceTransformerEmbedder
from rag_service.errors import ModelUnavailable
from rag_service.llm.base import ChatMessage, StreamDelta, Usage
from rag_service.prompting import NO_ANSWER
from tests.helpers import ScriptedChatModel, make_pdf, wait_for_job
from tests.live import LiveServer

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"

PAGES = [
    "The museum opens at nine o'clock on weekdays.",
    "Tickets cost twelve euros for adults and five euros for children.",
    "The cafe on the roof serves lunch until three in the afternoon.",
]
TICKETS = "How much does an adult ticket cost?"
ANSWER = "Adults pay twelve euros [1]."


class SlowChatModel(ScriptedChatModel):
    """Streams its answer word by word, so the page can be seen mid-answer.

    After ``hold_after`` words it waits for ``release``; ``delay`` seconds pass
    before each word.  ``stopped`` is set when the stream is closed before its
    last word: the client hung up and the service stopped the generation.
    """

    def __init__(self, answer: str) -> None:
        super().__init__(answer)
        self.hold_after: int | None = 2
        self.delay = 0.0
        self.release = threading.Event()
        self.stopped = threading.Event()
        self.written = 0

    def stream(
        self,
        messages: Sequence[ChatMessage],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        stop: Sequence[str] | None = None,
    ) -> Iterator[StreamDelta]:
        self.prompts.append(list(messages))
        words = self.answer.split(" ")
        self.written = 0
        try:
            for word in words:
                if self.written == self.hold_after:
                    self.release.wait(timeout=30)
                time.sleep(self.delay)
                yield StreamDelta(word if self.written == len(words) - 1 else word + " ")
                self.written += 1
            yield StreamDelta("", usage=Usage(50, len(words)), finish_reason="stop")
        finally:
            if self.written < len(words):
                self.stopped.set()


# -- the routes, without a browser --------------------------------------------


def test_the_page_and_its_files_are_served(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert '<script type="module" src="/static/app.js">' in page.text
    assert '<link rel="stylesheet" href="/static/style.css">' in page.text

    script = client.get("/static/app.js")
    assert script.status_code == 200
    assert script.headers["content-type"].startswith("text/javascript")
    assert "innerHTML" not in script.text and "insertAdjacentHTML" not in script.text
    style = client.get("/static/style.css")
    assert style.status_code == 200 and style.headers["content-type"].startswith("text/css")
    assert "url(" not in style.text and "@import" not in style.text

    # Only files on the list: anything else, including a way out of the folder, is a 404.
    for path in ("/static/index.html", "/static/nope.js", "/static/..%2Froutes%2Fweb.py"):
        missing = client.get(path)
        assert missing.status_code == 404, path
        assert missing.json()["error"]["code"] == "not_found"
    assert not {"/", "/static/{name}"} & set(client.get("/openapi.json").json()["paths"])


# -- the page in a browser -----------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    """Headless chromium; fails (never skips) when it is not installed."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.fail(
            f"{' and '.join(missing)} not found: the web page test needs a real browser; "
            "run `apt-get install chromium chromium-driver`",
            pytrace=False,
        )
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1280,1000",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--disable-features=Translate,OptimizationHints,MediaRouter",
        # Any host but 127.0.0.1 fails to resolve: the test never touches the network.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SE_OFFLINE", "true")  # never let Selenium Manager download anything
        driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.set_script_timeout(10)
    try:
        yield driver
    finally:
        driver.quit()


def until(driver: WebDriver, condition: Any, what: str, timeout: float = 20) -> Any:
    """Wait for ``condition(driver)`` to be truthy; the failure says what was awaited."""
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)
    except TimeoutException:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}") from None


def element(driver: WebDriver, css: str) -> WebElement:
    return driver.find_element(By.CSS_SELECTOR, css)


def text_of(driver: WebDriver, css: str) -> str:
    """The element's text as the DOM holds it, visible or not."""
    return str(element(driver, css).get_attribute("textContent") or "").strip()


def visible(css: str) -> Any:
    def check(driver: WebDriver) -> WebElement | None:
        found = driver.find_elements(By.CSS_SELECTOR, css)
        return found[0] if found and found[0].is_displayed() else None

    return check


def open_page(driver: WebDriver, url: str) -> None:
    for kind in ("performance", "browser"):
        driver.get_log(kind)  # drop what earlier tests left
    driver.get(url + "/")
    until(
        driver,
        lambda d: (
            d.execute_script("return document.readyState") == "complete"
            and element(d, "#collection").find_elements(By.TAG_NAME, "option")
        ),
        "the page to load its collections",
    )


def create_collection(driver: WebDriver, name: str) -> None:
    element(driver, "#new-collection").send_keys(name)
    element(driver, "#new-collection-form button[type=submit]").click()
    assert Select(element(driver, "#collection")).first_selected_option.get_attribute("value") == (
        name
    )


def ask(driver: WebDriver, question: str) -> None:
    box = element(driver, "#question")
    box.clear()
    box.send_keys(question)
    element(driver, "#ask").click()


def requests_made(driver: WebDriver) -> list[dict[str, Any]]:
    """Every request Chrome sent since the last call (from its DevTools performance log)."""
    sent = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            sent.append(message["params"]["request"])
    return sent


def assert_stayed_local(driver: WebDriver, url: str, sent: list[dict[str, Any]]) -> None:
    loaded = driver.execute_script(
        "return performance.getEntriesByType('navigation')"
        ".concat(performance.getEntriesByType('resource')).map(e => e.name)"
    )
    assert loaded, "the browser recorded no resources"
    elsewhere = [u for u in [*loaded, *(r["url"] for r in sent)] if not u.startswith(url + "/")]
    assert not elsewhere, f"the page loaded from outside the service: {elsewhere}"


def console_errors(driver: WebDriver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def test_upload_ask_and_read_the_cited_source(
    browser: WebDriver,
    settings: Settings,
    embedder: SentenceTransformerEmbedder,
    tmp_path: Path,
) -> None:
    pdf = tmp_path / "guide.pdf"
    pdf.write_bytes(make_pdf(PAGES))
    model = SlowChatModel(ANSWER)
    with LiveServer(settings, embedder, model) as live:
        try:
            open_page(browser, live.url)
            assert browser.title == "RAG service"
            assert text_of(browser, "#collection option") == "No collections yet"

            create_collection(browser, "docs")
            element(browser, "#files").send_keys(str(pdf))
            element(browser, "#upload").click()
            job = until(browser, visible("li.job[data-status=succeeded]"), "the job to succeed")
            assert "guide.pdf" in job.text and "succeeded" in job.text
            assert job.find_element(By.TAG_NAME, "progress").get_attribute("value") == "100"
            row = until(
                browser, visible("#documents tbody tr[data-status=indexed]"), "the document row"
            )
            cells = [c.text for c in row.find_elements(By.TAG_NAME, "td")]
            assert cells[:3] == ["guide.pdf", "indexed", "3"], cells
            until(
                browser,
                lambda d: "docs (1 document, " in text_of(d, "#collection option"),
                "the collection's counts",
            )

            ask(browser, TICKETS)
            # The model holds after two words: the page shows them before the answer is done.
            until(
                browser,
                lambda d: (
                    text_of(d, "#answer") == "Adults pay"
                    and "streaming" in (element(d, "#answer").get_attribute("class") or "")
                ),
                "the first tokens to stream in",
            )
            assert element(browser, "#answer").get_attribute("aria-busy") == "true"
            assert not element(browser, "#ask").is_enabled()
            assert element(browser, "#stop").is_enabled()
            assert "guide.pdf" in text_of(browser, "#sources")  # the sources came first
            model.release.set()

            until(browser, visible("#answer.done"), "the answer to finish")
            assert text_of(browser, "#answer") == ANSWER
            assert element(browser, "#ask").is_enabled()
            assert not element(browser, "#stop").is_enabled()
            assert not element(browser, "#verdict").is_displayed()
            assert not element(browser, "#degraded").is_displayed()
            cost = text_of(browser, "#cost")
            assert "direct" in cost and "1 model call" in cost and "completion tokens" in cost

            element(browser, "#answer button.citation[data-n='1']").click()
            panel = until(browser, visible("#source-panel"), "the source panel")
            assert text_of(browser, "#source-title") == "[1] guide.pdf"
            assert text_of(browser, "#source-meta").startswith("Page 2")
            assert text_of(browser, "#source-text") == PAGES[1]
            assert browser.switch_to.active_element == panel

            assert_stayed_local(browser, live.url, requests_made(browser))
            assert console_errors(browser) == []

            ARTIFACTS.mkdir(exist_ok=True)
            height = browser.execute_script("return document.documentElement.scrollHeight")
            browser.set_window_size(1280, max(800, min(int(height) + 140, 2400)))
            assert browser.save_screenshot(str(ARTIFACTS / "web-page.png"))
        finally:
            model.release.set()
            browser.set_window_size(1280, 1000)


def test_errors_stop_and_the_api_key(
    browser: WebDriver, settings: Settings, embedder: SentenceTransformerEmbedder, tmp_path: Path
) -> None:
    model = SlowChatModel(" ".join(["word"] * 300))
    model.hold_after = None
    model.delay = 0.02
    odd_name = '<img src=x onerror="alert(1)">notes.md'
    with LiveServer(settings, embedder, model) as live, httpx.Client(base_url=live.url) as http:
        receipts = [
            http.post(
                "/v1/collections/docs/documents",
                files=[("files", ("guide.pdf", make_pdf(PAGES)))],
            ),
            http.post(
                "/v1/collections/docs/documents",
                json={"documents": [{"text": "Markup is text here.", "source": odd_name}]},
            ),
        ]
        for receipt in receipts:
            assert wait_for_job(http, receipt.json()["job_id"])["status"] == "succeeded"
        open_page(browser, live.url)

        # Text from the server is shown as text, never parsed as markup.
        until(browser, lambda d: odd_name in text_of(d, "#documents tbody"), "the odd name")
        assert not browser.find_elements(By.CSS_SELECTOR, "#documents img")

        # The event-stream parser copes with CRLF split across reads, comments and
        # multi-line data (the module is already loaded: importing it again reruns nothing).
        parsed = browser.execute_async_script(
            """
            const done = arguments[arguments.length - 1];
            import('/static/app.js').then(({ SseParser }) => {
              const p = new SseParser();
              const out = [
                ...p.push(': ping\\r\\nevent: token\\r'),
                ...p.push('\\ndata: {"text": "a"}\\r\\n\\r'),
                ...p.push('\\ndata: one\\ndata: two\\n\\nevent: done\\ndata: cut'),
                ...p.push('', true),
              ];
              done(out);
            });
            """
        )
        assert parsed == [
            {"event": "token", "data": '{"text": "a"}'},
            {"event": "message", "data": "one\ntwo"},
        ]

        # A question to a collection that does not exist yet: the API's message is shown.
        create_collection(browser, "nowhere")
        assert "new: upload a file" in text_of(browser, "#collection option[value=nowhere]")
        ask(browser, TICKETS)
        error = until(browser, visible("#ask-error"), "the error message")
        expected = http.post("/v1/query", json={"collection": "nowhere", "question": "x"})
        assert expected.status_code == 404
        message = expected.json()["error"]["message"]
        assert error.text == message == "collection 'nowhere' does not exist"
        assert not element(browser, "#result").is_displayed()
        assert element(browser, "#ask").is_enabled()

        # An upload the service refuses: its message too.
        bad = tmp_path / "program.exe"
        bad.write_bytes(b"MZ\x90\x00" + bytes(200))
        element(browser, "#files").send_keys(str(bad))
        element(browser, "#upload").click()
        refused = until(browser, visible("#upload-error"), "the upload error")
        assert refused.text.startswith("Upload failed: ") and "program.exe" in refused.text

        # A file the service takes but cannot read: the job fails and says why.
        broken = tmp_path / "broken.pdf"
        broken.write_bytes(b"%PDF-1.4\n" + b"not really a pdf " * 20)
        element(browser, "#files").clear()  # it still holds the refused file
        element(browser, "#files").send_keys(str(broken))
        element(browser, "#upload").click()
        failed = until(browser, visible("li.job[data-status=failed]"), "the job to fail")
        job = http.get(f"/v1/jobs/{failed.get_attribute('data-job')}").json()
        assert job["status"] == "failed" and job["error"]
        assert failed.find_element(By.CSS_SELECTOR, ".error-text").text == job["error"]
        assert not element(browser, "#upload-error").is_displayed()

        # Stop closes the connection, and the service stops the generation.
        Select(element(browser, "#collection")).select_by_value("docs")
        ask(browser, TICKETS)
        until(browser, lambda d: text_of(d, "#answer").startswith("word word"), "tokens")
        element(browser, "#stop").click()
        until(browser, lambda d: text_of(d, "#ask-status") == "Stopped.", "the stopped status")
        assert model.stopped.wait(10), "the generation went on after Stop"
        assert model.written < 300
        assert "stopped" in (element(browser, "#answer").get_attribute("class") or "")
        assert element(browser, "#ask").is_enabled()
        assert not element(browser, "#stop").is_enabled()
        assert not element(browser, "#ask-error").is_displayed()

        # The API key is kept in the browser and sent as a bearer token.
        element(browser, "#api-key").send_keys("sk-test-123")
        element(browser, "#key-form button[type=submit]").click()
        requests_made(browser)
        browser.refresh()
        until(
            browser,
            lambda d: element(d, "#api-key").get_attribute("value") == "sk-test-123",
            "the saved key after a reload",
        )
        element(browser, "#refresh").click()
        until(browser, lambda d: text_of(d, "#documents-summary") == "2 documents", "the list")
        sent = requests_made(browser)
        api_calls = [r for r in sent if "/v1/" in r["url"]]
        assert api_calls
        assert all(r["headers"].get("Authorization") == "Bearer sk-test-123" for r in api_calls)
        element(browser, "#api-key-forget").click()
        assert browser.execute_script("return localStorage.getItem('rag.apiKey')") is None

        assert_stayed_local(browser, live.url, sent)


def test_reasoning_abstaining_and_degraded_answers(
    browser: WebDriver, settings: Settings, embedder: SentenceTransformerEmbedder
) -> None:
    model = ScriptedChatModel()
    with LiveServer(settings, embedder, model) as live, httpx.Client(base_url=live.url) as http:
        receipt = http.post(
            "/v1/collections/docs/documents", files=[("files", ("guide.pdf", make_pdf(PAGES)))]
        )
        assert wait_for_job(http, receipt.json()["job_id"])["status"] == "succeeded"
        open_page(browser, live.url)

        # cot: the reasoning comes apart from the answer, folded away until opened.
        model.answer = (
            "Source [1] lists the ticket prices; the adult price is twelve euros.\n"
            "Final answer: Adults pay twelve euros [1]."
        )
        Select(element(browser, "#strategy")).select_by_value("cot")
        ask(browser, TICKETS)
        until(browser, visible("#answer.done"), "the cot answer")
        assert text_of(browser, "#answer") == ANSWER
        assert text_of(browser, "#cost").startswith("cot · 1 model call")
        box = element(browser, "#reasoning-box")
        assert box.is_displayed() and box.get_attribute("open") is None
        element(browser, "#reasoning-box summary").click()
        assert "the adult price is twelve euros" in element(browser, "#reasoning").text

        # The model finds no answer in the sources: said plainly, styled apart.
        model.answer = NO_ANSWER
        Select(element(browser, "#strategy")).select_by_value("direct")
        ask(browser, TICKETS)
        verdict = until(browser, visible("#verdict"), "the not-answerable verdict")
        assert verdict.text == "Not answerable: the model found no answer in the sources."
        assert "unanswerable" in (element(browser, "#result").get_attribute("class") or "")
        assert not element(browser, "#reasoning-box").is_displayed()

        # The model is down: the sources still come back, with a notice saying why.
        model.error = ModelUnavailable("the model server is down")
        ask(browser, TICKETS)
        notice = until(browser, visible("#degraded"), "the degraded notice")
        assert "the model server is down" in notice.text
        assert not element(browser, "#verdict").is_displayed()
        assert "guide.pdf" in text_of(browser, "#sources")
        assert not element(browser, "#ask-error").is_displayed()
        assert console_errors(browser) == []
