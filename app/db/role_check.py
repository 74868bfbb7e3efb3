"""Start-up check of the role the API and workers connect as.

Row-level security is the tenants' last wall, and PostgreSQL lets three kinds of role
walk through it: a superuser, a role with BYPASSRLS, and the owner of the tables (FORCE
aside, an owner can simply turn RLS off). A process that connects as any of them, or as
a role that can become one (``SET ROLE`` to a role it is a member of), refuses to start,
naming what is wrong, instead of serving every tenant's rows to every tenant.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

# One round trip: the current role's own flags, other roles it may SET ROLE to that are
# superusers or bypass RLS, and the row-secured tables it owns or may act as owner of.
_ROLE_QUERY = text("""
SELECT me.rolname::text AS role, me.rolsuper AS superuser, me.rolbypassrls AS bypassrls,
  ARRAY(SELECT r.rolname::text || CASE WHEN r.rolsuper THEN ' (superuser)'
                                       ELSE ' (BYPASSRLS)' END
        FROM pg_roles r
        WHERE (r.rolsuper OR r.rolbypassrls) AND r.oid <> me.oid
          AND pg_has_role(me.oid, r.oid, 'MEMBER')
        ORDER BY r.rolname) AS reachable,
  ARRAY(SELECT c.relname::text FROM pg_class c
        WHERE c.relkind IN ('r', 'p') AND c.relrowsecurity
          AND c.relnamespace = 'public'::regnamespace
          AND pg_has_role(me.oid, c.relowner, 'MEMBER')
        ORDER BY c.relname) AS owned
FROM pg_roles me WHERE me.rolname = current_user
""")


class UnsafeDatabaseRoleError(RuntimeError):
    """The process's database role could bypass row-level security; it must not start."""


@dataclass(frozen=True)
class RoleFinding:
    """What the connected role is and what, of concern, it holds."""

    role: str
    superuser: bool
    bypassrls: bool
    reachable: list[str]  # other roles it may SET ROLE to that ignore RLS
    owned: list[str]  # row-secured tables it (or a role it may become) owns

    def problems(self) -> list[str]:
        """Each reason this role must not serve requests, in words."""
        if self.superuser:
            return ["it is a superuser"]  # a superuser is a member of every role: enough
        found = ["it has BYPASSRLS"] if self.bypassrls else []
        if self.reachable:
            found.append(f"it may SET ROLE to {', '.join(self.reachable)}")
        if self.owned:
            shown = ", ".join(self.owned[:6]) + (", ..." if len(self.owned) > 6 else "")
            found.append(f"it owns the tenant tables ({shown})")
        return found


async def inspect_role(engine: AsyncEngine) -> RoleFinding:
    """The connected role and what it could use to bypass row-level security."""
    async with engine.connect() as conn:
        row = (await conn.execute(_ROLE_QUERY)).one()
    return RoleFinding(role=row.role, superuser=row.superuser, bypassrls=row.bypassrls,
                       reachable=list(row.reachable), owned=list(row.owned))


async def refuse_privileged_role(engine: AsyncEngine, process: str) -> None:
    """Raise :class:`UnsafeDatabaseRoleError` if ``engine`` connects as a role to which
    row-level security does not apply; ``process`` names who is starting."""
    finding = await inspect_role(engine)
    problems = finding.problems()
    if problems:
        raise UnsafeDatabaseRoleError(
            f"the {process} refuses to start: its database role {finding.role!r} would "
            f"bypass row-level security ({'; '.join(problems)}). Connect it as the "
            "application role (DATABASE_APP_URL, or DATABASE_APP_ROLE and "
            "DATABASE_APP_PASSWORD, as created by `tenantrag migrate`); the owner's "
            "DATABASE_URL is for the migration alone."
        )
