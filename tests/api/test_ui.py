"""The page at /ui in a real headless browser (Debian's chromium through chromedriver): it lists
the adapters the key may use, classifies a text and highlights its tokens with the attributions
/classify returns, and streams a reply equal to /generate's; with ADAPTERSERVE_UI=false it is gone."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from app.main import create_app
from app.models.base_lm import BaseLM
from tests.conftest import app_settings, serve_live, upload_archive
from tests.helpers.peft_ref import RefAdapter, zip_folder

pytestmark = pytest.mark.browser
API_KEY = "ui-test-key"
TEXT = "The match ended in a draw after extra time."


@pytest.fixture(scope="module")
def live(
    own_tiny: BaseLM, ref_adapters: dict[str, RefAdapter], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, TestClient]]:
    settings = app_settings(tmp_path_factory.mktemp("ui-store"), api_keys=API_KEY)
    with TestClient(create_app(settings, base=own_tiny)) as client:
        for name in ("cls-4", "gen-qv-r8"):
            assert upload_archive(client, name, zip_folder(ref_adapters[name].folder)).status_code == 201
        with serve_live(client.app) as url:
            yield url, client


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
    try:
        yield driver
    finally:
        driver.quit()


def test_the_page_lists_classifies_with_highlights_and_streams_a_reply(
    live: tuple[str, TestClient], browser: webdriver.Chrome, tmp_path: Path
) -> None:
    url, client = live
    auth = {"Authorization": f"Bearer {API_KEY}"}
    wait = WebDriverWait(browser, 30)
    browser.get(f"{url}/ui")
    browser.find_element(By.ID, "key").send_keys(API_KEY)
    browser.find_element(By.ID, "load").click()
    wait.until(lambda d: len(Select(d.find_element(By.ID, "adapter")).options) == 3)
    names = [o.get_attribute("value") for o in Select(browser.find_element(By.ID, "adapter")).options]
    assert names == ["", "cls-4", "gen-qv-r8"]
    # classify: the labels and the tokens coloured by the scores the API returns
    Select(browser.find_element(By.ID, "adapter")).select_by_value("cls-4")
    text = browser.find_element(By.ID, "text")
    text.clear()
    text.send_keys(TEXT)
    browser.find_element(By.ID, "run").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#tokens span[data-score]"))
    body = {"adapter": "cls-4", "inputs": TEXT, "explain": {"method": "integrated_gradients"}}
    expected = client.post("/classify", json=body, headers=auth).json()["results"][0]
    spans = browser.find_elements(By.CSS_SELECTOR, "#tokens span[data-score]")
    assert [round(float(s.get_attribute("data-score") or "nan"), 5) for s in spans] == [
        round(a["score"], 5) for a in expected["attributions"]
    ]
    assert browser.find_element(By.ID, "tokens").text.replace("\n", "").endswith(TEXT[-10:])
    rows = browser.find_elements(By.CSS_SELECTOR, "#labels tr")
    assert len(rows) == 4 and rows[0].text.startswith(expected["label"] + " ✓")
    coloured = [
        s.value_of_css_property("background-color") for s in spans if s.get_attribute("class") != "special"
    ]
    assert any(c != "rgba(0, 0, 0, 0)" for c in coloured)
    browser.save_screenshot(str(tmp_path / "classify.png"))
    # generate: the streamed reply is the greedy text /generate returns
    Select(browser.find_element(By.ID, "adapter")).select_by_value("gen-qv-r8")
    browser.find_element(By.ID, "run").click()
    wait.until(lambda d: d.find_element(By.ID, "reply").get_attribute("data-done") == "true")
    messages = [{"role": "user", "content": TEXT}]
    reply = client.post("/generate", json={"adapter": "gen-qv-r8", "messages": messages}, headers=auth).json()
    assert browser.find_element(By.ID, "reply").get_attribute("textContent") == reply["text"]
    assert browser.find_element(By.ID, "error").text == ""
    # a wrong key: the page says what the API says
    key = browser.find_element(By.ID, "key")
    key.clear()
    key.send_keys("wrong")
    browser.find_element(By.ID, "load").click()
    wait.until(lambda d: d.find_element(By.ID, "error").text != "")


def test_the_page_can_be_turned_off(own_tiny: BaseLM, tmp_path: Path) -> None:
    with TestClient(create_app(app_settings(tmp_path / "store", ui=False), base=own_tiny)) as client:
        assert client.get("/ui").status_code == 404
        assert client.get("/ui/ui.js").status_code == 404
