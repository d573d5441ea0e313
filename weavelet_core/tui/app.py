"""The Textual application behind ``weavelet top`` (``pip install "weavelet[tui]"``).

A table of every run, refreshed every ``interval`` seconds from one run listing and two batched reads (the
transport interface has no status watch, so the table polls; a write made from the dashboard refreshes it at
once). Enter shows the selected run's status and history below the table. ``s`` sets values, ``x`` stops,
``c`` checkpoints and ``r`` reverts the selected run, each after a confirmation; ``q`` quits.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, ClassVar

from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, DataTable, Footer, Header, Input, Label, Static

from weavelet_core.cli import output
from weavelet_core.cli.common import CliError, is_stale, unreachable_reason
from weavelet_core.cli.read import history_rows, status_lines
from weavelet_core.cli.top import COLUMNS, LossTrend, cells, snapshot
from weavelet_core.cli.values import check_merge, parse_assignments
from weavelet_core.errors import CorruptEntry, WeaveletError
from weavelet_core.protocol import Revision
from weavelet_core.weaver import AsyncWeaver

STALE_COLUMN = COLUMNS.index("HEARTBEAT")


class Confirm(ModalScreen[bool]):
    """``question`` with Yes (``y``) and No (``n``, Escape)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "answer(True)", "yes"),
        Binding("n", "answer(False)", "no"),
        Binding("escape", "answer(False)", "no"),
    ]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(self.question, id="question")
            yield Button("Yes (y)", id="yes", variant="primary")
            yield Button("No (n)", id="no")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


