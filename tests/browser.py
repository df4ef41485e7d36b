"""A page opened as a person would: Debian's Chromium, headless, driven by Playwright (its own browser
downloads are never used). Also a command, for the README's screenshot:

    python tests/browser.py reports/rcdm-demo/main/report.html docs/img/report.png
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
# no background traffic: this machine has no internet, and tests send traffic only to 127.0.0.1
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def ensure_chromium() -> str:
    """Debian's chromium, installed with apt-get when missing (root on Debian, as CI's machine)."""
    if Path(CHROMIUM).exists():
        return CHROMIUM
    if shutil.which("apt-get") is None:
        raise RuntimeError(f"{CHROMIUM} is missing and apt-get is not here: install Chromium at {CHROMIUM}")
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
    env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"apt-get install chromium failed:\n{r.stderr[-2000:]}")
    return CHROMIUM


def open_page(html: Path, screenshot: Path, width: int = 1300) -> dict:
    """Load ``html`` from disk, screenshot the whole page -> {"images": [{alt, src_kind, complete, width}],
    "errors": page errors and console errors, "failed": requests that failed, "tables": rows per table,
    "text": the page's text}."""
    from playwright.sync_api import sync_playwright

    errors, failed = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=ensure_chromium(), args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("requestfailed", lambda r: failed.append(r.url[:200]))
            page.goto(html.resolve().as_uri(), wait_until="load")
            images = page.evaluate("""Array.from(document.images).map(i => ({alt: i.alt,
                src_kind: i.src.slice(0, 22), complete: i.complete, width: i.naturalWidth}))""")
            tables = page.evaluate("""Object.fromEntries(Array.from(document.querySelectorAll('table'))
                .map(t => [t.className, t.tBodies[0].rows.length]))""")
            text = page.inner_text("body")
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return {"images": images, "errors": errors, "failed": failed, "tables": tables, "text": text}


if __name__ == "__main__":
    out = open_page(Path(sys.argv[1]), Path(sys.argv[2]))
    print({k: v for k, v in out.items() if k != "text"})
