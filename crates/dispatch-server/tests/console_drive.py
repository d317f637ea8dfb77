"""Drives the web console in headless Chromium (Debian's /usr/bin/chromium) with Playwright for
Python, as tests/console.rs asks: a user signs in, sees the functions, execs one from its page,
watches a run's lines arrive live, sees a chart; a viewer sees no buttons that change anything
and the API refuses it when forced; text a function prints is never run as markup. Screenshots go
to the artifacts folder. Exits non-zero with the reason on the first thing that is not so.

argv: API_URL ADMIN_TOKEN DEV_TOKEN VIEWER_TOKEN ARTIFACTS_DIR, or API_URL - - - ARTIFACTS_DIR
for a server without tokens (--insecure-no-auth): the console opens without a sign-in.
"""

import json
import os
import socket
import sys
import urllib.request

from playwright.sync_api import expect, sync_playwright

API, ADMIN, DEV, VIEWER, ARTIFACTS = sys.argv[1:6]
WAIT = 30_000  # ms: every wait has a deadline
expect.set_options(timeout=WAIT)
os.makedirs(ARTIFACTS, exist_ok=True)


def shot(page, name):
    page.screenshot(path=os.path.join(ARTIFACTS, f"{name}.png"), full_page=True)


def check(ok, what):
    if not ok:
        raise AssertionError(what)


def sign_in(page, token):
    page.goto(f"{API}/ui/")
    page.fill("#token", token)
    page.click("form.login button[type=submit]")
    expect(page.locator("#nav a", has_text="Functions")).to_be_visible()


def no_tokens(browser):
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{API}/ui/")
    expect(page.locator("#nav a", has_text="Functions")).to_be_visible()
    check(page.locator("#token").count() == 0, "no sign-in on a server without tokens")
    expect(page.locator("main h1")).to_have_text("Functions")
    check(not errors, f"the page raised: {errors}")
    shot(page, "no-tokens")
    print("console: ok (no tokens)")


