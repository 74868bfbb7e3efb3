"""Fair, budgeted ingestion: a per-tenant monthly quota on embedding tokens (``NULL`` =
the tier's default), and an index that lets the outbox relay and the stuck-document
sweeper find a document's outbox message without scanning the outbox.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("tenants", sa.Column("monthly_embedding_tokens", sa.BigInteger,
                                       nullable=True))
    op.create_index("ix_outbox_document", "outbox", [sa.text("(args ->> 'document_id')")])
    op.create_index("ix_usage_events_kind_time", "usage_events",
                    ["tenant_id", "kind", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_usage_events_kind_time", "usage_events")
    op.drop_index("ix_outbox_document", "outbox")
    op.drop_column("tenants", "monthly_embedding_tokens")
