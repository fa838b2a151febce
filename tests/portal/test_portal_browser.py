"""The customer portal end to end in real headless Chromium (Debian's
chromium + chromedriver, driven by Selenium; nothing downloaded): a seeded
mis_adapter and the portal run as real processes on loopback ports.

- the right factor shows the figures QueryAccount gives over gRPC, masked
  name and address, 12 bills and a chart with 12 bars, on a phone-width and
  a desktop-width window, in Chinese and in English;
- a wrong account and a wrong phone factor give the same page text and status;
- the per-account attempt limit engages, alike for a real and an absent account;
- screenshots are saved under the test's tmp dir (paths printed)."""
from __future__ import annotations

import http.cookiejar
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from portal.i18n import money
from tests.support import procs
from yindian.v1 import billing_pb2 as bpb
from yindian.v1 import billing_pb2_grpc
from yindian_common.fields import make_account_no
from yindian_common.ports import stable_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CLOCK_START = "2026-11-28T12:00:00+08:00"
MIN_RESPONSE_S = 0.4
PHONE = (390, 844)
DESKTOP = (1280, 900)


@dataclass
class Stack:
    portal_url: str
    adapter_addr: str
    db_url: str
    shots: Path


def free_port() -> int:
    """Outside the ephemeral range: a restart after a kill finds it free (yindian_common.ports)."""
    return stable_port()


def start_portal(upstream: str, log_dir: Path, *extra: str) -> procs.Proc:
    return procs.start("portal", ["portal", "serve", "--listen", "127.0.0.1:0", "--upstream", upstream,
                                  "--operator", "portal", "--insecure", "--metrics-port", "0",
                                  "--lookup-min-response-s", str(MIN_RESPONSE_S), "--upstream-deadline-s", "2",
                                  *extra], log_dir=log_dir)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("portal")
    db_url = f"sqlite:///{tmp / 'mis.db'}"
    subprocess.run([sys.executable, "-m", "mis_adapter", "seed", "--db", db_url, "--accounts", "60",
                    "--roster-dir", str(tmp / "roster"), "--clock-start", CLOCK_START, "--arrears-share", "0.3"],
                   cwd=procs.REPO, check=True, capture_output=True, timeout=120)
    adapter = procs.start("mis_adapter", ["mis_adapter", "serve", "--db", db_url, "--listen", "127.0.0.1:0",
                                          "--metrics-port", "0", "--insecure", "--clock-start", CLOCK_START,
                                          "--operator", "portal"], log_dir=tmp)
    portal = start_portal(adapter.grpc_addr, tmp, "--limit-per-account", "3/hour", "--limit-per-client", "200/minute")
    shots = tmp / "screenshots"
    shots.mkdir()
    try:
        yield Stack(f"http://{portal.grpc_addr}", adapter.grpc_addr, db_url, shots)
    finally:
        assert portal.terminate() == 0
        assert adapter.terminate() == 0


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[webdriver.Chrome]:
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.fail("chromium and chromium-driver (Debian packages) are required; .ci/run installs them")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path_factory.mktemp('chrome-profile')}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def households(db_url: str) -> list[tuple[str, str, str, str]]:
    """(account_no, phone, name, address) of households with unpaid bills, by account."""
    eng = sa.create_engine(db_url)
    with eng.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT c.account_no, c.phone, c.name, c.address FROM customers c WHERE EXISTS "
            "(SELECT 1 FROM bills b WHERE b.account_no = c.account_no AND b.status <> 'PAID') "
            "ORDER BY c.account_no")).all()
    eng.dispose()
    return [tuple(r) for r in rows]  # type: ignore[misc]


def query_account(stack: Stack, account_no: str) -> bpb.QueryAccountResponse:
    with grpc.insecure_channel(stack.adapter_addr) as ch:
        return billing_pb2_grpc.BillingServiceStub(ch).QueryAccount(
            bpb.QueryAccountRequest(account_no=account_no), metadata=[("x-yindian-bank-id", "ICBC")], timeout=10)


def pay_online(stack: Stack, account_no: str, amount_fen: int) -> None:
    with grpc.insecure_channel(stack.adapter_addr) as ch:
        billing_pb2_grpc.BillingServiceStub(ch).Pay(bpb.PayRequest(
            bank_serial=f"WEB-{account_no}", account_no=account_no, amount_fen=amount_fen, outlet_code="WEB",
            teller_id="W1", channel=bpb.CHANNEL_ONLINE), metadata=[("x-yindian-bank-id", "ICBC")], timeout=10)


def look_up(driver: webdriver.Chrome, base: str, account_no: str, last4: str, lang: str = "zh") -> int:
    """Fills the form like a customer; returns the HTTP status of the answer."""
    driver.get(f"{base}/?lang={lang}")
    driver.find_element(By.ID, "account_no").send_keys(account_no)
    driver.find_element(By.ID, "phone_last4").send_keys(last4)
    driver.find_element(By.ID, "submit").click()
    return status_of(driver)


