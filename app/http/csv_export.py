"""CSV exports that a spreadsheet opens as data, never as formulas.

Excel, LibreOffice and Google Sheets run a cell that starts with ``=``, ``+``, ``-`` or
``@`` (and, after a leading tab or carriage return, what follows) as a formula: an end
user named ``=HYPERLINK(...)`` in a usage export would be a link, or worse, on the
operator's machine. Following OWASP's advice on CSV injection, every such text cell is
prefixed with a single quote, which spreadsheets show as text. Numbers are written as
numbers (a negative count or cost is not a formula), so numeric columns stay numeric.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from typing import Any

from litestar import Response

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def neutralised(cell: object) -> object:
    """A text cell a spreadsheet would execute, quoted as text; anything else as it is."""
    if isinstance(cell, str) and cell.startswith(FORMULA_STARTS):
        return "'" + cell
    return cell


def csv_text(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """The header and rows as CSV, every text cell neutralised."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([neutralised(h) for h in header])
    writer.writerows([neutralised(cell) for cell in row] for row in rows)
    return out.getvalue()


def csv_response(header: Sequence[str], rows: Iterable[Sequence[object]],
                 filename: str) -> Response[Any]:
    """A CSV download (``text/csv``, as an attachment named ``filename``)."""
    return Response(csv_text(header, rows), media_type="text/csv", headers={
        "Content-Disposition": f'attachment; filename="{filename}"'})
