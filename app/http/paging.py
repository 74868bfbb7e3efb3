"""Query parameters the list routes share."""

from __future__ import annotations

from typing import Annotated

from litestar.params import QueryParameter

# PostgreSQL's OFFSET is a bigint: past it, a 400 here rather than a database error.
Offset = Annotated[int, QueryParameter(ge=0, le=2**63 - 1, description="Rows to skip")]
