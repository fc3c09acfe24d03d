"""The dashboard in a real headless Chromium, against a real PostgreSQL, on both drivers.

Debian's ``chromium`` and ``chromium-driver`` packages drive it through
selenium (``.ci/run`` installs them); a machine without them fails here
rather than skip. The app is served by werkzeug in a thread, on a free port
of 127.0.0.1, with its listener thread handling events as in production.

``PGEVENTS_DASHBOARD_SCREENSHOT=docs/dashboard.png`` writes the screenshot
of the README there (by default it goes to the test's temporary directory).
"""
from __future__ import annotations

import os
import re
import shutil
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from conftest import Recorder, thing_app, wait_until
from flask import Flask, Request
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from werkzeug.serving import BaseWSGIServer, make_server

DESKTOP = (1280, 1400)
PHONE = (390, 844)
HOSTILE = "<script>document.title = 'pwned'</script>"


def find_program(*names: str) -> str:
    for name in names:
        path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
        if path:
            return path
    pytest.fail(
        f"{' or '.join(names)} is not installed: the dashboard's browser test needs Debian's"
        " chromium and chromium-driver ('apt-get install -y chromium chromium-driver', as .ci/run does)."
    )


@pytest.fixture(scope="module")
def chromium() -> Iterator[WebDriver]:
    """One headless Chromium for the module, closed at its end."""
    options = webdriver.ChromeOptions()
    # Both paths given: selenium then never looks for (or downloads) a browser or a driver.
    options.binary_location = find_program("chromium", "chromium-browser")
    for argument in (
        "--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
        "--disable-extensions", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--hide-scrollbars", f"--window-size={DESKTOP[0]},{DESKTOP[1]}",
    ):
        options.add_argument(argument)
    service = Service(executable_path=find_program("chromedriver"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture
def browser(chromium: WebDriver) -> Iterator[WebDriver]:
    """The module's Chromium, with no cookie left by an earlier test (every app is on 127.0.0.1)."""
    chromium.delete_all_cookies()
    yield chromium
    chromium.delete_all_cookies()


@pytest.fixture
def serve() -> Iterator[Callable[[Flask], str]]:
    """Serve an app with werkzeug in a thread on a free local port; return its base URL."""
    servers: list[tuple[BaseWSGIServer, threading.Thread]] = []

    def start(app: Flask) -> str:
        server = make_server("127.0.0.1", 0, app, threaded=True)
        thread = threading.Thread(target=server.serve_forever, name="dashboard-server", daemon=True)
        thread.start()
        servers.append((server, thread))
        return f"http://127.0.0.1:{server.port}"

    yield start
    for server, thread in servers:
        server.shutdown()
        thread.join(10)
        server.server_close()


def operator_cookie_only(request: Request) -> bool:
    return request.cookies.get("operator") == "yes"


def text(browser: WebDriver, selector: str) -> str:
    return str(browser.find_element(By.CSS_SELECTOR, selector).text)


def notice_after_action(browser: WebDriver, expected: str, timeout: float = 15.0) -> str:
    """Wait until the page shows ``expected`` as its notice, and return the notice.

    A click that submits a form returns before the next page has loaded, and
    the page before it may show the notice of an earlier action.
    """

    def notice() -> str:
        return next((element.text for element in browser.find_elements(By.CSS_SELECTOR, ".notice")), "")

    wait_until(lambda: expected in notice(), timeout=timeout, interval=0.05)
    return notice()


def reload_until(browser: WebDriver, predicate: Callable[[], Any], timeout: float = 15.0) -> Any:
    """Reload the page until ``predicate`` holds (the dashboard does not refresh itself)."""

    def check() -> Any:
        browser.refresh()
        return predicate()

    return wait_until(check, timeout=timeout, interval=0.1)


def test_the_dashboard_shows_the_state_and_retries_and_discards_failed_events(
    make_app, other_service, browser, serve, recorder: Recorder, tmp_path
):
    app, _db, pgevents, Thing = thing_app(make_app, SECRET_KEY="browser-test", PGEVENTS_MAX_ATTEMPTS=1)
    broken = threading.Event()
    released = threading.Event()

    @pgevents.listens_for(Thing, "after_insert")
    def notify_owner(event: Any) -> None:
        if event.new["name"].startswith("slow"):
            released.wait(30)  # keeps the listener busy and its batch pending
        if broken.is_set():
            raise RuntimeError(f"mail server down for {event.new['name']!r}")
        recorder(event)

    app.register_blueprint(pgevents.dashboard_blueprint(authorize=operator_cookie_only), url_prefix="/events")
    with app.app_context():
        pgevents.install_triggers()

    # Two failed events, one of whose row holds a script; then three pending
    # ones that the listener holds in a slow handler.
    broken.set()
    other_service.execute("INSERT INTO thing (name) VALUES ('alice'), (%s)", (HOSTILE,))
    assert pgevents.process_pending(app=app) == 2
    broken.clear()
    (alice_id,), (hostile_id,) = other_service.execute(
        "SELECT id FROM pgevents.event WHERE status = 'failed' ORDER BY id").fetchall()
    other_service.execute("INSERT INTO thing (name) VALUES ('slow-1'), ('slow-2'), ('slow-3')")
    base = serve(app)
    try:
        pgevents.start(app)

        # Without the operator's cookie: 403, in the browser and on the wire.
        browser.get(f"{base}/events/")
        assert "403 Forbidden" in browser.title
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"{base}/events/", timeout=10)
        assert info.value.code == 403
        info.value.close()

        browser.add_cookie({"name": "operator", "value": "yes", "path": "/"})
        browser.get(f"{base}/events/")
        assert browser.title == "flask-pgevents: pgevents"
        reload_until(browser, lambda: text(browser, "#listener-count b") == "1")
        assert text(browser, "#pending b") == "3"
        assert text(browser, "#oldest b").endswith(" s")
        assert text(browser, "#failed-count b") == "2"
        assert re.fullmatch(r"public\.thing insert 3 \d+\.\d s", text(browser, "#backlog-table tbody"))
        assert text(browser, "#trigger-table tbody") == "public.thing insert installed"
        listener_row = text(browser, "#listener-table tbody tr")
        assert "pgevents-listener" in listener_row and "handling events" in listener_row

        alice = browser.find_element(By.ID, f"event-{alice_id}")
        assert f"Event {alice_id}: insert on public.thing" in alice.text
        assert "RuntimeError: mail server down for 'alice'" in alice.text
        alice.find_element(By.CSS_SELECTOR, "details.row summary").click()
        assert '"name": "alice"' in alice.find_element(By.CSS_SELECTOR, "pre.new").text
        alice.find_element(By.CSS_SELECTOR, ".error details summary").click()
        assert "Traceback (most recent call last)" in alice.find_element(By.CSS_SELECTOR, "pre.traceback").text

        # The script in the row is shown as text, and nothing ran it.
        hostile = browser.find_element(By.ID, f"event-{hostile_id}")
        hostile.find_element(By.CSS_SELECTOR, "details.row summary").click()
        assert f'"name": "{HOSTILE}"' in hostile.find_element(By.CSS_SELECTOR, "pre.new").text
        assert browser.find_elements(By.CSS_SELECTOR, "main script") == []
        assert browser.title == "flask-pgevents: pgevents"

        screenshot = Path(os.environ.get("PGEVENTS_DASHBOARD_SCREENSHOT") or tmp_path / "dashboard.png")
        assert browser.save_screenshot(str(screenshot))

        # On a phone's width nothing sticks out sideways but the tables' own scroll.
        browser.set_window_size(*PHONE)
        try:
            assert browser.execute_script(
                "return document.documentElement.scrollWidth <= window.innerWidth")
            assert browser.find_element(By.ID, f"event-{alice_id}").find_element(
                By.CSS_SELECTOR, "button.retry").is_displayed()
            assert browser.save_screenshot(str(tmp_path / "dashboard-phone.png"))
        finally:
            browser.set_window_size(*DESKTOP)

        # The listener drains its batch.
        released.set()
        recorder.wait_for(3)
        reload_until(browser, lambda: text(browser, "#pending b") == "0")
        reload_until(browser, lambda: " idle " in text(browser, "#listener-table tbody tr"))

        # Retry: queued again, then handled by the listener.
        browser.find_element(By.ID, f"event-{alice_id}").find_element(By.CSS_SELECTOR, "button.retry").click()
        assert "1 event(s) queued again." in notice_after_action(browser, "queued again")
        events = recorder.wait_for(4)
        assert (events[-1].id, events[-1].new["name"]) == (alice_id, "alice")
        reload_until(browser, lambda: not browser.find_elements(By.ID, f"event-{alice_id}"))
        assert text(browser, "#failed-count b") == "1"

        # Discard, after the confirmation it asks for: deleted for good.
        hostile = browser.find_element(By.ID, f"event-{hostile_id}")
        hostile.find_element(By.CSS_SELECTOR, "details.confirm summary").click()
        hostile.find_element(By.CSS_SELECTOR, "button.discard").click()
        assert "1 event(s) discarded." in notice_after_action(browser, "discarded")
        assert text(browser, "#failed-count b") == "0"
        assert "No failed events." in text(browser, "#failed + *")
        assert other_service.execute("SELECT count(*) FROM pgevents.event").fetchone()[0] == 0
        assert len(recorder.events) == 4
    finally:
        released.set()
        pgevents.stop(timeout=10, app=app)


def test_a_forged_form_from_another_page_is_refused(make_app, browser, serve):
    """A page on another origin posting to the dashboard with the operator's cookie gets 400."""
    app, _db, pgevents, _Thing = thing_app(make_app, SECRET_KEY="browser-test")
    app.register_blueprint(pgevents.dashboard_blueprint(authorize=operator_cookie_only), url_prefix="/events")
    with app.app_context():
        pgevents.install_triggers()
    base = serve(app)
    # The attacker's page, served on another origin (another port of 127.0.0.1).
    attacker = Flask("attacker")

    @attacker.get("/")
    def forged_form() -> str:
        return (
            f'<form method="post" action="{base}/events/retry"><input name="all" value="1">'
            '<input name="csrf_token" value="guessed"><button id="go">Win a prize</button></form>'
        )

    attacker_base = serve(attacker)
    browser.get(f"{base}/events/")
    browser.add_cookie({"name": "operator", "value": "yes", "path": "/"})
    browser.get(f"{base}/events/")
    assert browser.title == "flask-pgevents: pgevents"
    browser.get(f"{attacker_base}/")
    browser.find_element(By.ID, "go").click()
    # The click returns before the answer to the form has loaded.
    wait_until(lambda: "400 Bad Request" in browser.title, timeout=15, interval=0.05)
    assert "CSRF token is missing or has expired" in browser.page_source


def test_chromium_is_really_driven(chromium):
    """Guard against a silently absent browser: this is Chromium, headless, answering."""
    try:
        version = chromium.capabilities["browserVersion"]
    except (KeyError, WebDriverException) as exc:  # pragma: no cover - the fixture would have failed
        pytest.fail(f"no browser: {exc}")
    assert int(version.split(".")[0]) >= 100
