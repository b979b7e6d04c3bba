"""Drives the dashboard in headless Chromium (Selenium, Debian's chromium and chromedriver)
against a running `polylog quickstart`: every page loads, its key elements show real data (the
same the API answers), and its interactions work (sign-in, the change feed's filters, search,
the reports' range, metric and breakdown). Saves a screenshot of each page.

Usage: dashboard.py <base URL> <API token> <screenshot directory>
Exits 0 when every check passes; otherwise prints the failed check and exits 1.
"""

import json
import os
import sys
import tempfile
import time
import urllib.request

os.environ.setdefault("SE_OFFLINE", "true")  # never look for drivers on the network

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.expected_conditions import staleness_of  # noqa: E402
from selenium.webdriver.support.ui import Select  # noqa: E402

BASE, TOKEN, SHOTS = sys.argv[1].rstrip("/"), sys.argv[2], sys.argv[3]
os.makedirs(SHOTS, exist_ok=True)


def api(path):
    req = urllib.request.Request(BASE + path, headers={"Authorization": "Bearer " + TOKEN})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


def wait(what, cond, timeout=30):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            got = cond()
            if got:
                return got
        except Exception as e:  # the page is still rendering
            last = e
        time.sleep(0.25)
    raise AssertionError(f"{what} (after {timeout}s; last error: {last})")


def check(ok, what):
    if not ok:
        raise AssertionError(what)


def number(text):
    t = text.strip().replace(",", "")
    mult = 1
    if t.endswith("k"):
        t, mult = t[:-1], 1000
    elif t.endswith("M"):
        t, mult = t[:-1], 1000000
    return float(t) * mult


def shot(d, name):
    path = os.path.join(SHOTS, name + ".png")
    d.save_screenshot(path)
    print("screenshot", path)


def main():
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for a in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--no-first-run", "--window-size=1400,1000",
              "--user-data-dir=" + tempfile.mkdtemp(prefix="polylog-chromium-")]:
        opts.add_argument(a)
    d = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    d.set_page_load_timeout(30)
    try:
        pages(d)
    finally:
        d.quit()