def main():
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        if ADMIN == "-":
            no_tokens(browser)
            browser.close()
            return
        problems = []
        script_bytes = {}

        def watch(page):
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("dialog", lambda d: d.accept())

            def on_response(r):
                if r.request.resource_type == "script" and r.status == 200:
                    script_bytes[r.url] = len(r.body())

            page.on("response", on_response)

        # --- a developer ---------------------------------------------------------------
        dev_ctx = browser.new_context(viewport={"width": 1280, "height": 900})
        page = dev_ctx.new_page()
        watch(page)
        page.goto(f"{API}/ui/")
        expect(page.locator("#token")).to_be_visible()
        shot(page, "01-sign-in")
        # A wrong token: the API's answer, and no way in.
        page.fill("#token", "not-a-token")
        page.click("form.login button[type=submit]")
        expect(page.locator(".error")).to_contain_text("not valid")
        sign_in(page, DEV)
        check(DEV not in page.url, "the token must never be in a URL")
        stored = page.evaluate("[sessionStorage.getItem('dispatch.token'), localStorage.length]")
        check(stored == [DEV, 0], f"the token is kept in session storage only: {stored}")

        # The functions the test created through the API are listed.
        rows = page.locator("main table tbody tr")
        for name in ["hello", "talky", "evil"]:
            expect(rows.filter(has_text=name)).to_have_count(1)
        expect(rows.filter(has_text="hello").locator(".badge")).to_have_text("READY")
        check(page.locator("button.create").count() == 1, "a developer may create")
        shot(page, "02-functions")

        # Exec from the function's page: the envelope is shown.
        page.click("main table a:text-is('hello')")
        expect(page.locator("h1")).to_contain_text("Function hello")
        expect(page.locator("main")).to_contain_text("hello.py")  # its source file list
        page.fill("#exec-input", '{"name": "Console"}')
        page.click("button.exec")
        envelope = page.locator("#exec-out pre.envelope")
        expect(envelope).to_contain_text("Hello, Console")
        env = json.loads(envelope.text_content())
        check(set(env) == {"context", "payload"}, f"the exec box shows the envelope: {env}")
        check(env["context"]["error"] is None, f"no error: {env}")
        shot(page, "03-exec")

        # The charts, drawn from the server's counts of the last hour: a line or a dot.
        page.reload()
        charts = page.locator("#charts svg.chart")
        expect(charts).to_have_count(3)
        drawn = page.evaluate(
            "[...document.querySelectorAll('#charts svg.chart')][0].querySelectorAll('path.s0[d*=\"M\"]:not([d=\"M0,0\"]), circle.s0').length"
        )
        check(drawn > 0, "the requests chart draws the calls")
        expect(page.locator("#charts")).not_to_contain_text("No calls")
        shot(page, "04-function")

        # A run's lines, live: the handler prints, then waits for this script's word.
        gate = socket.socket()
        gate.bind(("127.0.0.1", 0))
        gate.listen(1)
        gate.settimeout(WAIT / 1000)
        port = gate.getsockname()[1]
        page.goto(f"{API}/ui/#/functions/talky")
        expect(page.locator("h1")).to_contain_text("Function talky")
        page.fill("#exec-input", json.dumps({"port": port}))
        page.check("#exec-async")
        page.click("button.exec")
        page.click("#exec-out a")
        expect(page.locator("h1")).to_contain_text("Run ")
        logs = page.locator("pre.logs")
        expect(logs).to_contain_text("first line")
        expect(page.locator("main h2", has_text="Logs (live)")).to_be_visible()
        check("second line" not in logs.text_content(), "the handler has not gone on yet")
        shot(page, "05-run-live")
        conn, _ = gate.accept()
        conn.sendall(b"!")
        expect(page.locator("#run-status")).to_have_text("SUCCEEDED")
        expect(page.locator("pre.logs")).to_contain_text("second line")
        expect(page.locator("pre.output")).to_contain_text("done")
        conn.close()
        gate.close()
        shot(page, "06-run-done")

        # A job execution: its lines as they grow, then Completed; another one cancelled.
        def execute(port):
            req = urllib.request.Request(
                f"{API}/execute/default/gated", data=str(port).encode(), method="PUT",
                headers={"Authorization": f"Bearer {DEV}", "Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.load(r)["uuid"]

        gate = socket.socket()
        gate.bind(("127.0.0.1", 0))
        gate.listen(2)
        gate.settimeout(WAIT / 1000)
        port = gate.getsockname()[1]
        uuid = execute(port)
        page.goto(f"{API}/ui/#/jobs")
        expect(page.locator("main table").first).to_contain_text("gated")
        page.click(f"main a:text-is('{uuid}')")
        expect(page.locator("pre.logs")).to_contain_text("job one")
        expect(page.locator("main h2", has_text="Logs (live)")).to_be_visible()
        conn, _ = gate.accept()
        shot(page, "07-job-live")
        conn.sendall(b"!")
        expect(page.locator("h1 .badge")).to_have_text("Completed")
        expect(page.locator("pre.logs")).to_contain_text("job two")
        conn.close()
        uuid = execute(port)
        page.goto(f"{API}/ui/#/jobs/{uuid}")
        expect(page.locator("pre.logs")).to_contain_text("job one")
        page.click("button.cancel")
        expect(page.locator("h1 .badge")).to_have_text("Cancelled")
        gate.close()

        # Images with their build log, drivers with their next fire, subscriptions.
        page.goto(f"{API}/ui/#/images")
        row = page.locator("main table tbody tr", has_text="python3").first
        expect(row.locator(".badge")).to_have_text("READY")
        row.locator("a", has_text="log").click()
        expect(page.locator("h1")).to_contain_text("Image ")
        expect(page.locator("pre.build-log")).not_to_have_text("…")
        page.goto(f"{API}/ui/#/drivers")
        row = page.locator("main table tbody tr", has_text="yearly")
        expect(row).to_contain_text("cron")
        expect(row).to_contain_text("in ")  # its next fire, ahead
        page.goto(f"{API}/ui/#/events")
        expect(page.locator("main table").first.locator("tbody tr", has_text="on-ping")).to_contain_text("ping")

        # Text a function answers and prints stays text.
        page.goto(f"{API}/ui/#/functions/evil")
        expect(page.locator("h1")).to_contain_text("Function evil")
        page.click("button.exec")
        expect(page.locator("#exec-out pre.envelope")).to_contain_text("<img src=x onerror=")
        page.click("#exec-out a")
        expect(page.locator("pre.logs")).to_contain_text("<script>window.__pwned=2</script>")
        check(page.locator("main img").count() == 0, "no element made of a function's output")
        check(page.evaluate("window.__pwned === undefined"), "a function's output ran as code")
        check(page.locator("#nav a", has_text="Admin").count() == 0, "Admin is for admins")

        # Runs: filtered by function.
        page.goto(f"{API}/ui/#/runs?function=hello")
        expect(page.locator("main table tbody tr").first).to_contain_text("hello")
        check(
            page.locator("main table tbody tr", has_text="talky").count() == 0,
            "the filter keeps other functions' runs out",
        )
        # Endpoints: a link to the gateway.
        page.goto(f"{API}/ui/#/endpoints")
        href = page.locator("a.endpoint-url").first.get_attribute("href")
        check(href.endswith("/hello") and href.startswith("http://"), f"endpoint link {href}")
        dev_ctx.close()

        # --- a viewer: sees, cannot change --------------------------------------------
        view_ctx = browser.new_context(viewport={"width": 1280, "height": 900})
        page = view_ctx.new_page()
        watch(page)
        sign_in(page, VIEWER)
        expect(page.locator("main table tbody tr").filter(has_text="hello")).to_have_count(1)
        for what in ["button.create", "button.delete", "button.exec", "details"]:
            check(page.locator(what).count() == 0, f"a viewer sees no {what}")
        page.click("main table a:text-is('hello')")
        expect(page.locator("h1")).to_contain_text("Function hello")
        expect(page.locator("#charts")).to_be_visible()
        for what in ["button.delete", "button.exec", "#exec-input"]:
            check(page.locator(what).count() == 0, f"a viewer sees no {what} on a function")
        shot(page, "08-viewer-function")
        # Forced: the API says no, and nothing changed.
        status = page.evaluate(
            """async () => (await fetch('/v1/namespaces/default/functions/hello', {method: 'DELETE',
                 headers: {Authorization: 'Bearer ' + sessionStorage.getItem('dispatch.token')}})).status"""
        )
        check(status == 403, f"a viewer's forced DELETE must be refused: {status}")
        status = page.evaluate(
            """async () => (await fetch('/v1/namespaces/default/functions/hello/runs', {method: 'POST',
                 headers: {Authorization: 'Bearer ' + sessionStorage.getItem('dispatch.token'),
                 'Content-Type': 'application/json'}, body: '{}'})).status"""
        )
        check(status == 403, f"a viewer's forced exec must be refused: {status}")
        page.reload()
        expect(page.locator("h1")).to_contain_text("Function hello")
        view_ctx.close()

        # --- an admin: tokens and the audit log ---------------------------------------
        admin_ctx = browser.new_context(viewport={"width": 1280, "height": 900})
        page = admin_ctx.new_page()
        watch(page)
        sign_in(page, ADMIN)
        page.click("#nav a:text-is('Admin')")
        expect(page.locator("main table").first.locator("tbody tr", has_text="viewer")).to_have_count(1)
        expect(page.locator("main")).to_contain_text("Audit log")
        shot(page, "09-admin")
        admin_ctx.close()

        # --- a phone ------------------------------------------------------------------
        phone = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
        page = phone.new_page()
        watch(page)
        sign_in(page, DEV)
        expect(page.locator("main table tbody tr").filter(has_text="hello")).to_have_count(1)
        wide = page.evaluate("document.documentElement.scrollWidth")
        check(wide <= 391, f"the page fits a phone's width (tables scroll in their box): {wide}px")
        shot(page, "10-phone-functions")
        page.goto(f"{API}/ui/#/functions/hello")
        expect(page.locator("#charts")).to_be_visible()
        wide = page.evaluate("document.documentElement.scrollWidth")
        check(wide <= 391, f"a function's page fits a phone's width: {wide}px")
        shot(page, "11-phone-function")
        phone.close()

        check(script_bytes, "the console's script was loaded")
        total = sum(script_bytes.values())
        check(total <= 200 * 1024, f"a page needs at most 200 KB of script: {total} bytes")
        check(not problems, f"the page raised: {problems}")
        browser.close()
        print(f"console: ok ({total} bytes of script)")


if __name__ == "__main__":
    main()
