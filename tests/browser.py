"""Looking at a page as a user does: headless Chromium (Debian's ``chromium``) renders it, and its DOM or a
screenshot comes back."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--virtual-time-budget=5000"]


def find_browser() -> str | None:
    """A Chromium-family browser on this machine (``chromium``, ``chromium-browser``, ``google-chrome``)."""
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _browse(page: Path, *flags: str, timeout: int = 120, fragment: str = "") -> str:
    browser = find_browser()
    if browser is None:
        raise RuntimeError("no Chromium browser found; install one (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run([browser, *BROWSER_FLAGS, f"--user-data-dir={profile}", *flags,
                               Path(page).resolve().as_uri() + fragment], capture_output=True, text=True,
                              timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{browser} failed on {page}: {proc.stderr.strip()[-300:]}")
    return proc.stdout


def rendered_dom(page: str | Path, fragment: str = "") -> str:
    """The page's DOM after its script ran, as headless Chromium serializes it (``fragment``: e.g. ``#L2:7``)."""
    return _browse(Path(page), "--dump-dom", fragment=fragment)


def screenshot(page: str | Path, png: str | Path, size: tuple[int, int] = (1400, 1000), fragment: str = "") -> Path:
    """A PNG of the page as headless Chromium draws it (``fragment``: e.g. ``#L2:7`` opens that latent)."""
    png = Path(png).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    _browse(Path(page), f"--screenshot={png}", f"--window-size={size[0]},{size[1]}", fragment=fragment)
    return png
