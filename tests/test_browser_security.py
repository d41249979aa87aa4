"""A hostile page in a real Chromium, against a real no-token `tuneboard web`: it can neither read nor change
anything, whether it is served from a second loopback name (cross-origin) or uses DNS rebinding (its own
name made to resolve to 127.0.0.1, so that the browser treats Tuneboard as same-origin).

Rebinding is simulated exactly: Chromium resolves `rebind.test` to 127.0.0.1, and only the first document
at http://rebind.test:<port>/ is the attacker's (served by Playwright's router); every request the page
makes after that reaches Tuneboard with `Host: rebind.test:<port>`. Current Chromium already blocks a public
page's requests to loopback (Local Network Access); other browsers and older ones do not, so that check is
switched off here to model them, and Tuneboard's own Host check is what stops the attack. That browser runs
in its own process (`python -m tests.test_browser_security URL`): one test process drives one Playwright.
"""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
from contextlib import contextmanager

import httpx
import pytest

from app.config import PROJECT_ROOT
from app.processes import free_port
from tests.conftest import CHROMIUM, CHROMIUM_ARGS
from tests.servers import running

pytestmark = pytest.mark.browser

ATTACK = """<!doctype html><title>cute cats</title><script>
async function attempt(name, url, options) {
  try {
    const response = await fetch(url, options);
    window.result[name] = response.status;
    window.result[name + "_body"] = await response.text();
  } catch (error) {
    window.result[name] = "blocked";
  }
}
async function attack(base) {
  window.result = {};
  await attempt("read", base + "/api/datasets");
  await attempt("page", base + "/datasets");
  const match = (window.result.page_body || "").match(/X-CSRF-Token": "([^"]+)"/);
  const csrf = match ? {"X-CSRF-Token": match[1]} : {};
  const form = new FormData();
  form.append("file", new Blob(['[{"instruction": "q", "output": "a"}]']), "stolen.json");
  await attempt("upload", base + "/api/datasets", {method: "POST", body: form, headers: csrf});
  await attempt("launch", base + "/api/runs", {
    method: "POST", headers: {"content-type": "application/json", ...csrf}, body: '{"dataset_id": 1}'});
  await attempt("models", base + "/v1/models");
  return window.result;
}
</script>"""


@contextmanager
def attacker_site(address: str):
    """A plain web server on another loopback address serving the attacking page."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the standard library's name
            body = ATTACK.encode()
            self.send_response(200)
            self.send_header("content-type", "text/html")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer((address, free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{address}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


REBINDING_ARGS = [
    *CHROMIUM_ARGS,
    "--host-resolver-rules=MAP rebind.test 127.0.0.1",
    "--disable-features=LocalNetworkAccessChecks",
]


def rebinding_attack(base: str) -> dict:
    """Run the attack in a fresh process with its own Chromium; returns what the page saw."""
    result = subprocess.run(
        [sys.executable, "-m", "tests.test_browser_security", base],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def main(base: str) -> None:
    from playwright.sync_api import sync_playwright

    port = base.rsplit(":", 1)[1]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=REBINDING_ARGS)
        try:
            page = browser.new_page()
            page.route(
                f"http://rebind.test:{port}/",
                lambda route: route.fulfill(status=200, content_type="text/html", body=ATTACK),
            )
            page.goto(f"http://rebind.test:{port}/")
            print(json.dumps(page.evaluate("attack('')")))
        finally:
            browser.close()


def stored(base: str) -> tuple[list, list]:
    return httpx.get(f"{base}/api/datasets").json(), httpx.get(f"{base}/api/runs").json()


def test_a_rebinding_page_can_neither_read_nor_change_anything(tmp_path):
    with running("web", tmp_path / "data", log=tmp_path / "web.log") as (base, _):
        result = rebinding_attack(base)
        assert stored(base) == ([], [])
    assert {k: result[k] for k in ("read", "page", "upload", "launch", "models")} == dict.fromkeys(
        ("read", "page", "upload", "launch", "models"), 400
    )
    assert "TUNEBOARD_ALLOWED_HOSTS" in result["read_body"]


def test_the_same_attack_works_where_the_name_is_allowed(tmp_path):
    """The control: with `rebind.test` allowed, the same page reads and writes. So the test above fails
    if the Host check ever stops working, rather than passing for some other reason."""
    env = {"TUNEBOARD_ALLOWED_HOSTS": "rebind.test"}
    with running("web", tmp_path / "data", log=tmp_path / "web.log", env_extra=env) as (base, _):
        result = rebinding_attack(base)
        datasets, runs = stored(base)
    assert result["read"] == 200 and result["upload"] == 201 and result["launch"] == 201
    assert len(datasets) == 1 and len(runs) == 1


def test_a_page_on_another_loopback_name_cannot_read_or_change_anything(browser, tmp_path):
    with running("web", tmp_path / "data", log=tmp_path / "web.log") as (base, _):
        with attacker_site("127.0.0.2") as evil:
            context = browser.new_context()
            page = context.new_page()
            page.goto(evil)
            result = page.evaluate(f"attack('{base}')")
            context.close()
        assert stored(base) == ([], [])
        assert httpx.get(f"{base}/api/datasets").status_code == 200  # Tuneboard itself is fine
    # Cross-origin reads are blocked by the browser (no CORS headers); the writes reached the server and
    # were refused there (no CSRF token), which the empty lists above show.
    assert result["read"] == result["page"] == result["models"] == "blocked"


if __name__ == "__main__":
    main(sys.argv[1])
