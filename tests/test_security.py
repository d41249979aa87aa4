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


@pytest.mark.parametrize("target", ["//evil.example/x", "https://evil.example/", "/\\evil.example"])
def test_sign_in_never_redirects_off_site(locked, target):
    locked.get("/login")
    headers = {"Origin": "http://testserver", "X-CSRF-Token": locked.cookies[CSRF_COOKIE]}
    response = locked.post("/login", data={"token": TOKEN, "next": target}, headers=headers)
    assert response.headers["hx-redirect"] == "/"


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
    assert "Refusing to listen on 0.0.0.0 without a token" in result.stderr
