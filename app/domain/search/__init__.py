"""Search over the tenant's live documents (hybrid dense + BM25)."""

from app.domain.search.controllers import retrieve
from app.domain.search.deps import DEPENDENCIES

ROUTES = [retrieve]
__all__ = ["DEPENDENCIES", "ROUTES"]
