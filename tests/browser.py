"""Headless Chromium for the page tests: the system browser driven by Playwright.

Playwright never downloads a browser here; it drives Debian's chromium,
which .ci/run installs with apt-get.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from playwright.async_api import Browser, Page, Request, async_playwright

from tests.redis_proc import require_binary

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"

# Records every aria-valuenow the progress bar takes, so a test can check the
# bar climbed rather than only where it ended.
RECORD_PROGRESS = """
window.__percents = [];
document.addEventListener("DOMContentLoaded", () => {
  const bar = document.getElementById("bar");
  if (!bar) return;
  new MutationObserver(() => {
    window.__percents.push(Number(bar.getAttribute("aria-valuenow")));
  }).observe(bar, { attributes: true, attributeFilter: ["aria-valuenow"] });
});
"""


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    path = require_binary("chromium")
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


@dataclass
class RequestLog:
    """Every request a page makes, with the time it was made."""

    entries: list[tuple[float, Request]] = field(default_factory=list)

    def attach(self, page: Page) -> None:
        page.on("request", lambda req: self.entries.append((time.monotonic(), req)))

    def to(self, fragment: str, since: float = 0.0) -> list[Request]:
        return [r for t, r in self.entries if fragment in r.url and t >= since]

    def since(self, t0: float) -> list[Request]:
        return [r for t, r in self.entries if t >= t0]


class Publisher:
    """Publishes through the gateway's real HTTP endpoint and remembers what it sent."""

    def __init__(self, session: aiohttp.ClientSession, base: str, token: str | None = None):
        self.session = session
        self.base = base
        self.token = token
        self.sent: list[dict[str, Any]] = []

    async def __call__(self, event: dict[str, Any]) -> None:
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        url = f"{self.base}/api/enrichment/events/{event['bom_id']}"
        async with self.session.post(url, data=json.dumps(event), headers=headers) as resp:
            assert resp.status == 202, await resp.text()
        self.sent.append(event)

    def line_items(self) -> list[str]:
        return [e["component"]["line_item_id"] for e in self.sent if "component" in e]


async def feed_line_items(page: Page) -> list[str]:
    items: list[str] = await page.eval_on_selector_all(
        "#feed li", "els => els.map(el => el.dataset.lineItem)"
    )
    return items


async def wait_until(page: Page, expression: str, timeout: float = 20.0) -> None:
    """Wait for a page expression to be true. Playwright's wait_for_function
    compiles a string with eval, which the pages' CSP (rightly) forbids."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await page.evaluate(expression):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {expression}")
        await asyncio.sleep(0.05)


async def screenshot(page: Page, name: str, full_page: bool = True) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    await page.screenshot(path=str(path), full_page=full_page)
    return path


# For every element that shows text: its colour against the first opaque
# background behind it, as the WCAG contrast ratio.
CONTRAST_REPORT = """
() => {
  const parse = (c) => {
    const m = c.match(/rgba?\\(([^)]+)\\)/);
    if (!m) return null;
    const p = m[1].split(/[ ,\\/]+/).filter(Boolean).map(Number);
    return { r: p[0], g: p[1], b: p[2], a: p.length > 3 ? p[3] : 1 };
  };
  const lum = (c) => {
    const f = (v) => {
      v /= 255;
      return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4);
    };
    return 0.2126 * f(c.r) + 0.7152 * f(c.g) + 0.0722 * f(c.b);
  };
  const background = (el) => {
    for (let e = el; e; e = e.parentElement) {
      const c = parse(getComputedStyle(e).backgroundColor);
      if (c && c.a > 0.5) return c;
    }
    return { r: 255, g: 255, b: 255, a: 1 };
  };
  const out = [];
  for (const el of document.querySelectorAll("body *")) {
    const text = Array.from(el.childNodes)
      .filter((n) => n.nodeType === 3)
      .map((n) => n.textContent)
      .join("")
      .trim();
    if (!text || el.closest("[hidden]") || el.closest(".visually-hidden")) continue;
    const style = getComputedStyle(el);
    if (style.display === "none" || style.visibility === "hidden") continue;
    const fg = parse(style.color);
    const bg = background(el);
    const [hi, lo] = [lum(fg), lum(bg)].sort((a, b) => b - a);
    out.push({ text: text.slice(0, 40), ratio: (hi + 0.05) / (lo + 0.05) });
  }
  return out;
}
"""


async def contrast_ratios(page: Page) -> list[dict[str, Any]]:
    report: list[dict[str, Any]] = await page.evaluate(CONTRAST_REPORT)
    return report
