"""``freqar serve``: the API in-process (every bad field, queue-full 503, compare with dense) and the page
in a real headless Chromium driven by Selenium."""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest
from PIL import Image

from conftest import tiny_pipeline

pytest.importorskip("starlette", reason="the serve extra (starlette) is not installed")
pytest.importorskip("httpx", reason="starlette's test client needs httpx")
from starlette.testclient import TestClient  # noqa: E402

from freqar.cli import main  # noqa: E402
from freqar.cli.serve import is_loopback  # noqa: E402
from freqar.errors import InvalidOption  # noqa: E402
from freqar.serve.app import create_app  # noqa: E402
from freqar.serve.studio import ServeSettings  # noqa: E402

SPARSE = {"accel": "sparsevar", "knobs": {"keep": 0.5}}


@pytest.fixture
def client():
    app = create_app({"tiny": tiny_pipeline(), "tiny-b": tiny_pipeline(num_classes=3, seed=1)})
    with TestClient(app) as c:
        yield c


def png(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    assert img.format == "PNG"
    return img


def wait_done(c: TestClient, job_id: str, timeout: float = 30.0) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        view = c.get(f"/api/jobs/{job_id}").json()
        if view["status"] in ("done", "error"):
            return view
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not finish")


# ----- API ---------------------------------------------------------------------------------------------
def test_models_lists_only_the_served_models(client):
    data = client.get("/api/models").json()
    assert [m["name"] for m in data["models"]] == ["tiny", "tiny-b"]
    tiny = data["models"][0]
    assert tiny["image_size"] == 8 and tiny["num_classes"] == 5 and tiny["num_stages"] == 4
    assert set(tiny["accel"]) == {"none", "sparsevar", "fastvar"}
    assert tiny["accel"]["sparsevar"]["tau"] == 0.6
    assert data["limits"] == {"max_body": 16384, "concurrency": 1, "queue": 8}


def test_generate_returns_settings_seed_and_png(client):
    r = client.post("/api/generate", json={"model": "tiny", "label": 2, "seed": 11, "cfg": 2.0})
    assert r.status_code == 200, r.text
    v = r.json()
    assert v["status"] == "done" and v["seed"] == 11 and v["label"] == 2
    assert v["settings"] == {
        "model": "tiny",
        "label": 2,
        "seed": 11,
        "cfg": 2.0,
        "top_k": 0,
        "top_p": 0.0,
        "temperature": 1.0,
        "accel": "none",
        "knobs": {},
        "compare": False,
    }
    assert [s["grid"] for s in v["stages"]] == [[1, 1], [2, 2], [3, 3], [4, 4]]
    assert all(s["seconds"] >= 0 and s["tokens"] == s["total"] for s in v["stages"])
    assert v["tokens_computed"] == v["tokens_total"] == 30 and v["masks"] is None and v["compare"] is None
    first = client.get(v["image"])
    assert first.headers["content-type"] == "image/png" and png(first.content).size == (8, 8)
    # Same settings, same picture; the seed the server drew when none was given comes back.
    again = client.post("/api/generate", json={"model": "tiny", "label": 2, "seed": 11, "cfg": 2.0}).json()
    assert client.get(again["image"]).content == first.content and again["id"] != v["id"]
    drawn = client.post("/api/generate", json={}).json()
    assert isinstance(drawn["seed"], int) and drawn["settings"]["seed"] == drawn["seed"]
    assert drawn["model"] == "tiny" and 0 <= drawn["label"] < 5


def test_generate_png_with_settings_in_headers(client):
    r = client.post("/api/generate", json={"seed": 5, "accel": "fastvar"}, headers={"Accept": "image/png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert png(r.content).size == (8, 8)
    assert r.headers["x-freqar-seed"] == "5"
    assert '"accel":"fastvar"' in r.headers["x-freqar-settings"]


def test_compare_with_dense_side_by_side(client):
    body = {"seed": 4, "label": 1, "compare": True, **SPARSE}
    v = client.post("/api/generate", json=body).json()
    assert v["settings"]["compare"] is True and v["dense"] is not None
    assert v["dense"]["label"] == v["label"] == 1
    assert v["dense"]["tokens_computed"] == 30 and v["tokens_computed"] < 30
    c = v["compare"]
    assert c["speedup"] > 0 and c["token_ratio"] > 1
    assert -1 <= c["ssim"] <= 1 and (c["psnr"] is None or c["psnr"] > 0)
    # The dense half is exactly what a plain dense request with the same seed gives.
    plain = client.post("/api/generate", json={"seed": 4, "label": 1}).json()
    assert client.get(v["dense"]["image"]).content == client.get(plain["image"]).content
    masks = png(client.get(v["masks"]).content)
    assert masks.height == 96 and masks.width > 96 * 2  # the image plus one panel per sparse stage
    # FastVAR keeps no masks of its own: the server records its selections.
    fast = client.post("/api/generate", json={"seed": 4, "accel": "fastvar", "knobs": {"keep": 0.5}}).json()
    assert fast["masks"] is not None and fast["tokens_computed"] < 30


@pytest.mark.parametrize(
    "body, field",
    [
        ({"model": "../../etc/passwd"}, "model"),
        ({"model": 3}, "model"),
        ({"label": 5}, "label"),
        ({"label": -1}, "label"),
        ({"label": "cat"}, "label"),
        ({"label": 1.5}, "label"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"seed": "7"}, "seed"),
        ({"seed": True}, "seed"),
        ({"cfg": -0.5}, "cfg"),
        ({"cfg": 1e9}, "cfg"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 33}, "top_k"),
        ({"top_p": 1.01}, "top_p"),
        ({"temperature": 0}, "temperature"),
        ({"accel": "turbo"}, "accel"),
        ({"compare": "yes"}, "compare"),
        ({"knobs": [1]}, "knobs"),
        ({"knobs": {"tau": 0.5}}, "knobs"),
        ({"accel": "sparsevar", "knobs": {"tau": 1.5}}, "knobs.tau"),
        ({"accel": "sparsevar", "knobs": {"alpha": 0}}, "knobs.alpha"),
        ({"accel": "sparsevar", "knobs": {"alpha": 2.5}}, "knobs.alpha"),
        ({"accel": "sparsevar", "knobs": {"beta": -2}}, "knobs.beta"),
        ({"accel": "sparsevar", "knobs": {"block": 2}}, "knobs.block"),
        ({"accel": "sparsevar", "knobs": {"start_stage": 0}}, "knobs.start_stage"),
        ({"accel": "sparsevar", "knobs": {"keep": 0}}, "knobs.keep"),
        ({"accel": "sparsevar", "knobs": {"path": "/tmp"}}, "knobs.path"),
        ({"accel": "fastvar", "knobs": {"drop": [1.5]}}, "knobs.drop"),
        ({"accel": "fastvar", "knobs": {"drop": "0.5"}}, "knobs.drop"),
        ({"accel": "fastvar", "knobs": {"start_stage": 1, "cache_stage": 1}}, "knobs.cache_stage"),
        ({"checkpoint": "/tmp/x.pth"}, "checkpoint"),
    ],
)
def test_each_bad_field_is_a_422_naming_it(client, body, field):
    r = client.post("/api/generate", json=body)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["field"] == field and err["message"]


def test_bad_bodies(client):
    js = {"content-type": "application/json"}
    cases = [
        (b"[1, 2]", js, 400),
        (b"{not json", js, 400),
        (b'{"cfg": NaN}', js, 400),
        (b'{"cfg": 1e400}', js, 422),
        (b"[" * 8000 + b"]" * 8000, js, 400),
        (b"\xff\xfe{}", js, 400),
        (b'{"seed": 1}', {"content-type": "text/plain"}, 415),
        (b'{"seed": 1}', {"content-type": "application/x-www-form-urlencoded"}, 415),
        (b'{"seed": 1' + b" " * 20000 + b"}", js, 413),
    ]
    for data, headers, status in cases:
        for path in ("/api/generate", "/api/jobs"):
            r = client.post(path, content=data, headers=headers)
            assert r.status_code == status, (data[:20], path, r.text)
            assert r.json()["error"]["field"] == ("cfg" if status == 422 else "body")


def test_jobs_poll_progress_then_result(client):
    r = client.post("/api/jobs", json={"seed": 9, "model": "tiny-b", **SPARSE})
    assert r.status_code == 202 and r.headers["location"] == f"/api/jobs/{r.json()['id']}"
    v = wait_done(client, r.json()["id"])
    assert v["status"] == "done" and v["seed"] == 9 and v["model"] == "tiny-b"
    assert v["progress"]["num_stages"] == 4 and len(v["progress"]["stages"]) == 4
    assert client.get("/api/jobs/nope").status_code == 404
    assert client.get(f"/api/jobs/{v['id']}/dense.png").status_code == 404  # no compare, no dense
    assert client.get(f"/api/jobs/{v['id']}/secret.png").status_code == 404


def test_static_files_are_a_fixed_list(client):
    page = client.get("/")
    assert page.status_code == 200 and 'id="generate"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/static/app.js").status_code == 200
    for path in ("/static/..%2F..%2Fpyproject.toml", "/static/studio.py", "/static/%2Fetc%2Fpasswd"):
        assert client.get(path).status_code == 404


def test_queue_full_is_503_with_retry_after_and_nothing_is_lost():
    pipe = tiny_pipeline()
    gate = threading.Event()
    real = pipe.generate

    def held(*args, **kwargs):
        assert gate.wait(30), "test gate never opened"
        return real(*args, **kwargs)

    pipe.generate = held  # type: ignore[method-assign]
    app = create_app({"tiny": pipe}, ServeSettings(concurrency=1, queue=1, warmup=False))
    with TestClient(app) as c:
        a = c.post("/api/jobs", json={"seed": 1, "label": 0})
        b = c.post("/api/jobs", json={"seed": 2, "label": 1})
        assert a.status_code == b.status_code == 202
        full = c.post("/api/jobs", json={"seed": 3})
        assert full.status_code == 503 and int(full.headers["retry-after"]) >= 1
        assert "busy" in full.json()["error"]["message"]
        assert c.post("/api/generate", json={"seed": 3}).status_code == 503
        assert c.get("/api/models").json()["models"][0]["queue"]["pending"] == 2
        gate.set()
        va, vb = wait_done(c, a.json()["id"]), wait_done(c, b.json()["id"])
        assert (va["status"], va["seed"], va["label"]) == ("done", 1, 0)
        assert (vb["status"], vb["seed"], vb["label"]) == ("done", 2, 1)
        assert c.post("/api/generate", json={"seed": 3}).status_code == 200  # room again
        assert c.get("/api/models").json()["models"][0]["queue"]["pending"] == 0


def test_finished_jobs_are_bounded():
    app = create_app({"tiny": tiny_pipeline()}, ServeSettings(max_jobs=2))
    with TestClient(app) as c:
        ids = [c.post("/api/generate", json={"seed": i}).json()["id"] for i in range(4)]
        assert [c.get(f"/api/jobs/{i}").status_code for i in ids] == [404, 404, 200, 200]
        assert len(app.state.studio.jobs) == 2


def test_only_class_conditional_pipelines_are_served():
    with pytest.raises(InvalidOption, match="class-conditional"):
        create_app({"odd": object()})  # type: ignore[dict-item]
    with pytest.raises(InvalidOption, match="at least one"):
        create_app({})


def test_trusted_hosts_refuse_rebinding():
    app = create_app({"tiny": tiny_pipeline()}, allowed_hosts=["127.0.0.1", "localhost"])
    with TestClient(app, base_url="http://127.0.0.1") as c:
        assert c.get("/api/models").status_code == 200
        assert c.get("/api/models", headers={"host": "evil.example"}).status_code == 400


def test_cli_serve_checks_and_import_stays_light(capsys):
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.com")
    assert main(["serve", "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err
    assert main(["serve", "--queue", "-1"]) == 2
    code = "import sys, freqar, freqar.cli, freqar.serve; assert 'starlette' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ----- the page in a real browser ------------------------------------------------------------------------
def chromium_paths() -> tuple[str, str] | None:
    browser = next(
        (p for n in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(n))), None
    )
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.fixture
def live_server():
    """The app on uvicorn in a thread, on a free port of 127.0.0.1."""
    uvicorn = pytest.importorskip("uvicorn", reason="uvicorn (serve extra) is not installed")
    app = create_app({"tiny": tiny_pipeline(patch_nums=(1, 2, 3, 4, 6, 8))})
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    end = time.monotonic() + 20
    while not server.started and time.monotonic() < end:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(10)
    sock.close()


def chrome(browser: str, driver: str, profile: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
        f"--user-data-dir={profile}",
    ):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=driver), options=opts)


