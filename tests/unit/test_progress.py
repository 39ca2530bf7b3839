"""The publishing progress line of `zerocopy serve`."""

from __future__ import annotations

import io

import pytest

from zerocopy_runtime.local_serve import ProgressLine

pytestmark = pytest.mark.unit

MIB = 2**20


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_one_line_per_tenth_and_the_last() -> None:
    out = io.StringIO()
    show = ProgressLine(out)
    for done in range(0, 101 * MIB, MIB):
        show(done, 100 * MIB)
    lines = out.getvalue().splitlines()
    assert [line.split("(")[1].split("%")[0] for line in lines] == [str(p) for p in range(0, 101, 10)]
    assert lines[-1].startswith("  100.0 MiB of 100.0 MiB in the object store (100%")
    assert "\r" not in out.getvalue()


def test_a_terminal_gets_one_line_redrawn_in_place() -> None:
    out = _Terminal()
    show = ProgressLine(out)
    show(0, 0)  # size not known yet: nothing to show
    for done in (MIB, MIB, 50 * MIB, 100 * MIB):
        show(done, 100 * MIB)
    text = out.getvalue()
    assert text.count("\r") == 3  # the repeated 1% is not redrawn
    assert text.endswith("\n")
    assert text.count("\n") == 1