def pages(d):
    q = lambda css: d.find_element(By.CSS_SELECTOR, css)  # noqa: E731
    qs = lambda css: d.find_elements(By.CSS_SELECTOR, css)  # noqa: E731

    # Sign-in: without the token the dashboard asks for it; a wrong one is asked again, and
    # the session cookie it sets is not readable by scripts (HttpOnly).
    d.get(BASE + "/reports")
    check(d.find_elements(By.ID, "token"), "the dashboard asks for the token first")
    old = q("#token")
    old.send_keys("wrong")
    q("#login button").click()
    wait("a wrong token is asked again", lambda: staleness_of(old)(d) and qs("#token")
         and "not the API token" in q("form").text)
    old = q("#token")
    old.send_keys(TOKEN)
    q("#login button").click()
    wait("back to the page asked for, signed in", lambda: staleness_of(old)(d)
         and d.current_url.split("?")[0].endswith("/reports") and qs("#rep-range"))
    check(d.execute_script("return document.cookie") == "", "the session cookie is HttpOnly")
    d.get(BASE + "/")

    # Pipelines: every component with its state and counts, and both charts drawn.
    wait("the pipelines page", lambda: "Pipelines" in q("h1").text)
    wait("the source's card shows it streaming",
         lambda: "streaming" in q('[data-component="source:demo"]').text)
    events = wait("the source's event count", lambda: number(
        [r for r in qs('[data-component="source:demo"] .kv') if r.text.startswith("Events")][0]
        .find_element(By.TAG_NAME, "b").text))
    status = api("/v1/status")
    check(0 < events <= status["sources"]["demo"]["events"] + 1000,
          f"the card's {events} events match the API's {status['sources']['demo']['events']}")
    for kind in ["view:videos", "sink:videos", "rollup:viewability", "collector:events"]:
        check(qs(f'[data-component="{kind}"]'), f"a card for {kind}")
    wait("the throughput chart draws lines", lambda: qs("#chart-throughput svg path"))
    wait("the lag chart draws lines", lambda: qs("#chart-lag svg path"))
    check("source demo" in q("#chart-throughput .legend").text, "the throughput legend names the source")
    check(q(".live").text.strip() == "connected", "the header shows the API connected")
    shot(d, "pipelines")

    # Live changes: the quickstart's workload streams in; the filters narrow it.
    q('nav a[href="/changes"]').click()
    wait("changes arrive", lambda: len(qs("#feed-rows tr")) >= 3)
    check(q("#feed-count").text.endswith("shown"), "the count of changes shown")
    table = q('input[name="table"]')
    table.clear()
    table.send_keys("videos")
    for op in ["c", "d", "r"]:
        box = q(f'input[name="op"][value="{op}"]')
        if box.is_selected():
            box.click()
    q('#feed-filter button[type="submit"]').click()
    check("table=videos" in d.current_url and "op=u" in d.current_url, "the filter is in the URL")
    rows = wait("updates of videos arrive", lambda: qs("#feed-rows tr"), timeout=45)
    for r in qs("#feed-rows tr"):
        check(r.get_attribute("data-op") == "u", f"only updates pass: {r.text}")
        check("public.videos" in r.text, f"only videos pass: {r.text}")
    check(rows[0].find_elements(By.CSS_SELECTOR, ".chip"), "an update shows its columns")
    q("#pause").click()
    check(q("#pause").text == "Resume", "the feed pauses")
    shot(d, "changes")

    # Search: the index's documents, the same total as the API answers.
    q('nav a[href="/search"]').click()
    wait("the index is listed", lambda: "videos" in q("#search-index").text)
    box = q("#search-q")
    box.clear()
    box.send_keys("title:rust")
    q('#search-form button[type="submit"]').click()
    wait("hits for title:rust", lambda: "rust" in d.current_url and qs("#search-hits .hit"))
    titles = [h.text for h in qs("#search-hits .hit h3")]
    check(titles and all("rust" in t for t in titles), f"every title is about rust: {titles}")
    total = api("/v1/search/videos?q=title:rust&limit=1")["total"]
    shown = number(q("#search-total").text.split()[0])
    check(abs(shown - total) <= max(20, total * 0.05), f"the page's total {shown} is the API's {total}")
    box.clear()
    box.send_keys("publisher.country:jp")
    box.submit()
    wait("hits for publisher.country:jp", lambda: "country" in d.current_url and all(
        "country jp" in h.text for h in qs("#search-hits .hit")) and qs("#search-hits .hit"))
    check(any("tags" in h.text for h in qs("#search-hits .hit dt")), "the documents show their tags")
    shot(d, "search")

    # Reports: totals, a time series and a breakdown; range, metric and breakdown change them.
    q('nav a[href="/reports"]').click()
    wait("the impressions total", lambda: number(qs("#rep-kpis .kpi .v")[0].text) > 0)
    rows = wait("the breakdown table", lambda: qs("#rep-rows tr td.num"))
    check(rows, "breakdown rows")
    check(qs("#chart-report svg path"), "the time series is drawn")
    q('#rep-range button[data-r="15m"]').click()
    wait("the 15-minute range", lambda: "range=15m" in d.current_url
         and "on" in q('#rep-range button[data-r="15m"]').get_attribute("class"))
    Select(q("#rep-dim")).select_by_value("device")
    wait("the breakdown by device", lambda: "device" in q("#rep-table-title").text.lower() and "by=device" in d.current_url)
    devices = wait("device rows", lambda: [r.find_elements(By.TAG_NAME, "td")[0].text.split("\n")[0]
                                           for r in qs("#rep-rows tr") if r.find_elements(By.CSS_SELECTOR, "td.num")])
    report = api("/v1/reports/viewability?from=now-15m&group_by=device")
    want = {str(r["device"]) for r in report["rows"]}
    check(set(devices) <= want | {"(none)"} and devices, f"the devices shown {devices} are the report's {want}")
    Select(q("#rep-metric")).select_by_value("viewability")
    wait("the viewability series", lambda: "viewability" in q("#rep-series-title").text.lower())
    check("%" in q("#chart-report svg").text, "rates are shown as percentages")
    check(number(qs("#rep-kpis .kpi .v")[0].text) > 0, "the totals stay")
    shot(d, "reports")
    print("every dashboard check passed")


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print("FAILED:", e)
        sys.exit(1)