def test_page_in_headless_chromium(live_server, tmp_path):
    paths = chromium_paths()
    if paths is None:
        pytest.skip("no chromium + chromedriver on PATH (Debian: apt-get install chromium chromium-driver)")
    pytest.importorskip("selenium", reason="selenium (test extra) is not installed")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    drv = chrome(*paths, str(tmp_path / "profile"))
    try:
        drv.set_page_load_timeout(30)
        drv.get(live_server + "/")
        wait = WebDriverWait(drv, 30)
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
        assert Select(drv.find_element(By.ID, "model")).first_selected_option.text == "tiny"
        Select(drv.find_element(By.ID, "label")).select_by_value("3")
        seed = drv.find_element(By.ID, "seed")
        seed.clear()
        seed.send_keys("21")
        Select(drv.find_element(By.ID, "accel")).select_by_value("sparsevar")
        drv.find_element(By.ID, "knob-keep").send_keys("0.5")
        assert drv.find_element(By.ID, "compare").is_selected()
        drv.find_element(By.ID, "generate").click()

        def loaded(img_id: str):
            return lambda d: d.execute_script(
                "const i = document.getElementById(arguments[0]);"
                "return i.complete && i.naturalWidth > 0 && !i.closest('figure').hidden;",
                img_id,
            )

        for img_id in ("image", "dense-image", "masks"):
            wait.until(loaded(img_id), f"#{img_id} never appeared")
        rows = drv.find_elements(By.CSS_SELECTOR, "#timings tbody tr")
        assert len(rows) == 6 and drv.find_element(By.ID, "timings").is_displayed()
        assert rows[-1].find_elements(By.TAG_NAME, "td")[1].text == "8x8"
        summary = drv.find_element(By.ID, "summary").text
        assert "speed-up" in summary and "PSNR" in summary and "SSIM" in summary
        assert "seed 21" in drv.find_element(By.ID, "image-caption").text
        assert drv.find_element(By.ID, "error").is_displayed() is False
        # A bad knob comes back as an error naming the field, highlighted in the form.
        keep = drv.find_element(By.ID, "knob-keep")
        keep.clear()
        keep.send_keys("7")
        drv.find_element(By.ID, "generate").click()
        wait.until(lambda d: d.find_element(By.ID, "error").is_displayed())
        assert drv.find_element(By.ID, "error").text.startswith("knobs.keep:")
        assert "bad" in keep.get_attribute("class")
        shot = os.environ.get("FREQAR_SERVE_SCREENSHOT")
        if shot:
            drv.save_screenshot(shot)
    finally:
        drv.quit()
