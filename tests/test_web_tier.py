"""The web process stays light: importing and serving pages never imports torch."""

from __future__ import annotations

import subprocess
import sys

from app.config import PROJECT_ROOT

SCRIPT = """
import sys
from fastapi.testclient import TestClient
from app.config import Settings
from app.main import create_app
from app.migrate import upgrade

settings = Settings(data_dir=sys.argv[1])
upgrade(settings)
with TestClient(create_app(settings)) as client:
    model = client.post("/api/models", json={"path": sys.argv[2]}).json()["id"]
    with open(sys.argv[3], "rb") as f:
        dataset = client.post("/api/datasets", files={"file": ("d.json", f.read())}).json()["id"]
    pages = ["/datasets", f"/datasets/{dataset}?model={model}", "/models"]
    for path in pages + [f"/api/datasets/{dataset}/stats?model={model}"]:
        assert client.get(path).status_code == 200, path
heavy = sorted(m for m in ("torch", "peft", "accelerate", "transformers.modeling_utils") if m in sys.modules)
print(",".join(heavy) or "none")
"""


def test_serving_pages_and_statistics_never_imports_torch(tmp_path, tiny_model_dir):
    from tests.conftest import DEMO_DATASET

    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "data"), str(tiny_model_dir), str(DEMO_DATASET)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "none"
