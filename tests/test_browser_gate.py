"""The browser suite never disappears silently: without Chromium it is skipped with a banner, and with
REQUIRE_BROWSER=1 (scripts/test.sh sets it) the missing browser fails the run."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_browser_suite(**env) -> subprocess.CompletedProcess:
    env = {**os.environ, "LORA_STUDIO_CHROMIUM": "/nonexistent/chromium", **env}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                           "tests/test_app_browser.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_missing_browser_is_a_loud_skip_or_with_require_browser_a_failure():
    skipped = _run_browser_suite(REQUIRE_BROWSER="0")
    assert skipped.returncode == 0 and "BROWSER SUITE SKIPPED" in skipped.stdout, skipped.stdout[-2000:]
    required = _run_browser_suite(REQUIRE_BROWSER="1")
    assert required.returncode != 0 and "REQUIRE_BROWSER=1 but" in required.stdout, required.stdout[-2000:]


def test_the_test_command_requires_the_browser():
    assert 'REQUIRE_BROWSER="${REQUIRE_BROWSER:-1}"' in open(os.path.join(ROOT, "scripts", "test.sh")).read()
