"""The page at / in a real browser: Debian's chromium, headless, driven by Selenium through its
chromedriver, against the app deployed on loopback with a token. The page must show what the API
answers for the same bytes, draw each word's attention map as the API gives it, put errors in words,
fit a phone's width, and load nothing from another host; nor may /docs and /redoc."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urljoin

import numpy as np
import pytest
import requests
from helpers import deploy_pinned, image, make_checkpoint
from ray import serve
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from raycap.serve_http import TOKEN_ENV

TOKEN = "page-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_LEN = 12  # words per caption
MAX_BYTES = 40_000  # the app's max_image_bytes
WAIT_S = 30
PHONE = {"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True}
COLD_RED, HOT_RED = 40, 255  # red of the page's heatmap where a map is lowest and highest (raycap/static/app.js)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def service(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An attention checkpoint (4x4 grid) served with a token; yields the base URL."""
    checkpoint = make_checkpoint(tmp_path_factory.mktemp("page"), "attention", grid=4, seed=0)
    url = deploy_pinned(str(checkpoint), MAX_LEN, args={"max_image_bytes": MAX_BYTES}, env={TOKEN_ENV: TOKEN})
    try:
        yield url
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    """Headless chromium through chromedriver, both from Debian (`make test` installs them)."""
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        pytest.fail(
            "the browser test needs Debian's chromium and chromedriver on PATH: "
            "`make test` installs them, or run `apt-get install chromium chromium-driver`"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(chromedriver))
    try:
        yield driver
    finally:
        driver.quit()


def _wait(browser: WebDriver, what: str, condition: Callable[[], object]) -> object:
    return WebDriverWait(browser, WAIT_S).until(lambda _: condition(), f"the page never showed {what}")


def _visible_error(browser: WebDriver) -> str:
    error = browser.find_element(By.ID, "error")
    return _wait(browser, "an error", lambda: error.is_displayed() and error.text)


def _set(field: WebElement, value: str) -> None:
    """Type into a field and leave it, as a person does: its `change` event fires."""
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.DELETE, value, Keys.TAB)


def _upload(browser: WebDriver, path: Path) -> None:
    browser.find_element(By.ID, "file").send_keys(str(path))


def _outside_requests(browser: WebDriver, base: str) -> list[str]:
    """URLs the current document loaded (its resources and fetches) from anywhere but `base`."""
    urls = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    return [url for url in urls if not url.startswith(base + "/")]


def _script_errors(browser: WebDriver) -> list[str]:
    """Console errors other than HTTP failures (the 4xx the test provokes): script errors, CSP refusals."""
    return [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"
            and "Failed to load resource" not in e["message"]]  # fmt: skip


def _heatmap_cells(browser: WebDriver, rows: int, cols: int) -> tuple[np.ndarray, int]:
    """The heatmap canvas's RGBA at each grid cell's centre (rows, cols, 4), and its count of
    fully transparent pixels."""
    cells, clear = browser.execute_script(
        """
        const [rows, cols] = arguments, canvas = document.getElementById("heatmap");
        const context = canvas.getContext("2d"), all = context.getImageData(0, 0, canvas.width, canvas.height).data;
        let clear = 0;
        for (let i = 3; i < all.length; i += 4) clear += all[i] === 0;
        const cells = [];
        for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) {
          const x = Math.floor((c + 0.5) * canvas.width / cols), y = Math.floor((r + 0.5) * canvas.height / rows);
          cells.push(Array.from(context.getImageData(x, y, 1, 1).data));
        }
        return [cells, clear];
        """,
        rows,
        cols,
    )
    return np.array(cells, dtype=float).reshape(rows, cols, 4), clear


