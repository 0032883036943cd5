"""Tables on stdout that survive a pipe: rich on a terminal (first column never cut), markdown anywhere else."""

from rich.box import SIMPLE
from rich.console import Console
from rich.table import Table
from rich.text import Text


def print_table(title: str, columns: list[str], rows: list[list[str]], styles: list[list[str]] | None = None,
                align: str = "right", console: Console | None = None) -> None:
    """Plain-text `rows` under `columns`, with rich `styles` per cell on a terminal. The first column is the label
    (a method name, a layer) and is never cut; the others are aligned by `align`."""
    console = console or Console()
    if not console.is_terminal:
        cell = lambda text: text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "\\n")
        lines = [title, "", "| " + " | ".join(columns) + " |",
                 "|" + "|".join("---" if i == 0 or align == "left" else "---:" for i in range(len(columns))) + "|"]
        lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
        console.file.write("\n".join(lines) + "\n")
        console.file.flush()
        return
    table = Table(title=title, box=SIMPLE, min_width=len(title) + 2)
    table.add_column(columns[0], no_wrap=True, min_width=max(len(r[0]) for r in [columns, *rows]))
    for name in columns[1:]:
        table.add_column(name, justify=align)
    for i, row in enumerate(rows):
        table.add_row(*(Text(c, style=styles[i][j] if styles else "") for j, c in enumerate(row)))
    console.print(table)
