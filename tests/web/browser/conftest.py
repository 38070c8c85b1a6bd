"""A headless Chromium (Debian's package, driven through its chromedriver) for the page
tests, and an async face for it: the relay runs in the test's event loop, so every
blocking Selenium call runs in a thread while the loop keeps serving the page."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from selenium import webdriver
from selenium.common.exceptions import (
    NoAlertPresentException,
    NoSuchElementException,
    StaleElementReferenceException,
    WebDriverException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from relay.app import Relay
from tests.web.conftest import TOKENS, base_url

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WIDE, PHONE = 1280, 375
# Where copies of the README's screenshots go when asked (RELAY_SCREENSHOTS=docs/screenshots).
SCREENSHOTS_ENV = "RELAY_SCREENSHOTS"
T = TypeVar("T")


@pytest.fixture(scope="module")
def chromium() -> Iterator[webdriver.Chrome]:
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        pytest.skip(
            "Debian's chromium and chromium-driver are not installed (/usr/bin/chromium,"
            " /usr/bin/chromedriver): `make test` installs them"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless", "--no-sandbox", "--disable-background-networking"):
        options.add_argument(arg)
    options.add_argument(f"--window-size={WIDE},900")
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


class Browser:
    """The page as a person uses it: go, fill, click, read; and screenshots."""

    def __init__(self, driver: webdriver.Chrome, relay: Relay, shots: Path) -> None:
        self.driver = driver
        self.url = base_url(relay)
        self.shots = shots

    async def run(self, call: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(call, *args)

    async def get(self, path: str) -> None:
        await self.run(self.driver.get, self.url + path)

    async def find(self, css: str) -> WebElement:
        return await self.run(self.driver.find_element, By.CSS_SELECTOR, css)

    async def text(self, css: str = "main") -> str:
        element = await self.find(css)
        return await self.run(lambda: element.text)

    async def fill(self, css: str, value: str) -> None:
        element = await self.find(css)

        def type_in() -> None:
            element.clear()
            element.send_keys(value)

        await self.run(type_in)

    async def click(self, css: str) -> None:
        element = await self.find(css)
        await self.run(element.click)

    async def click_link(self, text: str) -> None:
        element = await self.run(self.driver.find_element, By.PARTIAL_LINK_TEXT, text)
        await self.run(element.click)

    async def path(self) -> str:
        url = await self.run(lambda: self.driver.current_url)
        return url.removeprefix(self.url)

    async def wait_for_text(
        self, text: str, css: str = "main", *, timeout: float = 20.0, reload: bool = False
    ) -> None:
        """Wait until `text` shows inside `css`; with `reload`, reloading between looks
        (for pages that do not refresh themselves)."""

        def shown(driver: webdriver.Chrome) -> bool:
            if reload:
                driver.refresh()
            try:
                return text in driver.find_element(By.CSS_SELECTOR, css).text
            except WebDriverException as exc:
                # Chromium's word for an element of the document being replaced (after a
                # click that submits a form), which Selenium does not call stale.
                if "does not belong to the document" in str(exc):
                    return False
                raise

        wait = WebDriverWait(
            self.driver,
            timeout,
            poll_frequency=0.5,
            # The page may be between two documents (after a click that submits a form).
            ignored_exceptions=(NoSuchElementException, StaleElementReferenceException),
        )
        await self.run(wait.until, shown)

    async def alert_open(self) -> bool:
        def check() -> bool:
            try:
                self.driver.switch_to.alert  # noqa: B018 - raises when there is none
            except NoAlertPresentException:
                return False
            return True

        return await self.run(check)

    async def log_in(self, name: str = "ops") -> None:
        await self.get("/login")
        await self.fill("#token", TOKENS[name][1])
        await self.click("form button[type=submit]")
        await self.wait_for_text("Overview", "h1")

    async def overflows(self) -> bool:
        """True when the page is wider than the window (a sideways scroll on a phone)."""
        return bool(
            await self.run(
                self.driver.execute_script,
                "return document.documentElement.scrollWidth > window.innerWidth",
            )
        )

    async def set_width(self, width: int, height: int = 900) -> None:
        await self.run(
            self.driver.execute_cdp_cmd,
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600},
        )

    async def shot(self, name: str, *, width: int = WIDE) -> Path:
        """A full-page PNG of what is shown, at `width` CSS pixels."""
        import base64

        await self.set_width(width)
        height = await self.run(
            self.driver.execute_script, "return document.documentElement.scrollHeight"
        )
        await self.set_width(width, max(int(height), 600))
        data = await self.run(
            self.driver.execute_cdp_cmd,
            "Page.captureScreenshot",
            {"format": "png", "captureBeyondViewport": True},
        )
        await self.set_width(WIDE)
        path = self.shots / f"{name}.png"
        path.write_bytes(base64.b64decode(data["data"]))
        return path


def publish(path: Path) -> None:
    """Copy a screenshot to the README's directory when RELAY_SCREENSHOTS names one."""
    target = os.environ.get(SCREENSHOTS_ENV)
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(target) / path.name)


@pytest.fixture
def browser_for(chromium: webdriver.Chrome, tmp_path: Path) -> Callable[[Relay], Browser]:
    chromium.execute_cdp_cmd("Network.clearBrowserCookies", {})
    shots = tmp_path / "screenshots"
    shots.mkdir()
    return lambda relay: Browser(chromium, relay, shots)
