"""Knowledge bases and their documents: upload, status, versions, delete."""

from app.domain.knowledge.controllers import KnowledgeBaseController
from app.domain.knowledge.deps import DEPENDENCIES

ROUTES = [KnowledgeBaseController]
__all__ = ["DEPENDENCIES", "ROUTES"]
