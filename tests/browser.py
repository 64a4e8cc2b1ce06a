"""Headless Chromium for the report tests: load a page from disk, read its DOM after load, take a screenshot.

Debian's chromium (scripts/setup_browser.sh installs it; `CHROMIUM` names another binary). A missing
browser is a test failure, never a skip. The flags keep Chromium off the network (this machine's
closed network refuses its background connections) and let it run as root without a GPU.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars")
# Run on the page's load event (after every image has loaded or failed): mark each image.
_MARK_IMAGES = ("<script>addEventListener('load', () => { for (const image of document.images) "
                "image.dataset.loaded = String(image.complete && image.naturalWidth > 0); "
                "document.body.dataset.checked = 'yes'; });</script>")


def chromium(profile: Path) -> list[str]:
    binary = next((found for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser") if name
                   for found in [shutil.which(name)] if found), None)
    if binary is None:
        pytest.fail("Chromium not found: `bash scripts/install.sh --test` installs Debian's chromium "
                    "(or set CHROMIUM to a Chromium binary)", pytrace=False)
    return [binary, *FLAGS, f"--user-data-dir={profile}"]


class Elements(HTMLParser):
    """Every start tag as (tag, attributes), and the text of each element carrying data-metric."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.metrics: dict[str, str] = {}
        self._metric: str | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attributes = {name: value or "" for name, value in attrs}
        self.tags.append((tag, attributes))
        if "data-metric" in attributes:
            self._metric = attributes["data-metric"]
            self.metrics[self._metric] = ""

    def handle_data(self, data: str) -> None:
        if self._metric is not None:
            self.metrics[self._metric] += data.strip()

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._metric = None

    def all(self, tag: str) -> list[dict[str, str]]:
        return [attributes for name, attributes in self.tags if name == tag]


def parse(text: str) -> Elements:
    elements = Elements()
    elements.feed(text)
    return elements


def loaded_dom(page: Path, profile: Path) -> Elements:
    """The DOM of `page` after Chromium loaded it, every <img> marked data-loaded="true" or "false".

    The marking script goes into a copy beside the page (same folder, so the same relative links).
    """
    probe = page.with_name(f".{page.stem}.browser-check.html")
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", _MARK_IMAGES + "</body>"), encoding="utf-8")
    try:
        done = subprocess.run([*chromium(profile), "--virtual-time-budget=20000", "--dump-dom", probe.as_uri()],
                              capture_output=True, text=True, timeout=180, check=False)
    finally:
        probe.unlink()
    assert done.returncode == 0, done.stderr[-2000:]
    return parse(done.stdout)


def screenshot(page: Path, output: Path, profile: Path, size: str = "1280,2400") -> Path:
    done = subprocess.run([*chromium(profile), f"--window-size={size}", f"--screenshot={output}", page.as_uri()],
                          capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0 and output.is_file(), done.stderr[-2000:]
    return output
