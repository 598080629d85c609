"""Screenshots of the console's pages on the demo data, for docs/console.md.

    python -m testing.console_screenshots --out docs/img

Seeds the demo store in a temporary folder, serves the console on a loopback port and drives the
system's Chromium through Playwright (pip install playwright; apt-get install -y chromium; no
browser download). The faces are scikit-image's public-domain sample photos.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sqlite3
import sys
import tempfile
from pathlib import Path

from central.console import create_app
from central.register_view import RegisterView
from central.store import HitFilter, open_store
from central.webserver import BackgroundServer
from testing.console_demo import DEMO_PERSONS, DEMO_USERS, seed_demo

log = logging.getLogger(__name__)


class ScreenshotError(RuntimeError):
    """The browser needed for screenshots is missing."""


def take(out: Path, chromium: str | None = None) -> list[Path]:
    """Write login.png, hits.png, hit.png (a 1280x720 screen, as an operator sees it), report.png (that
    sighting's case report as printed on A4), hit-closed.png, login-ended.png, fleet.png and audit.png
    into `out`; returns the paths."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise ScreenshotError("screenshots need Playwright for Python: pip install playwright") from None
    exe = chromium or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(exe).exists():
        raise ScreenshotError(f"no Chromium at {exe}: apt-get install -y chromium (or give --chromium)")
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="checkpoint-shots-") as tmp:
        data = seed_demo(Path(tmp))
        store = open_store(data.db)
        server = BackgroundServer(create_app(store, register=RegisterView(data.register, data.photos))).start()
        # The lingering person's sighting (five hits), waiting for its second confirmation.
        lingering = next(s for s in store.sightings(where=HitFilter(review_state="pending")) if s["hits"] > 1)
        closed = next(s for s in store.sightings() if s["person_id"] == DEMO_PERSONS[3][0])
        user, _, password = next(u for u in DEMO_USERS if u[1] == "supervisor")
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(
                    executable_path=exe, args=["--no-sandbox"] if os.geteuid() == 0 else [], headless=True
                )
                page = browser.new_context(viewport={"width": 1280, "height": 720}).new_page()

                def shot(name: str, full_page: bool = True) -> None:
                    path = out / f"{name}.png"
                    page.screenshot(path=str(path), full_page=full_page)
                    written.append(path)

                page.goto(server.url + "/login")
                page.fill("input[name=username]", user)
                shot("login")
                page.fill("input[name=password]", password)
                page.click("button[type=submit]")
                page.wait_for_url("**/hits")
                page.wait_for_load_state("networkidle")
                shot("hits")
                page.goto(f"{server.url}/hit?id={lingering['best_hit_id']}")
                page.wait_for_load_state("networkidle")
                shot("hit", full_page=False)
                # Its case report as printed: A4 portrait's width, print media (the console's header left out).
                page.set_viewport_size({"width": 794, "height": 1123})
                page.emulate_media(media="print")
                page.goto(f"{server.url}/sighting/report?id={lingering['id']}")
                shot("report")
                page.emulate_media(media="screen")
                page.set_viewport_size({"width": 1280, "height": 720})
                page.goto(f"{server.url}/hit?id={closed['best_hit_id']}")
                page.wait_for_load_state("networkidle")
                shot("hit-closed", full_page=False)
                page.goto(server.url + "/fleet")
                shot("fleet")
                page.goto(server.url + "/audit")
                shot("audit")
                # A session that ran out (its 12 hours): the login page says what waits.
                conn = sqlite3.connect(data.db)
                with conn:
                    conn.execute("UPDATE sessions SET expires_at = 0")
                conn.close()
                page.goto(server.url + "/login")
                shot("login-ended")
                browser.close()
        finally:
            server.stop()
            store.close()
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("docs/img"), help="folder for the PNG files")
    ap.add_argument("--chromium", default=None, help="Chromium executable [chromium on PATH, /usr/bin/chromium]")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        for path in take(args.out, args.chromium):
            log.info("wrote %s (%d bytes)", path, path.stat().st_size)
    except ScreenshotError as e:
        log.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
