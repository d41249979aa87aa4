"""Token sign-in, CSRF protection and the refusal to listen publicly without a token."""

from __future__ import annotations

import subprocess
import sys

import pytest
from fastapi.testclient import TestClient

from app.config import PROJECT_ROOT, Settings
from app.main import create_app
from app.migrate import upgrade
from app.security import CSRF_COOKIE, SESSION_COOKIE

TOKEN = "correct-horse-battery-staple"
ALPACA = b'[{"instruction": "q", "output": "a"}]'


@pytest.fixture
def locked(tmp_path):
    settings = Settings(data_dir=tmp_path / "data", token=TOKEN)
    upgrade(settings)
    with TestClient(create_app(settings)) as client:
        yield client


def test_api_needs_the_bearer_token(locked):
    response = locked.get("/api/datasets")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert "Authorization: Bearer" in response.json()["detail"][0]["message"]
    assert locked.get("/api/datasets", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert locked.get("/api/datasets", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


def test_health_and_static_files_stay_open(locked):
    assert locked.get("/healthz").status_code == 200
    assert locked.get("/static/app.css").status_code == 200


def test_pages_redirect_to_sign_in_and_the_cookie_opens_them(locked):
    response = locked.get("/datasets?x=1", follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == "/login?next=%2Fdatasets%3Fx%3D1"

    page = locked.get("/login?next=/datasets")
    csrf = locked.cookies[CSRF_COOKIE]
    assert csrf in page.text
    assert 'aria-label="Main"' not in page.text and "Sign out" not in page.text  # nothing to reach yet
    browser = {"Origin": "http://testserver", "X-CSRF-Token": csrf, "HX-Request": "true"}
    wrong = locked.post("/login", data={"token": "nope", "next": "/datasets"}, headers=browser)
    assert wrong.status_code == 401 and "not right" in wrong.text
    assert SESSION_COOKIE not in locked.cookies

    right = locked.post("/login", data={"token": TOKEN, "next": "/datasets"}, headers=browser)
    assert right.status_code == 204 and right.headers["hx-redirect"] == "/datasets"
    assert TOKEN not in locked.cookies[SESSION_COOKIE]
    assert locked.get("/datasets").status_code == 200
    assert locked.get("/api/datasets").status_code == 200  # the browser's own API calls


OFF_SITE = [
    "//evil.example/x",
    "https://evil.example/",
    "/\\evil.example",
    "/\t/evil.example",  # browsers drop tabs and newlines: this is //evil.example
    "/\n/evil.example",
    "/\r\n/evil.example",
    " //evil.example",
    "https:evil.example",
    "javascript:alert(1)",
    "/\x00/evil.example",
]


@pytest.mark.parametrize("target", OFF_SITE)
def test_sign_in_never_redirects_off_site(locked, target):
    locked.get("/login")
    headers = {"Origin": "http://testserver", "X-CSRF-Token": locked.cookies[CSRF_COOKIE]}
    response = locked.post("/login", data={"token": TOKEN, "next": target}, headers=headers)
    assert response.headers["hx-redirect"] == "/"


@pytest.mark.parametrize("target", OFF_SITE)
def test_sign_in_page_never_links_off_site(locked, target):
    page = locked.get("/login", params={"next": target})
    assert 'name="next" value="/"' in page.text


def sign_in(client: TestClient) -> str:
    client.get("/login")
    headers = {"Origin": "http://testserver", "X-CSRF-Token": client.cookies[CSRF_COOKIE]}
    response = client.post("/login", data={"token": TOKEN}, headers=headers)
    assert response.status_code == 204
    return response.cookies[SESSION_COOKIE]


def test_each_sign_in_is_a_new_random_session_that_sign_out_ends(locked):
    first = sign_in(locked)
    locked.cookies.clear()
    second = sign_in(locked)
    assert first != second and TOKEN not in first + second
    assert locked.get("/api/datasets").status_code == 200
    headers = {"Origin": "http://testserver", "X-CSRF-Token": locked.cookies[CSRF_COOKIE]}
    assert locked.post("/logout", headers=headers).status_code == 204
    locked.cookies.set(SESSION_COOKIE, second)  # a copy of the cookie kept after sign-out opens nothing
    assert locked.get("/api/datasets").status_code == 401
    locked.cookies.set(SESSION_COOKIE, first)  # the other sign-in is still valid
    assert locked.get("/api/datasets").status_code == 200


def test_sessions_expire(tmp_path):
    from datetime import timedelta

    from sqlalchemy import update

    from app.models import BrowserSession, utcnow

    settings = Settings(data_dir=tmp_path / "data", token=TOKEN, session_hours=1)
    upgrade(settings)
    with TestClient(create_app(settings)) as client:
        sign_in(client)
        response = client.get("/api/datasets")
        assert response.status_code == 200
        with client.app.state.db.write_session() as session:
            session.execute(update(BrowserSession).values(expires_at=utcnow() - timedelta(seconds=1)))
        assert client.get("/api/datasets").status_code == 401


def test_session_cookie_lifetime_and_secure_over_https(tmp_path):
    settings = Settings(data_dir=tmp_path / "data", token=TOKEN, session_hours=12)
    upgrade(settings)
    with TestClient(create_app(settings), base_url="https://testserver") as client:
        client.get("/login")
        headers = {"Origin": "https://testserver", "X-CSRF-Token": client.cookies[CSRF_COOKIE]}
        response = client.post("/login", data={"token": TOKEN}, headers=headers)
        cookie = response.headers["set-cookie"]
        assert "Secure" in cookie and "HttpOnly" in cookie and "Max-Age=43200" in cookie
        assert "Secure" in client.get("/login", headers={"cookie": ""}).headers["set-cookie"]  # CSRF cookie


def test_failed_sign_ins_are_throttled(tmp_path):
    settings = Settings(data_dir=tmp_path / "data", token=TOKEN, login_attempts_per_minute=3)
    upgrade(settings)
    with TestClient(create_app(settings)) as client:
        client.get("/login")
        headers = {"Origin": "http://testserver", "X-CSRF-Token": client.cookies[CSRF_COOKIE]}
        codes = [
            client.post("/login", data={"token": "wrong"}, headers=headers).status_code for _ in range(3)
        ]
        assert codes == [401, 401, 401]
        refused = client.post("/login", data={"token": TOKEN}, headers=headers)  # even the right one waits
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) > 0
        assert "Too many wrong tokens" in refused.text
        assert SESSION_COOKIE not in client.cookies


def test_browser_writes_need_the_csrf_token(client):
    client.get("/datasets")
    csrf = client.cookies[CSRF_COOKIE]
    files = {"file": ("d.json", ALPACA)}
    forged = client.post("/api/datasets", files=files, headers={"Origin": "http://evil.example"})
    assert forged.status_code == 403
    assert "security token" in forged.json()["detail"][0]["message"]
    wrong = client.post(
        "/api/datasets", files=files, headers={"Sec-Fetch-Site": "cross-site", "X-CSRF-Token": "x"}
    )
    assert wrong.status_code == 403
    assert client.get("/api/datasets").json() == []
    ok = client.post(
        "/api/datasets", files=files, headers={"Origin": "http://testserver", "X-CSRF-Token": csrf}
    )
    assert ok.status_code == 201


@pytest.mark.parametrize("path", ["/leaderboard", "/api/votes/leaderboard", "/datasets", "/api/models"])
def test_other_sites_pages_cannot_make_the_browser_fetch_anything(client, path):
    """An <img>, <script>, frame or fetch on another site aimed at this server is refused before any work;
    following a link from another site (a top-level navigation) still opens the page."""
    for mode, dest in (
        ("no-cors", "image"),
        ("cors", "empty"),
        ("navigate", "iframe"),
        ("no-cors", "script"),
    ):
        headers = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": mode, "Sec-Fetch-Dest": dest}
        refused = client.get(path, headers=headers)
        assert refused.status_code == 403, (mode, dest)
        assert "does not answer what other sites" in refused.text and "open it in its own tab" in refused.text
    link = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}
    assert client.get(path, headers=link).status_code == 200
    own = {"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "cors", "Sec-Fetch-Dest": "empty"}
    assert client.get(path, headers=own).status_code == 200
    assert client.get(path).status_code == 200  # scripts and SDKs send no fetch metadata


def test_signed_in_browser_still_needs_csrf(locked):
    locked.get("/login")
    csrf = locked.cookies[CSRF_COOKIE]
    locked.post(
        "/login", data={"token": TOKEN}, headers={"Origin": "http://testserver", "X-CSRF-Token": csrf}
    )
    forged = locked.delete("/api/datasets/1", headers={"Origin": "http://evil.example"})
    assert forged.status_code == 403


def test_scripts_with_the_bearer_token_need_no_csrf(locked):
    headers = {"Authorization": f"Bearer {TOKEN}", "Origin": "http://anywhere.example"}
    response = locked.post("/api/datasets", files={"file": ("d.json", ALPACA)}, headers=headers)
    assert response.status_code == 201


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_loopback_needs_no_token(host):
    Settings(host=host).check_exposure()


def test_public_address_without_token_is_refused():
    with pytest.raises(SystemExit, match="TUNEBOARD_TOKEN"):
        Settings(host="0.0.0.0").check_exposure()
    Settings(host="0.0.0.0", token=TOKEN).check_exposure()


@pytest.mark.parametrize("blank", ["", "   ", "\t\n"])
def test_an_empty_token_is_no_token(blank):
    settings = Settings(host="0.0.0.0", token=blank)
    assert settings.token is None
    with pytest.raises(SystemExit, match="without a token"):
        settings.check_exposure()


def test_a_short_token_is_refused_at_start():
    from app.config import load_settings

    with pytest.raises(SystemExit, match="TUNEBOARD_TOKEN: too short"):
        load_settings(token="hunter2")


@pytest.mark.parametrize("module", ["app.cli worker", "worker.gen_server"])
def test_the_generation_host_follows_the_same_exposure_rule(tmp_path, module):
    result = subprocess.run(
        [sys.executable, "-m", *module.split()],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={
            "PATH": "/usr/bin:/bin",
            "TUNEBOARD_DATA_DIR": str(tmp_path),
            "TUNEBOARD_GENERATION_URL": "http://0.0.0.0:8001",
        },
    )
    assert result.returncode != 0
    assert "Refusing to start the generation host on 0.0.0.0 without a token" in result.stderr


def test_cli_refuses_public_address_without_token(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "web", "--host", "0.0.0.0", "--data-dir", str(tmp_path)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode != 0
    assert "Refusing to start Tuneboard on 0.0.0.0 without a token" in result.stderr
