"""Debian's headless Chromium, driven by Playwright (never a downloaded browser)."""

from __future__ import annotations

import os
import shutil

BROWSER_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


def chromium_path() -> str | None:
    candidates = [os.environ.get("RAIOX_TEST_CHROMIUM"), "chromium", "chromium-browser"]
    for name in candidates:
        found = name and (shutil.which(name) or (os.path.isfile(name) and name))
        if found:
            return found
    return None
