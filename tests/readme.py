"""README.md as tests read it: its bash blocks, whole or by section, so every test runs the text people copy."""

from __future__ import annotations

import re
from pathlib import Path

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def bash_blocks(text: str = README) -> list[str]:
    """The contents of each ```bash block in `text`, in order."""
    return re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL)


def section(heading: str) -> str:
    """README from `heading` to its end (blocks further down follow it)."""
    return README[README.index(heading) :]


def first_screen() -> str:
    """README up to its first `## ` heading: what a newcomer sees first."""
    return README[: README.index("\n## ")]


def commands(blocks: list[str] | None = None) -> list[str]:
    """Every command line in `blocks` (default: all of README's), continuation lines joined, comments dropped."""
    found = []
    for block in bash_blocks() if blocks is None else blocks:
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                found.append(line)
    return found
