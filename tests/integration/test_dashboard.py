"""The web dashboard end to end in a real headless Chromium (Debian's chromium and chromedriver, driven by
Selenium; never a downloaded browser) against a real `tuneforge server` with a worker on SQLite: log in,
upload a dataset and read its validation report, plan and start a job on the tiny model from the form,
watch the loss plot take points from the live stream, cancel the job; screenshots are checked not blank;
a second tenant sees none of it. The pages carry a strict CSP and the key never leaves sessionStorage."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import httpx
import pytest
from conftest import EXAMPLE_DATA, ServerProcess

from tuneforge.ui import ASSETS

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

SHOTS_FOR_REVIEW = Path("/tmp/dashboard-shots")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1360,1000")
# Long enough to be running when cancelled; one metrics event per step, no evaluation or checkpoint on the way.
JOB_SETTINGS = {"training": {"per_device_batch_size": 2, "logging_steps": 1},
                "dataset": {"max_seq_length": 256},
                "evaluation": {"eval_before_training": False, "max_eval_examples": 2},
                "checkpoint": {"every_steps": 100_000}}


def _browser_binaries() -> tuple[str, str]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):  # not a skip: CI's bootstrap installs them, so their absence is a broken setup
        pytest.fail("the dashboard tests need Debian's chromium and chromium-driver on PATH (scripts/bootstrap "
                    "installs them: apt-get install chromium chromium-driver)")
    return chromium, driver


@pytest.fixture
def server(tmp_path):
    (tmp_path / "home").mkdir()
    process = ServerProcess(tmp_path / "home", f"sqlite:///{tmp_path / 'tuneforge.db'}")
    yield process
    process.stop()


@pytest.fixture
def browser():
    chromium, driver = _browser_binaries()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="tuneforge-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    chrome = webdriver.Chrome(service=Service(driver), options=options)
    chrome.set_page_load_timeout(30)
    yield chrome
    chrome.quit()
    shutil.rmtree(profile, ignore_errors=True)


def wait(browser, predicate, what: str, timeout: float = 30.0, server: ServerProcess | None = None):
    def attempt(_):
        try:
            return predicate()
        except (NoSuchElementException, StaleElementReferenceException):
            return False
    try:
        return WebDriverWait(browser, timeout, poll_frequency=0.2).until(attempt)
    except Exception as exc:  # noqa: BLE001 - name what did not happen, with what the page and server said
        logs = "\n".join(entry["message"] for entry in browser.get_log("browser"))
        tail = server.log_text()[-3000:] if server else ""
        body = browser.find_element(By.TAG_NAME, "body").text[-2000:]
        raise AssertionError(f"timed out waiting for {what}\npage:\n{body}\nconsole:\n{logs}\n{tail}") from exc


def css(browser, selector):
    return browser.find_element(By.CSS_SELECTOR, selector)


def log_in(browser, key: str) -> None:
    wait(browser, lambda: css(browser, "#login-form").is_displayed(), "the login form")
    css(browser, "#api-key").send_keys(key)
    css(browser, "#login").click()
    wait(browser, lambda: css(browser, "#jobs-table table"), "the jobs list after logging in")


def shoot(browser, directory: Path, name: str) -> Path:
    path = directory / f"{name}.png"
    browser.save_screenshot(str(path))
    return path


def assert_not_blank(path: Path) -> None:
    """A rendered page: many colours (text, charts, badges), and a good share of pixels off the background."""
    from PIL import Image

    with Image.open(path) as image:
        pixels = image.convert("RGB")
        pixels.thumbnail((680, 500))
        colors = pixels.getcolors(maxcolors=1 << 20)
    background = max(colors)[1]
    total = sum(count for count, _ in colors)
    off_background = sum(count for count, color in colors if color != background)
    assert len(colors) > 200, f"{path.name}: only {len(colors)} colours"
    assert off_background / total > 0.05, f"{path.name}: {off_background / total:.1%} of pixels off the background"


def chart_points(browser, chart: str) -> int:
    return int(css(browser, f'figure.chart[data-chart="{chart}"]').get_attribute("data-points"))


def test_dashboard_runs_a_job_end_to_end_and_keeps_tenants_apart(server, browser, tmp_path):
    shots = tmp_path / "shots"
    shots.mkdir()

    # / sends the browser to the dashboard; nothing of the key is stored before logging in.
    browser.get(server.url + "/")
    assert browser.current_url == server.url + "/ui/"
    wait(browser, lambda: css(browser, "#login-form").is_displayed(), "the login form")
    css(browser, "#api-key").send_keys("tf_live_not-a-key")
    css(browser, "#login").click()
    wait(browser, lambda: "not accepted" in css(browser, "#login-form .error").text, "a wrong key's refusal")
    assert browser.execute_script("return sessionStorage.length") == 0
    css(browser, "#api-key").clear()
    log_in(browser, server.keys["tenant-a"])
    assert browser.execute_script("return sessionStorage.getItem('tuneforge.api_key')") == server.keys["tenant-a"]
    assert browser.execute_script("return localStorage.length") == 0
    assert server.keys["tenant-a"] not in browser.current_url
    assert css(browser, "#whoami").text == "tenant tenant-a"

    # Upload a dataset; the list follows its validation; its report shows the format and statistics.
    browser.get(server.url + "/ui/#/files")
    css(browser, "#upload-file").send_keys(str(EXAMPLE_DATA / "train.jsonl"))
    css(browser, "#upload").click()
    row = wait(browser, lambda: css(browser, '#files-table tr[data-status="processed"]'), "the upload to validate",
               timeout=60, server=server)
    file_id = row.get_attribute("data-file")
    row.find_element(By.TAG_NAME, "a").click()
    report = wait(browser, lambda: css(browser, "#validation-report"), "the validation report").text
    assert "chat" in report and "320" in report and "No problems." in report
    shoot(browser, shots, "1-dataset-report")

    # Create a job from the form: the plan (memory, cost) comes first, then Submit is enabled.
    browser.get(server.url + "/ui/#/new")
    wait(browser, lambda: css(browser, f'#job-training_file option[value="{file_id}"]'), "the job form")
    Select(css(browser, "#job-training_file")).select_by_value(file_id)
    Select(css(browser, "#job-model")).select_by_value("tiny-llama")
    Select(css(browser, "#job-method")).select_by_value("supervised")
    css(browser, "#job-max_steps").send_keys("100000")
    css(browser, "#job-suffix").send_keys("ui")
    css(browser, "#job-tuneforge").send_keys(json.dumps(JOB_SETTINGS))
    assert not css(browser, "#submit-job").is_enabled()
    css(browser, "#plan-job").click()
    plan = wait(browser, lambda: css(browser, "#plan"), "the plan", server=server).text
    assert "Fits" in plan and "Memory per device" in plan and "Estimated cost" in plan
    shoot(browser, shots, "2-plan")
    css(browser, "#submit-job").click()
    wait(browser, lambda: "#/jobs/ftjob-" in browser.current_url, "the job page")
    job_id = browser.current_url.rsplit("/", 1)[1]

    # The loss plot takes points from the live stream, and keeps taking them without a reload.
    wait(browser, lambda: chart_points(browser, "loss") >= 3, "three points on the loss plot", timeout=120,
         server=server)
    seen = chart_points(browser, "loss")
    wait(browser, lambda: chart_points(browser, "loss") > seen, "the loss plot to update live", timeout=60,
         server=server)
    assert chart_points(browser, "throughput") >= 3
    assert css(browser, 'figure.chart[data-chart="loss"] canvas').size["width"] > 200
    assert "train_loss=" in css(browser, "#events-log").text
    shoot(browser, shots, "3-job-live")

    # Cancel it from its page (after the confirmation dialog).
    css(browser, "#cancel-job").click()
    browser.switch_to.alert.accept()
    wait(browser, lambda: "cancelled" in css(browser, "#job-facts").text, "the job to show cancelled", server=server)
    headers = {"Authorization": f"Bearer {server.keys['tenant-a']}"}
    assert httpx.get(f"{server.url}/v1/fine_tuning/jobs/{job_id}", headers=headers).json()["status"] == "cancelled"
    shoot(browser, shots, "4-job-cancelled")

    browser.get(server.url + "/ui/#/jobs")
    row = wait(browser, lambda: css(browser, f'#jobs-table tr[data-job="{job_id}"]'), "the job in the list")
    assert "cancelled" in row.text and "tiny-llama" in row.text
    shoot(browser, shots, "5-jobs")
    browser.get(server.url + "/ui/#/usage")
    usage = wait(browser, lambda: css(browser, "#usage-facts") and css(browser, "main").text, "the usage page")
    assert "tenant-a" in usage and "cancelled" in usage
    shoot(browser, shots, "6-usage")

    # The second tenant sees neither the job nor the dataset, and cannot open the job's page by its id.
    css(browser, "#logout").click()
    assert browser.execute_script("return sessionStorage.length") == 0
    log_in(browser, server.keys["tenant-b"])
    assert job_id not in css(browser, "#jobs-table").text and "No jobs yet" in css(browser, "#jobs-table").text
    browser.get(server.url + f"/ui/#/jobs/{job_id}")
    error = wait(browser, lambda: css(browser, "main .error"), "the other tenant's job page to refuse").text
    assert "No fine-tuning job found" in error and "Loss" not in css(browser, "main").text
    shoot(browser, shots, "7-other-tenant-job")
    browser.get(server.url + "/ui/#/files")
    wait(browser, lambda: css(browser, "#files-table table"), "tenant-b's files")
    assert file_id not in css(browser, "#files-table").text
    shoot(browser, shots, "8-other-tenant-files")

    # No script error and no CSP violation on any page.
    problems = [e["message"] for e in browser.get_log("browser")
                if e["level"] == "SEVERE" and "Failed to load resource" not in e["message"]]
    assert problems == []

    for path in sorted(shots.glob("*.png")):
        assert_not_blank(path)
    SHOTS_FOR_REVIEW.mkdir(parents=True, exist_ok=True)
    for path in shots.glob("*.png"):
        shutil.copy(path, SHOTS_FOR_REVIEW / path.name)


@pytest.mark.slow
def test_a_succeeded_job_shows_its_evaluation_report_lineage_and_registry_version(server, browser):
    """A job that runs to the end (created through the API): its page shows the evaluation report (base vs
    fine-tuned), the registry version with its lineage, and the models page lists the version."""
    from conftest import post_file, wait_validated

    headers = {"Authorization": f"Bearer {server.keys['tenant-a']}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=30) as http:
        training = wait_validated(http, post_file(http, EXAMPLE_DATA / "train.jsonl")["id"])
        validation = wait_validated(http, post_file(http, EXAMPLE_DATA / "val.jsonl")["id"])
        job = http.post("/v1/fine_tuning/jobs", json={
            "model": "tiny-llama", "training_file": training["id"], "validation_file": validation["id"],
            "suffix": "dash", "tuneforge": {"training": {"max_steps": 4, "per_device_batch_size": 4},
                                            "dataset": {"max_seq_length": 256},
                                            "evaluation": {"max_eval_examples": 4}}}).json()
    browser.get(server.url + "/ui/")
    log_in(browser, server.keys["tenant-a"])
    browser.get(server.url + f"/ui/#/jobs/{job['id']}")
    wait(browser, lambda: "succeeded" in css(browser, "#job-facts").text, "the job to succeed", timeout=300,
         server=server)
    report = wait(browser, lambda: css(browser, "#eval-report table").text, "the evaluation report", server=server)
    assert "BASE" in report.upper() and "FINE-TUNED" in report.upper() and "perplexity" in report
    lineage = wait(browser, lambda: css(browser, "#lineage table").text, "the lineage", server=server)
    assert job["id"] in lineage and "tiny-llama" in lineage and training["id"] in lineage
    assert chart_points(browser, "loss") == 4
    browser.save_screenshot(str(server.home / "succeeded.png"))
    assert_not_blank(server.home / "succeeded.png")
    browser.get(server.url + "/ui/#/models")
    versions = wait(browser, lambda: css(browser, "main tr[data-version]").text, "the registry version")
    assert "v1" in versions and job["id"] in versions


def test_dashboard_pages_carry_a_strict_csp_and_hold_no_inline_script(tmp_path):
    from fastapi.testclient import TestClient

    from tuneforge.api.app import create_app
    from tuneforge.db.migrate import upgrade
    from tuneforge.db.session import Database

    db = Database(f"sqlite:///{tmp_path / 'tuneforge.db'}")
    upgrade(db.engine)
    client = TestClient(create_app(db=db))
    assert client.get("/", follow_redirects=False).headers["location"] == "/ui/"
    index = client.get("/ui/")
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    policy = index.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy and "unsafe" not in policy
    scripts = re.findall(r"<script[^>]*>", index.text)
    assert scripts and all(" src=" in tag for tag in scripts)  # no inline script
    assert not re.search(r"\son[a-z]+=", index.text)  # no inline event handler
    for asset in ("js/main.js", "js/pages/job.js", "vendor/uplot/uPlot.iife.min.js", "vendor/uplot/LICENSE", "app.css"):
        answer = client.get(f"/ui/{asset}")
        assert answer.status_code == 200 and answer.headers["content-security-policy"] == policy, asset
    missing = client.get("/ui/no-such-file.js")
    assert missing.status_code == 404 and missing.headers["content-security-policy"] == policy
    # Rendering never parses API strings as markup: no module writes innerHTML / outerHTML / insertAdjacentHTML.
    sources = [path.read_text() for path in (ASSETS / "js").rglob("*.js")]
    assert sources and not any(re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write", s) for s in sources)
    # The UI needs no key to load; the API behind it still refuses a request without one.
    assert client.get("/v1/fine_tuning/jobs").status_code == 401
