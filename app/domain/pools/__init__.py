"""The operator's view of the generation pools (``GET /admin/pools``)."""

from app.domain.pools.controllers import list_pools
from app.domain.pools.deps import DEPENDENCIES

ROUTES = [list_pools]
__all__ = ["DEPENDENCIES", "ROUTES"]