class Ask(ModalScreen[str | None]):
    """A one-line prompt; Enter submits, Escape cancels."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "cancel")]

    def __init__(self, prompt: str, placeholder: str = "") -> None:
        super().__init__()
        self.prompt = prompt
        self.placeholder = placeholder

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(self.prompt)
            yield Input(placeholder=self.placeholder, id="answer")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)

    def action_cancel(self) -> None:
        self.dismiss(None)


class TopApp(App[None]):
    """``weavelet top``: every run of the transport at ``url``."""

    TITLE = "weavelet top"
    CSS = """
    #runs { height: 1fr; }
    #detail { height: auto; max-height: 50%; border-top: solid $accent; padding: 0 1; }
    #dialog { width: 80; height: auto; border: thick $accent; background: $surface; padding: 1 2; }
    Confirm, Ask { align: center middle; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "quit"),
        Binding("enter", "show", "details", show=True),
        Binding("s", "set", "set"),
        Binding("x", "stop", "stop"),
        Binding("c", "checkpoint", "checkpoint"),
        Binding("r", "revert", "revert"),
        Binding("escape", "hide", "hide details", show=False),
    ]

    def __init__(self, url: str, *, interval: float = 1.0, stale_after: float | None = None) -> None:
        super().__init__()
        self.url = url
        self.interval = interval
        self.stale_after = stale_after
        self.trend = LossTrend()
        self.rows: list[dict[str, Any]] = []
        self.weaver: AsyncWeaver | None = None
        self.shown: str | None = None
        self.last_message = ""

    def compose(self) -> ComposeResult:
        yield Header()
        yield DataTable(id="runs", cursor_type="row", zebra_stripes=True)
        yield Static("", id="detail")
        yield Footer()

    async def on_mount(self) -> None:
        self.sub_title = output.cut(self.url, 80)
        table = self.query_one("#runs", DataTable)
        table.add_columns(*COLUMNS)
        self.weaver = AsyncWeaver(self.url)
        await self.weaver.__aenter__()
        await self.refresh_runs()
        self.set_interval(self.interval, self.refresh_runs)

    async def on_unmount(self) -> None:
        if self.weaver is not None:
            await self.weaver.aclose()

    # -- the table -----------------------------------------------------------------------------------------

    async def refresh_runs(self) -> None:
        """Read every run and redraw the table, keeping the selected row."""
        assert self.weaver is not None
        try:
            rows = await snapshot(self.weaver, self.stale_after)
        except WeaveletError as exc:
            self.sub_title = f"{output.cut(self.url, 60)}: {exc}"
            return
        self.rows = rows
        now = time.time()
        table = self.query_one("#runs", DataTable)
        selected = self.selected_run()
        table.clear()
        for row in rows:
            self.trend.add(row)
            text = cells(row, self.trend, now)
            styled = [
                Text(c, style="bold red" if i == STALE_COLUMN and row["stale"] else "") for i, c in enumerate(text)
            ]
            table.add_row(*styled, key=row["run"])
        if selected is not None:
            for index, row in enumerate(rows):
                if row["run"] == selected:
                    table.move_cursor(row=index)
        if self.shown is not None:
            await self.show_detail(self.shown)

    def selected_run(self) -> str | None:
        table = self.query_one("#runs", DataTable)
        if not self.rows or table.cursor_row is None or not 0 <= table.cursor_row < len(self.rows):
            return None
        run: str = self.rows[table.cursor_row]["run"]
        return run

    # -- the detail pane -----------------------------------------------------------------------------------

    async def show_detail(self, run: str) -> None:
        assert self.weaver is not None
        lines: list[str] = []
        status = await self.weaver.status(run)
        desired: Revision | None = None
        unreadable: CorruptEntry | None = None
        try:
            desired = await self.weaver.get(run)
        except CorruptEntry as exc:
            unreadable = exc
        now = time.time()
        if status is not None:
            lines += status_lines(status, desired, unreadable, is_stale(status, self.stale_after, now), now)
        else:
            lines.append(f"run {run}: no status reported yet")
        entries = await self.weaver.history(run, limit=8)
        outcomes: dict[int, list[Any]] = {}
        for outcome in await self.weaver.outcomes(run):
            outcomes.setdefault(outcome.revision, []).append(outcome)
        table: list[tuple[str, ...]] = [("REV", "WRITTEN", "AUTHOR", "INCARNATION", "OUTCOME", "CHANGES")]
        previous: dict[str, Any] | None = None
        for index, entry in enumerate(entries):
            known = index > 0 or entry.revision == 1
            table += history_rows(entry, previous, outcomes.get(entry.revision, []), known, False)
            previous = entry.config if isinstance(entry, Revision) else None
        if entries:
            lines.append("")
            lines += _table_lines(table)
        if self.last_message:
            lines += ["", self.last_message]
        self.shown = run
        self.query_one("#detail", Static).update(Text("\n".join(lines)))

    async def action_show(self) -> None:
        run = self.selected_run()
        if run is not None:
            await self.show_detail(run)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        run = event.row_key.value
        if run is not None:
            self.run_worker(self.show_detail(str(run)), exclusive=True, group="detail")

    def action_hide(self) -> None:
        self.shown = None
        self.query_one("#detail", Static).update("")

    # -- actions -------------------------------------------------------------------------------------------

    def _confirmed(self, question: str, act: Callable[[], Any]) -> None:
        def done(yes: bool | None) -> None:
            if yes:
                self.run_worker(self._do(act), exclusive=False, group="act")
            else:
                self.say("cancelled")

        self.push_screen(Confirm(question), done)

    async def _do(self, act: Callable[[], Any]) -> None:
        try:
            message = await act()
        except (WeaveletError, ValueError) as exc:
            self.say(f"error: {exc}", error=True)
        else:
            self.say(str(message))
        await self.refresh_runs()

    async def _reachable(self, run: str) -> None:
        """Refuse a write the run's live trainer would ignore (see
        :func:`~weavelet_core.cli.common.unreachable_reason`)."""
        assert self.weaver is not None
        reason = await unreachable_reason(self.weaver, run)
        if reason is not None:
            raise CliError(reason)

    def say(self, message: str, *, error: bool = False) -> None:
        self.last_message = message
        self.notify(message, severity="error" if error else "information")

    def action_set(self) -> None:
        run = self.selected_run()
        if run is None:
            return

        def asked(text: str | None) -> None:
            if not text:
                return
            try:
                changes = parse_assignments(text.split())
            except WeaveletError as exc:
                self.say(f"error: {exc}", error=True)
                return

            async def act() -> str:
                assert self.weaver is not None
                await self._reachable(run)
                current = await self.weaver.get(run)
                if current is not None:
                    check_merge(current.config, changes)
                revision = await self.weaver.set(run, changes)
                return f"{run}: revision {revision.revision} stored ({text})"

            self._confirmed(f"Set {text} on run {run}?", act)

        self.push_screen(Ask(f"Set on {run} (KEY=VALUE ...):", "lr=0.001"), asked)

    def _command(self, name: str) -> None:
        run = self.selected_run()
        if run is None:
            return

        async def act() -> str:
            assert self.weaver is not None
            await self._reachable(run)
            revision = await self.weaver.command(run, name)
            assert isinstance(revision, Revision)
            return f"{run}: {name} sent as revision {revision.revision}"

        self._confirmed(f"Send {name} to run {run}?", act)

    def action_stop(self) -> None:
        self._command("stop")

    def action_checkpoint(self) -> None:
        self._command("checkpoint")

    def action_revert(self) -> None:
        run = self.selected_run()
        if run is None:
            return

        def asked(text: str | None) -> None:
            if not text:
                return
            try:
                number = int(text.lstrip("rR"))
            except ValueError:
                self.say(f"error: {text!r} is not a revision number", error=True)
                return

            async def act() -> str:
                assert self.weaver is not None
                await self._reachable(run)
                revision = await self.weaver.revert(run, number)
                assert isinstance(revision, Revision)
                return f"{run}: revision {revision.revision} stored (revert of r{number})"

            self._confirmed(f"Revert run {run} to revision {number}'s config?", act)

        self.push_screen(Ask(f"Revert {run} to revision:", "3"), asked)


def _table_lines(rows: list[tuple[str, ...]]) -> list[str]:
    import io

    buffer = io.StringIO()
    output.print_table(rows, buffer, width=200)
    return buffer.getvalue().splitlines()