def test_page_captions_as_the_api_does_and_draws_each_words_attention(
    service: str, browser: WebDriver, tmp_path: Path
) -> None:
    photo = image(7, size=(200, 150))
    path = tmp_path / "photo.jpg"
    path.write_bytes(photo)
    browser.get(f"{service}/")
    assert "requires an access token" in _visible_error(browser)  # the model list needs the token
    _set(browser.find_element(By.ID, "token"), TOKEN)
    model = requests.get(f"{service}/model", headers=AUTH, timeout=30).json()["model"]
    options = lambda: [o.text for o in browser.find_elements(By.CSS_SELECTOR, "#model option")]  # noqa: E731
    _wait(browser, "the model list", lambda: options() == [model])
    _set(browser.find_element(By.ID, "beam-size"), "3")
    _upload(browser, path)
    _wait(browser, "captions", lambda: browser.find_element(By.ID, "result").is_displayed())

    params = {"beam_size": 3, "num_captions": 3, "attention": "true"}
    api = requests.post(f"{service}/caption", data=photo, params=params, timeout=60,
                        headers={**AUTH, "Content-Type": "image/jpeg"}).json()  # fmt: skip
    texts = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#captions .text")]
    scores = [float(e.get_attribute("data-score")) for e in browser.find_elements(By.CSS_SELECTOR, "#captions .score")]
    assert texts[0] == api["caption"] and texts == [b["caption"] for b in api["beams"]]
    assert scores == [b["score"] for b in api["beams"]]
    assert f"model {model}" in browser.find_element(By.ID, "status").text

    words = api["caption"].split()
    maps = np.array(api["attention"])  # (words, 4, 4)
    assert len(words) >= 2 and maps.shape == (len(words), 4, 4)
    spread = maps.max(axis=(1, 2)) - maps.min(axis=(1, 2))
    word = int(spread.argmax())  # the word whose map says most about where it looked
    assert spread[word] > 1e-3, f"every word's map is flat: {maps}"
    _, clear = _heatmap_cells(browser, 4, 4)
    assert clear > 0, "a heatmap is drawn before any word is chosen"
    for _ in range(word + 1):
        browser.find_element(By.ID, "next").click()
    pressed = browser.find_elements(By.CSS_SELECTOR, "#words button[aria-pressed='true']")
    assert [b.text for b in pressed] == [words[word]]
    cells, clear = _heatmap_cells(browser, 4, 4)
    assert clear == 0, "the heatmap leaves part of the image uncovered"
    span = maps[word] - maps[word].min()
    expected_red = COLD_RED + (HOT_RED - COLD_RED) * span / span.max()  # the page's colour scale, per cell
    # Drawn is the API's map, cell by cell (Skia's bilinear weights are in 1/16ths: 215/16 off at most).
    np.testing.assert_allclose(cells[..., 0], expected_red, atol=16)

    other = (word + 1) % len(words)  # hovering a word shows its map
    ActionChains(browser).move_to_element(browser.find_elements(By.CSS_SELECTOR, "#words button")[other]).perform()
    _wait(browser, "the hovered word's map", lambda: not np.array_equal(_heatmap_cells(browser, 4, 4)[0], cells)
          or np.allclose(maps[other], maps[word]))  # fmt: skip
    assert _outside_requests(browser, service) == [] and _script_errors(browser) == []

    shot = tmp_path / "page-caption.png"
    browser.save_screenshot(str(shot))
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", PHONE)
    try:
        layout = browser.execute_script(
            """
            const box = (id) => document.getElementById(id).getBoundingClientRect();
            return {scroll: document.documentElement.scrollWidth, width: innerWidth,
                    image: box("photo").right, captionsTop: box("captions").top, imageBottom: box("photo").bottom};
            """
        )
        assert layout["width"] == PHONE["width"] and layout["scroll"] <= layout["width"], layout  # no sideways scroll
        assert layout["image"] <= layout["width"], layout
        assert layout["captionsTop"] >= layout["imageBottom"], layout  # one column: captions under the image
        phone = tmp_path / "page-phone.png"
        browser.save_screenshot(str(phone))
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    print(f"screenshots: {shot} (caption and heatmap), {phone} (phone width)")


