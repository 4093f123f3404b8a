"""Progress bars: drawn on a terminal, silent in logs and CI, one rule for every command."""

import io

from phonetune.data.progress import progress_bar


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_bar_is_drawn_on_a_terminal_only(monkeypatch):
    for stream, drawn in ((Terminal(), True), (io.StringIO(), False)):
        monkeypatch.setattr("sys.stderr", stream)
        with progress_bar(10, "evaluate", "clip") as bar:
            bar.update(10)
        shown = stream.getvalue()
        assert ("evaluate" in shown and "10/10" in shown and "clip/s" in shown) == drawn, shown


def test_nothing_is_drawn_when_asked_not_to_or_with_nothing_to_do(monkeypatch):
    stream = Terminal()
    monkeypatch.setattr("sys.stderr", stream)
    for total, show in ((10, False), (0, True)):
        with progress_bar(total, "dev", "clip", show=show) as bar:
            bar.update(total)
    assert stream.getvalue() == ""
