"""The main job (`llmesh demo`) against the running test mesh: every call goes through
the gateway with a key the demo creates, and the masked prompt is what the model saw."""

from __future__ import annotations

import json
import subprocess
import sys

from llmesh.demo.models import faq_pairs
from tests.support.mesh import Mesh


def test_demo_goes_through_the_gateway_and_shows_the_masked_prompt(mesh: Mesh) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "llmesh.cli", "demo", "--config", str(mesh.config_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    print(text)
    saw = next(line for line in text.splitlines() if line.startswith("the model saw:"))
    assert "<PHONE_1>" in saw and "<EMAIL_1>" in saw and "13812348000" not in saw
    key = json.loads((mesh.cfg.home / "demo" / "api-key.json").read_text())
    assert (mesh.cfg.home / "demo" / "api-key.json").stat().st_mode & 0o777 == 0o600
    assert key["key_id"] in text and key["secret"] not in text
    assert "chain intact: True" in text
    assert "Chat" in text and "cn_mobile=1" in text  # the audit lines of the demo's own calls
    # The FAQ adapter was trained, published and answers the FAQ; the base model does not.
    assert "promoted it to faq@live" in text
    answer = faq_pairs()[1]["answer"]
    lines = text.splitlines()
    tuned = next(line for line in lines if line.strip().startswith("adapter faq:"))
    base = next(line for line in lines if line.strip().startswith("base model:"))
    assert answer[:40] in tuned and answer[:40] not in base
    # A second run reuses the stored key and the live adapter.
    again = subprocess.run(
        [sys.executable, "-m", "llmesh.cli", "demo", "--config", str(mesh.config_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (
        again.returncode == 0 and key["key_id"] in again.stdout and "already trained and live: faq@v1" in again.stdout
    )