def test_page_shows_api_errors_in_words(service: str, browser: WebDriver, tmp_path: Path) -> None:
    notes, big, photo = tmp_path / "notes.txt", tmp_path / "big.jpg", tmp_path / "photo.jpg"
    notes.write_text("these are notes, not a photo\n")
    big.write_bytes(image(8)[:2] + b"\0" * MAX_BYTES)
    photo.write_bytes(image(9))
    browser.get(f"{service}/")
    _set(browser.find_element(By.ID, "token"), TOKEN)
    _wait(browser, "the model list", lambda: browser.find_elements(By.CSS_SELECTOR, "#model option"))

    _upload(browser, notes)
    message = _visible_error(browser)
    assert message.startswith("notes.txt could not be captioned: not an image"), message
    assert not browser.find_element(By.ID, "result").is_displayed()
    shot = tmp_path / "page-error.png"
    browser.save_screenshot(str(shot))
    print(f"screenshot: {shot} (error)")

    _upload(browser, big)
    _wait(browser, "the size error", lambda: _visible_error(browser).startswith("big.jpg is too large"))
    assert f"limit of {MAX_BYTES} bytes" in _visible_error(browser)
    _set(browser.find_element(By.ID, "token"), "wrong")
    _wait(browser, "the 401", lambda: "refused this token" in _visible_error(browser))
    _set(browser.find_element(By.ID, "token"), TOKEN)
    _set(browser.find_element(By.ID, "beam-size"), "11")
    _upload(browser, photo)
    _wait(browser, "the 422", lambda: "beam_size must be between 1 and 10, got 11" in _visible_error(browser))
    assert "{" not in _visible_error(browser) and "detail" not in _visible_error(browser)  # words, not JSON
    _set(browser.find_element(By.ID, "beam-size"), "0")  # refused by FastAPI's validation: the same shape
    below_one = "beam_size: input should be greater than or equal to 1"
    _wait(browser, "the other 422", lambda: below_one in _visible_error(browser))
    assert _visible_error(browser).startswith("The options were refused: "), _visible_error(browser)
    assert _script_errors(browser) == []


def test_page_files_are_open_and_everything_else_needs_the_token(service: str) -> None:
    page = requests.get(f"{service}/", timeout=30)
    assert page.status_code == 200 and "default-src 'self'" in page.headers["Content-Security-Policy"]
    assert requests.get(f"{service}/static/app.js", timeout=30).status_code == 200
    for path in ("/model", "/docs", "/redoc", "/openapi.json"):  # tricks: tests/reliability/test_fault_serving.py
        assert requests.get(f"{service}{path}", timeout=30).status_code == 401, path


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_api_docs_load_their_assets_from_this_server(service: str, path: str) -> None:
    html = requests.get(f"{service}{path}", headers=AUTH, timeout=30)
    assert html.status_code == 200
    assert not re.search(r"https?:|//", html.text), html.text  # no absolute URL: nothing from a CDN
    links = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", html.text)
    urls = [urljoin(f"{service}{path}", link) for link in links]
    assert any(u.endswith(".js") for u in urls) and any(u.endswith("/openapi.json") for u in urls), html.text
    for url in urls:
        assert requests.get(url, headers=AUTH, timeout=30).status_code == 200, url


def test_swagger_ui_renders_offline(service: str, browser: WebDriver) -> None:
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": AUTH})  # /docs needs the token
    try:
        browser.get(f"{service}/docs")
        title = lambda: browser.find_elements(By.CSS_SELECTOR, ".swagger-ui .info .title")  # noqa: E731
        _wait(browser, "Swagger UI's title", lambda: title() and "raycap" in title()[0].text)
        paths = lambda: [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")]  # noqa: E731
        _wait(browser, "the /caption operation", lambda: "/caption" in paths())
        assert _outside_requests(browser, service) == []
    finally:
        browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {}})
