"""The proxy's status page in a real headless Chromium, as a person uses it: it loads with no console
errors, shows every configured model, updates live when an instance starts, and asks for a key when the
proxy has api_keys. Needs Debian's chromium and chromium-driver (.ci/run installs them)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.test_proxy import make_proxy  # noqa: F401  (the fixture: a real proxy over fake servers)

CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium") or "", shutil.which("chromium-browser") or "")
                 if p and Path(p).exists()), None)
DRIVER = next((p for p in ("/usr/bin/chromedriver", shutil.which("chromedriver") or "") if p and Path(p).exists()), None)


@pytest.fixture
def browser():
    yield from _browser()


@pytest.fixture
def rebinding_browser():
    """A browser in which evil.example resolves to 127.0.0.1: what DNS rebinding makes of a page's name."""
    yield from _browser("--host-resolver-rules=MAP evil.example 127.0.0.1")


def _browser(*extra: str):
    if CHROMIUM is None or DRIVER is None:
        pytest.fail("these tests need chromium and chromedriver (apt install chromium chromium-driver; "
                    ".ci/run installs them)", pytrace=False)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                "--disable-gpu", "--no-first-run", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", *extra):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _wait(driver, check, timeout_s: float = 15.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = check(driver)
            if value:
                return value
        except Exception:
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out; page text:\n{driver.find_element('tag name', 'body').text}")


def _errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]


def _state(driver, model: str) -> str:
    return driver.find_element("css selector", f'#models tr[data-model="{model}"] td:nth-child(2)').text


def test_the_page_shows_every_model_and_updates_live(make_proxy, browser) -> None:  # noqa: F811
    proxy = make_proxy({"alpha": [], "beta": []})
    browser.get(proxy.url + "/")
    _wait(browser, lambda d: _state(d, "beta") == "stopped")
    _wait(browser, lambda d: _state(d, "alpha") == "stopped")  # rows are redrawn each second: read in a retry
    assert "live" in browser.find_element("id", "conn").text
    assert not browser.find_element("id", "key-form").is_displayed()  # no keys configured: no key asked
    assert proxy.post("alpha", max_tokens=2).status_code == 200  # a client starts alpha...
    _wait(browser, lambda d: _state(d, "alpha") == "ready")  # ...and the page shows it without a reload
    _wait(browser, lambda d: "ready" in d.find_element("id", "events").text)
    _wait(browser, lambda d: "alpha" in d.find_element("id", "requests").text)
    # the unload button stops it through the management route
    # (found and clicked in one step: a redraw between the two would leave a stale element)
    browser.execute_script("document.querySelector('#models tr[data-model=\"alpha\"] button').click()")
    _wait(browser, lambda d: _state(d, "alpha") == "stopped")
    assert not proxy.tagged()
    assert _errors(browser) == []
    Path(proxy.tmp / "status-page.png").write_bytes(browser.get_screenshot_as_png())


def test_the_page_asks_for_the_key_when_the_proxy_has_keys(make_proxy, browser) -> None:  # noqa: F811
    proxy = make_proxy({"alpha": []}, 'api_keys = ["sesame"]')
    assert httpx.get(proxy.url + "/status").status_code == 401  # the data needs the key; the page does not
    browser.get(proxy.url + "/ui")
    field = _wait(browser, lambda d: d.find_element("id", "api-key") if d.find_element("id", "api-key").is_displayed() else None)
    field.send_keys("wrong")
    browser.find_element("css selector", "#key-form button").click()
    _wait(browser, lambda d: "refused" in d.find_element("id", "key-error").text)
    field.clear()
    field.send_keys("sesame")
    browser.find_element("css selector", "#key-form button").click()
    _wait(browser, lambda d: _state(d, "alpha") == "stopped")
    assert [e for e in _errors(browser) if "401" not in e] == []  # the refused key's 401 is expected


def test_a_page_from_another_site_cannot_drive_the_proxy(make_proxy, rebinding_browser, tmp_path) -> None:  # noqa: F811
    """A real cross-site page: its no-cors POST (CSRF) reaches the proxy and is refused; its own name rebound
    to the proxy's address (DNS rebinding) is refused before any data; the model never starts."""
    import functools
    import http.server
    import threading

    from llamactl.servers.buffers import free_port

    proxy = make_proxy({"alpha": []})
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text(f"""<!doctype html><title>evil</title><script>
      fetch("http://127.0.0.1:{proxy.port}/models/alpha/load",
            {{method: "POST", mode: "no-cors", headers: {{"Content-Type": "text/plain"}}, body: "{{}}"}})
        .then(() => document.title = "sent", e => document.title = "error " + e);
      fetch("http://127.0.0.1:{proxy.port}/status").then(r => r.text())
        .then(t => document.title += " read", e => document.title += " unread");
    </script>""")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        rebinding_browser.get(f"http://evil.example:{server.server_address[1]}/")
        _wait(rebinding_browser, lambda d: d.title.endswith("read"))
        assert rebinding_browser.title == "sent unread"  # no CORS grant: the page cannot read /status
        # the request did reach the proxy (not stopped by the browser alone), and was refused there
        _wait(rebinding_browser, lambda d: "POST /models/alpha/load model=- status=403" in proxy.logs())
        # DNS rebinding: the page's own name now points at the proxy
        rebinding_browser.get(f"http://evil.example:{proxy.port}/status")
        assert "is not this proxy's address" in rebinding_browser.find_element("tag name", "body").text
        assert proxy.instances()[0]["state"] == "stopped" and not proxy.tagged()
    finally:
        server.shutdown()
