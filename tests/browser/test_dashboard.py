"""The swarm dashboard in headless Chromium (Playwright driving Debian's /usr/bin/chromium).

`potluck dashboard` is started without a model: it finds the model through the servers' announcements.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from potluck.cli.local_swarm import LocalSwarm

pytestmark = pytest.mark.swarm

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SPANS = {"alpha": (0, 3), "beta": (3, 6), "gamma": (6, 8)}


@pytest.fixture(scope="module")
def dashboard(tiny_model_dir: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    ckpt = tiny_model_dir("llama-tied")
    with LocalSwarm(tmp_path_factory.mktemp("dashboard-logs")) as swarm:
        peers = swarm.start_bootstrap()
        # short announcement period: a killed server's records expire within seconds
        servers = {
            name: swarm.start_server(ckpt, span, name=name, wait=False,
                                     extra_args=["--public-name", name, "--update-period", "1"])
            for name, span in SPANS.items()
        }  # fmt: skip
        swarm.wait_ready(list(servers.values()))
        ui = swarm.start_process(
            "dashboard", ["dashboard", "--initial-peers", *peers, "--port", "0", "--refresh", "1"]
        )
        yield {"swarm": swarm, "servers": servers, "url": str(ui.info["url"])}


@pytest.fixture
def page() -> Iterator[Any]:
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": 1400, "height": 900})
        finally:
            browser.close()


def test_dashboard_shows_every_server_and_follows_a_kill(
    dashboard: dict[str, Any], page: Any, tmp_path: Path
) -> None:
    servers = dashboard["servers"]
    page.goto(dashboard["url"] + "/")
    rows = page.locator("table.servers tr.server")
    page.wait_for_function(
        "document.querySelectorAll('table.servers tr.server').length === 3", timeout=30_000
    )
    for name, proc in servers.items():
        row = page.locator(f'table.servers tr.server[data-peer-id="{proc.peer_id}"]')
        text = row.inner_text()
        start, end = SPANS[name]
        assert name in text and f"{start}:{end}" in text and "online" in text
        # its row of the block map colours exactly its blocks
        held = page.locator(f'table.map tr[data-peer-id="{proc.peer_id}"] span.cell.online')
        assert held.count() == end - start
    assert "all blocks served" in page.inner_text("main")
    before = tmp_path / "dashboard-3-servers.png"
    page.screenshot(path=str(before), full_page=True)

    dashboard["swarm"].kill(servers["gamma"])  # SIGKILL: no goodbye, its records just stop being refreshed
    page.wait_for_function(
        "document.querySelectorAll('table.servers tr.server').length === 2", timeout=30_000
    )
    assert rows.count() == 2
    assert page.locator(f'tr.server[data-peer-id="{servers["gamma"].peer_id}"]').count() == 0
    assert "missing blocks: 6, 7" in page.inner_text("main")
    after = tmp_path / "dashboard-after-kill.png"
    page.screenshot(path=str(after), full_page=True)
    assert before.stat().st_size > 10_000 and after.stat().st_size > 10_000


def test_swarm_json(dashboard: dict[str, Any]) -> None:
    report = httpx.get(dashboard["url"] + "/api/v1/swarm", timeout=10).json()
    (model,) = report["models"]
    assert model["num_blocks"] == 8
    for server in model["servers"]:
        assert {
            "name",
            "start",
            "end",
            "throughput",
            "cache_tokens_left",
            "version",
            "adapters",
        } <= server.keys()
        assert server["announced_ago_s"] is not None and server["announced_ago_s"] < 30
