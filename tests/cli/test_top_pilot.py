"""``weavelet top`` through Textual's headless pilot, against real runs (WeaveletProcesses on a file:// store)."""

from __future__ import annotations

import pytest

pytest.importorskip("textual")

from textual.widgets import DataTable, Static

from tests.cli.conftest import Trainer
from weavelet_core import AsyncWeaver
from weavelet_core.tui.app import TopApp

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _settle(pilot: object, app: TopApp, rows: int) -> None:
    for _ in range(100):
        await pilot.pause(0.05)  # type: ignore[attr-defined]
        if len(app.rows) == rows and all(r["state"] == "running" for r in app.rows):
            return
    raise AssertionError(f"the dashboard shows {app.rows}")


async def test_top_shows_runs_details_and_acts_after_confirmation(trainer: Trainer, store: str) -> None:
    trainer("pilot-a", step=11, loss=0.4, labels={"sweep": "1"})
    trainer("pilot-b", step=22, loss=0.2)
    async with AsyncWeaver(store) as weaver:
        await weaver.set("pilot-a", {"lr": 0.1})
    app = TopApp(store, interval=0.2)
    async with app.run_test(size=(200, 50)) as pilot:
        await _settle(pilot, app, 2)
        table = app.query_one("#runs", DataTable)
        assert table.row_count == 2
        first = [str(c) for c in table.get_row_at(0)]
        assert first[:2] == ["pilot-a", "running"]
        assert first[3] == "11"
        assert first[4] == "0.4"
        assert first[7] == "sgd"

        await pilot.press("enter")
        await pilot.pause(0.3)
        detail = str(app.query_one("#detail", Static).render())
        assert "run         pilot-a" in detail
        assert "labels      sweep=1" in detail
        assert "lr=" in detail  # the history below the status

        # Stop, declined: nothing written.
        await pilot.press("x")
        await pilot.press("n")
        await pilot.pause(0.2)
        async with AsyncWeaver(store) as weaver:
            before = await weaver.get("pilot-a")
            assert before is not None
            assert "stop" not in before.config

        # Stop, confirmed: a token for the live incarnation.
        await pilot.press("x")
        await pilot.press("y")
        for _ in range(50):
            await pilot.pause(0.1)
            async with AsyncWeaver(store) as weaver:
                current = await weaver.get("pilot-a")
                status = await weaver.status("pilot-a")
            if current is not None and "stop" in current.config:
                break
        assert current is not None
        assert status is not None
        assert current.config["stop"]["incarnation"] == status.incarnation

        # Set a value, confirmed.
        await pilot.press("s")
        await pilot.press(*"lr=0.5")
        await pilot.press("enter")
        await pilot.press("y")
        await pilot.pause(0.5)
        async with AsyncWeaver(store) as weaver:
            current = await weaver.get("pilot-a")
        assert current is not None
        assert current.config["lr"] == 0.5

        # Revert to revision 2 (lr=0.1), confirmed.
        await pilot.press("r")
        await pilot.press("2")
        await pilot.press("enter")
        await pilot.press("y")
        await pilot.pause(0.5)
        async with AsyncWeaver(store) as weaver:
            current = await weaver.get("pilot-a")
        assert current is not None
        assert current.config["lr"] == 0.1
        assert current.reverts == 2
        await pilot.press("q")
