"""Screenshot of the ``freqar serve`` page after a compare-with-dense SparseVAR run (for the README).

Starts ``python -m freqar serve`` on a free 127.0.0.1 port, drives headless Chromium (Debian's
``chromium`` + ``chromium-driver``) through Selenium, and writes a palette PNG:

    python benchmarks/screenshot_serve.py --models var-tiny --out docs/serve.png
"""

from __future__ import annotations

import argparse
import io
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["var-tiny"])
    ap.add_argument("--out", default="docs/serve.png")
    ap.add_argument("--seed", default="7")
    ap.add_argument("--label", default="3")
    ap.add_argument("--keep", default="0.4", help="SparseVAR keep budget typed into the page")
    ap.add_argument("--size", default="1180,1000", help="browser window WIDTH,HEIGHT")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/"
    cmd = [sys.executable, "-m", "freqar", "serve", "--port", str(port), "--threads", "1", "--models"]
    server = subprocess.Popen(cmd + args.models)
    profile = tempfile.mkdtemp(prefix="freqar-shot-")
    drv = None
    try:
        end = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(url + "api/models", timeout=2).read()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > end:
                    raise SystemExit("server did not start") from None
                time.sleep(0.2)
        opts = webdriver.ChromeOptions()
        opts.binary_location = shutil.which("chromium") or shutil.which("chromium-browser") or ""
        for flag in (
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--window-size={args.size}",
            f"--user-data-dir={profile}",
        ):
            opts.add_argument(flag)
        drv = webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver")), options=opts)
        drv.get(url)
        wait = WebDriverWait(drv, 120)
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
        Select(drv.find_element(By.ID, "label")).select_by_value(args.label)
        seed = drv.find_element(By.ID, "seed")
        seed.clear()
        seed.send_keys(args.seed)
        Select(drv.find_element(By.ID, "accel")).select_by_value("sparsevar")
        drv.find_element(By.ID, "knob-keep").send_keys(args.keep)
        drv.find_element(By.ID, "generate").click()
        wait.until(lambda d: d.execute_script("return !document.getElementById('masks-fig').hidden"))
        wait.until(lambda d: d.execute_script("return document.getElementById('masks').naturalWidth > 0"))
        time.sleep(0.3)
        shot = Image.open(io.BytesIO(drv.get_screenshot_as_png())).convert("RGB")
        bottom = drv.execute_script("return document.querySelector('main').getBoundingClientRect().bottom")
        shot = shot.crop((0, 0, shot.width, min(shot.height, int(bottom) + 8)))
        shot.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(args.out, optimize=True)
        summary = drv.find_element(By.ID, "summary").text
        print(f"wrote {args.out} ({shot.width}x{shot.height}): {summary}")
    finally:
        if drv is not None:
            drv.quit()
        server.terminate()
        server.wait(10)
        shutil.rmtree(profile, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
