"""The web console in headless Firefox (Debian's firefox-esr) through geckodriver, spoken to in
plain W3C WebDriver over HTTP (no client library): sign in, the functions listed, a function's
charts, exec from its page with the envelope shown, the run's page with its logs, a phone's
width. tests/console.rs runs it after the Chromium run; screenshots go to the artifacts folder.

argv: API_URL DEV_TOKEN ARTIFACTS_DIR GECKODRIVER FIREFOX
"""

import base64
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

API, DEV, ARTIFACTS, GECKODRIVER, FIREFOX = sys.argv[1:6]
DEADLINE = 30.0  # seconds: every wait has one
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"
os.makedirs(ARTIFACTS, exist_ok=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Driver:
    def __init__(self, base):
        self.base = base
        caps = {
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "firefox",
                    "moz:firefoxOptions": {
                        "binary": FIREFOX,
                        "args": ["-headless"],
                        # No update checks, telemetry or other calls out of this machine.
                        "prefs": {
                            "app.update.enabled": False,
                            "datareporting.policy.dataSubmissionEnabled": False,
                            "toolkit.telemetry.enabled": False,
                            "network.captive-portal-service.enabled": False,
                            "browser.safebrowsing.malware.enabled": False,
                            "browser.safebrowsing.phishing.enabled": False,
                        },
                    },
                }
            }
        }
        self.session = self.call("POST", "/session", caps)["sessionId"]

    def call(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.load(r)["value"]
        except urllib.error.HTTPError as e:
            raise AssertionError(f"{method} {path}: {e.read().decode()}") from None

    def s(self, method, path, body=None):
        return self.call(method, f"/session/{self.session}{path}", body)

    def go(self, url):
        self.s("POST", "/url", {"url": url})

    def js(self, script, *args):
        return self.s("POST", "/execute/sync", {"script": script, "args": list(args)})

    def find(self, css):
        found = self.s("POST", "/elements", {"using": "css selector", "value": css})
        return [e[ELEMENT] for e in found]

    def wait(self, css, text=None):
        """The first element matching `css` (containing `text`), polled until the deadline."""
        end = time.monotonic() + DEADLINE
        seen = None
        while time.monotonic() < end:
            for e in self.find(css):
                seen = self.s("GET", f"/element/{e}/text")
                if text is None or text in seen:
                    return e
            time.sleep(0.1)
        raise AssertionError(f"no {css!r} with {text!r} within {DEADLINE}s (last: {seen!r})")

    def type(self, css, text):
        e = self.wait(css)
        self.s("POST", f"/element/{e}/clear", {})
        self.s("POST", f"/element/{e}/value", {"text": text})

    def click(self, css, text=None):
        self.s("POST", f"/element/{self.wait(css, text)}/click", {})

    def text(self, css):
        return self.s("GET", f"/element/{self.wait(css)}/text")

    def shot(self, name):
        png = base64.b64decode(self.s("GET", "/screenshot"))
        with open(os.path.join(ARTIFACTS, f"{name}.png"), "wb") as f:
            f.write(png)

    def quit(self):
        self.s("DELETE", "")


def check(ok, what):
    if not ok:
        raise AssertionError(what)


def main():
    port = free_port()
    home = tempfile.mkdtemp(prefix="firefox-home-")
    env = dict(os.environ, HOME=home, MOZ_HEADLESS="1")
    log = open(os.path.join(home, "geckodriver.log"), "w")
    gecko = subprocess.Popen(
        [GECKODRIVER, "--port", str(port), "--host", "127.0.0.1"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        end = time.monotonic() + DEADLINE
        while True:
            try:
                urllib.request.urlopen(base + "/status", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.1)
        d = Driver(base)
        try:
            run(d)
        finally:
            d.quit()
    finally:
        gecko.terminate()
        gecko.wait(timeout=30)
    print("firefox: ok")


def run(d):
    d.s("POST", "/window/rect", {"width": 1280, "height": 900})
    d.go(f"{API}/ui/")
    d.type("#token", DEV)
    d.click("form.login button[type=submit]")
    d.wait("main table tbody tr", "hello")
    check(d.js("return sessionStorage.getItem('dispatch.token')") == DEV, "token in session storage")
    d.shot("firefox-01-functions")

    d.go(f"{API}/ui/#/functions/hello")
    d.wait("h1", "Function hello")
    d.wait("#charts")
    drawn = d.js(
        "return document.querySelectorAll('#charts svg.chart path.s0:not([d=\"M0,0\"]), #charts svg.chart circle.s0').length"
    )
    check(drawn > 0, "the requests chart draws the calls")
    d.type("#exec-input", '{"name": "Firefox"}')
    d.click("button.exec")
    envelope = d.text("#exec-out pre.envelope")
    env = json.loads(envelope)
    check(env["payload"]["myField"].startswith("Hello, Firefox"), f"the envelope: {env}")
    d.shot("firefox-02-exec")
    d.click("#exec-out a")
    d.wait("h1", "Run ")
    d.wait("#run-status", "SUCCEEDED")
    d.wait("pre.output", "Hello, Firefox")
    d.shot("firefox-03-run")

    d.go(f"{API}/ui/#/runs?function=hello")
    d.wait("main table tbody tr", "hello")
    # A phone's width: nothing wider than the screen (tables scroll in their box).
    d.s("POST", "/window/rect", {"width": 400, "height": 850})
    d.go(f"{API}/ui/#/functions/hello")
    d.wait("#charts")
    inner = d.js("return window.innerWidth")
    wide = d.js("return document.documentElement.scrollWidth")
    check(wide <= inner, f"a function's page fits {inner}px: {wide}px")
    d.shot("firefox-04-narrow")


if __name__ == "__main__":
    main()
