"""A tenant's content rules: a blocklist on the user's input and the model's output, and
an optional disclaimer."""

from app.domain.content_rules.controllers import (
    get_content_rules,
    list_content_rule_hits,
    put_content_rules,
)
from app.domain.content_rules.deps import DEPENDENCIES

ROUTES = [get_content_rules, put_content_rules, list_content_rule_hits]
__all__ = ["DEPENDENCIES", "ROUTES"]
