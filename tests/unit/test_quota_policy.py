"""Quota policy without services: every tier has a default for every quota, every
admission limit is set by a tenant column, a tenant's own number wins over its tier's,
and a window limit declared on ``Limits`` becomes a row of the admission script."""

from __future__ import annotations

import uuid
from dataclasses import fields
from typing import get_args

from app.db.models import Tenant, Tier
from app.quotas.limiter import Limits, RateLimiter
from app.quotas.policy import LIMIT_COLUMNS, TIER_DEFAULTS, QuotaField, limits_for, output_cap
from app.quotas.scripts import PERIOD, WINDOW_S, windows_of


def test_every_tier_has_a_default_for_every_quota_and_every_limit_a_column() -> None:
    for tier in Tier:
        assert set(TIER_DEFAULTS[tier]) == set(get_args(QuotaField)), tier
    assert set(LIMIT_COLUMNS) == {f.name for f in fields(Limits)}
    assert set(LIMIT_COLUMNS.values()) <= set(Tenant.model_fields)


def test_a_null_column_takes_the_tier_default_and_the_tenants_own_number_wins() -> None:
    free = Tenant(slug="a", name="A", tier=Tier.free)
    assert limits_for(free) == Limits(rpm=20, tpm=20_000, concurrency=2,
                                      budget=1_000_000, monthly_calls=10_000)
    assert output_cap(free) == 512
    assert limits_for(Tenant(slug="p", name="P", tier=Tier.pro)).monthly_calls == 500_000
    assert limits_for(Tenant(slug="e", name="E", tier=Tier.enterprise)) == Limits()
    own = Tenant(slug="o", name="O", tier=Tier.free, monthly_call_limit=7, user_rpm_limit=3,
                 max_output_tokens=100)
    assert limits_for(own).monthly_calls == 7 and limits_for(own).user_rpm == 3
    assert output_cap(own) == 100


def test_window_limits_are_the_annotated_fields_in_order() -> None:
    table = dict(windows_of(Limits))
    assert list(table) == ["rpm", "tpm", "user_rpm", "user_tpm", "monthly_calls"]
    assert table["monthly_calls"].span_s == PERIOD and not table["monthly_calls"].tokens
    assert table["tpm"].span_s == WINDOW_S and table["tpm"].tokens


def test_a_request_gets_a_row_per_window_limit_that_applies() -> None:
    limiter = RateLimiter(None)  # type: ignore[arg-type]  # no Redis: rows are data
    tenant = uuid.uuid4()
    rows = limiter.applied(tenant, "", "2026-05", Limits(rpm=5, user_rpm=2, monthly_calls=9))
    assert [(r.window.name, r.limit) for r in rows] == [("requests", 5), ("monthly_calls", 9)]
    assert rows[1].key == f"q:{{{tenant}}}:calls:2026-05"  # the month names its counter
    rows = limiter.applied(tenant, "ann", "2026-05", Limits(user_rpm=2))
    assert [r.key for r in rows] == [f"q:{{{tenant}}}:u:ann:rpm"]