def status_of(driver: webdriver.Chrome) -> int:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        status = driver.execute_script(
            "const n = performance.getEntriesByType('navigation')[0];"
            "return n && n.name.endsWith('/lookup') && n.responseEnd > 0 ? n.responseStatus : 0;")
        if status:
            return int(status)
        time.sleep(0.05)  # polling the browser, not synchronising our own threads
    raise AssertionError("the look-up answer never arrived")


def shot(driver: webdriver.Chrome, stack: Stack, name: str, size: tuple[int, int]) -> None:
    """Two artifacts: what the window shows first (`-top`), and the whole page."""
    driver.set_window_size(*size)
    driver.execute_script("window.scrollTo(0, 0)")
    top = stack.shots / f"{name}-top.png"
    driver.save_screenshot(str(top))
    charts = driver.find_elements(By.CSS_SELECTOR, "section.chart-box")
    if charts:
        driver.execute_script("arguments[0].scrollIntoView()", charts[0])
        driver.save_screenshot(str(stack.shots / f"{name}-chart.png"))
        print(f"screenshot: {stack.shots / f'{name}-chart.png'}")
        driver.execute_script("window.scrollTo(0, 0)")
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(size[0], max(size[1], min(int(height) + 140, 6000)))
    full = stack.shots / f"{name}-full.png"
    driver.save_screenshot(str(full))
    driver.set_window_size(*size)
    print(f"screenshot: {top}\nscreenshot: {full}")


def body_text(driver: webdriver.Chrome) -> str:
    return str(driver.find_element(By.TAG_NAME, "body").text)


def test_right_factor_shows_query_account_figures_and_chart(stack: Stack, browser: webdriver.Chrome) -> None:
    account_no, phone, name, address = households(stack.db_url)[0]
    pay_online(stack, account_no, 1_234)   # a partial payment: a last payment and a channel to show
    q = query_account(stack, account_no)
    browser.set_window_size(*PHONE)
    assert look_up(browser, stack.portal_url, account_no, phone[-4:]) == 200
    assert browser.find_element(By.ID, "arrears").text == money(q.arrears_fen, "zh")
    assert browser.find_element(By.ID, "late_fee").text == money(q.late_fee_fen, "zh")
    assert browser.find_element(By.ID, "total_due").text == money(q.total_due_fen, "zh")
    assert browser.find_element(By.ID, "prepaid").text == money(q.prepaid_fen, "zh")
    assert "12.34 元" in browser.find_element(By.ID, "last_payment").text
    assert "网上缴费" in browser.find_element(By.ID, "last_payment").text
    source = browser.page_source
    assert name not in source and address not in source and phone not in source
    assert browser.find_element(By.ID, "name").text == name[0] + "*" * (len(name) - 1)
    bars = browser.find_elements(By.CSS_SELECTOR, "svg.chart rect.bar-kwh")
    rows = browser.find_elements(By.CSS_SELECTOR, "table.bills tr.bill")
    assert len(bars) == len(rows) == 12
    assert all(float(b.get_attribute("height") or 0) > 0 for b in bars)
    assert browser.find_elements(By.CSS_SELECTOR, "svg.chart circle.dot-charge")
    assert "未缴" in body_text(browser) and "网上缴费" in body_text(browser)
    shot(browser, stack, "overview-phone-zh", PHONE)

    browser.set_window_size(*DESKTOP)
    browser.get(f"{stack.portal_url}/")
    browser.find_element(By.LINK_TEXT, "English").click()
    browser.find_element(By.ID, "account_no").send_keys(account_no)
    browser.find_element(By.ID, "phone_last4").send_keys(phone[-4:])
    browser.find_element(By.ID, "submit").click()
    assert status_of(browser) == 200
    assert browser.find_element(By.ID, "total_due").text == money(q.total_due_fen, "en")
    assert "Recent bills" in body_text(browser) and "Online" in body_text(browser)
    assert len(browser.find_elements(By.CSS_SELECTOR, "svg.chart rect.bar-kwh")) == 12
    shot(browser, stack, "overview-desktop-en", DESKTOP)


def test_wrong_account_and_wrong_factor_are_indistinguishable(stack: Stack, browser: webdriver.Chrome) -> None:
    account_no, phone, _, _ = households(stack.db_url)[1]
    wrong_last4 = f"{(int(phone[-4:]) + 1) % 10_000:04d}"
    absent = make_account_no("09", 9_999_999)
    browser.set_window_size(*PHONE)
    answers = []
    for acct, last4 in ((account_no, wrong_last4), (absent, phone[-4:])):
        started = time.monotonic()
        status = look_up(browser, stack.portal_url, acct, last4)
        answers.append((status, body_text(browser)))
        assert time.monotonic() - started >= MIN_RESPONSE_S
    assert answers[0] == answers[1]
    assert answers[0][0] == 404 and "户号或手机号后四位不正确" in answers[0][1]
    shot(browser, stack, "no-match-phone-zh", PHONE)


def test_attempt_limit_per_account_engages_alike_for_real_and_absent(stack: Stack,
                                                                    browser: webdriver.Chrome) -> None:
    account_no, phone, _, _ = households(stack.db_url)[2]
    absent = make_account_no("09", 9_999_998)
    for acct, right in ((account_no, phone[-4:]), (absent, "1234")):
        statuses = [look_up(browser, stack.portal_url, acct, "0000" if right != "0000" else "1111")
                    for _ in range(3)]
        assert statuses == [404, 404, 404]
        # The 4th attempt is refused even with the right digits: the limit is per account, not per failure.
        assert look_up(browser, stack.portal_url, acct, right) == 429
        assert "查询次数过多" in body_text(browser)
    shot(browser, stack, "limited-phone-zh", PHONE)


def http_lookup(base: str, account_no: str, last4: str) -> tuple[int, str, float]:
    """A look-up with a plain HTTP client (cookie jar, CSRF token from the form):
    (status, page, seconds the POST took)."""
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    form = opener.open(f"{base}/", timeout=10).read().decode()
    token = re.search(r'name="csrftoken" value="([^"]+)"', form)
    assert token
    data = urllib.parse.urlencode({"csrftoken": token.group(1), "lang": "zh", "account_no": account_no,
                                   "phone_last4": last4}).encode()
    started = time.monotonic()
    try:
        with opener.open(f"{base}/lookup", data=data, timeout=10) as resp:
            return resp.status, resp.read().decode(), time.monotonic() - started
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), time.monotonic() - started


def test_wrong_account_and_wrong_factor_take_the_same_time(stack: Stack) -> None:
    account_no, phone, _, _ = households(stack.db_url)[3]
    wrong_last4 = f"{(int(phone[-4:]) + 1) % 10_000:04d}"
    absent = make_account_no("09", 9_999_997)
    seconds: dict[str, list[float]] = {"wrong factor": [], "absent account": []}
    pages = set()
    for _ in range(3):  # the per-account limit of this stack is 3 an hour
        for kind, acct, last4 in (("wrong factor", account_no, wrong_last4), ("absent account", absent, phone[-4:])):
            status, page, took = http_lookup(stack.portal_url, acct, last4)
            assert status == 404
            pages.add(re.sub(r'value="[^"]*"', "", page))  # the echoed account and the CSRF token differ
            seconds[kind].append(took)
    assert len(pages) == 1
    print(f"look-up seconds: {seconds}")
    assert min(min(v) for v in seconds.values()) >= MIN_RESPONSE_S
    medians = [sorted(v)[1] for v in seconds.values()]
    assert abs(medians[0] - medians[1]) < 0.15


def test_security_headers_and_csrf(stack: Stack) -> None:
    with urllib.request.urlopen(f"{stack.portal_url}/", timeout=10) as resp:
        headers = {k.lower(): v for k, v in resp.headers.items()}
    assert "script-src" not in headers["content-security-policy"]
    assert "default-src 'none'" in headers["content-security-policy"]
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY" and headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "no-referrer" and headers["cache-control"] == "no-store"
    assert "strict-transport-security" not in headers  # plain HTTP on loopback
    forged = urllib.request.Request(f"{stack.portal_url}/lookup", data=b"account_no=0100000017&phone_last4=1234",
                                    headers={"Cookie": "csrftoken=forged"})
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(forged, timeout=10)
    assert exc.value.code == 403
    huge = urllib.request.Request(f"{stack.portal_url}/lookup", data=b"account_no=" + b"1" * 10_000)
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(huge, timeout=10)
    assert exc.value.code == 413 and exc.value.headers["x-frame-options"] == "DENY"


def test_upstream_down_is_a_friendly_503_and_client_limit_engages(tmp_path: Path) -> None:
    portal = start_portal(f"127.0.0.1:{free_port()}", tmp_path, "--limit-per-client", "3/minute")
    try:
        base = f"http://{portal.grpc_addr}"
        acct = make_account_no("01", 1)
        for _ in range(3):
            status, body, took = http_lookup(base, acct, "1234")
            assert status == 503 and took >= MIN_RESPONSE_S and "查询服务暂时不可用" in body
        status, body, _ = http_lookup(base, acct, "1234")
        assert status == 429 and "查询次数过多" in body
    finally:
        assert portal.terminate() == 0  # SIGTERM: drained and exited cleanly
