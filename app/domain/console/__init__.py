"""The web console's server side, under ``/console``: for now its sessions (sign in with
a key, who is signed in, sign out, end every session of the key). Console routes are
authenticated by the session cookie, not a bearer key (``exclude_from_auth``), and the
router's :func:`app.http.sessions.same_origin` guard refuses other sites' requests; a
route that needs a signed-in user adds :func:`app.http.sessions.console_session`."""

from litestar import Router

from app.domain.console.controllers import SessionController
from app.domain.console.deps import DEPENDENCIES
from app.http.sessions import same_origin

CONSOLE = Router(path="/console", route_handlers=[SessionController], guards=[same_origin],
                 opt={"exclude_from_auth": True}, tags=["console"])
ROUTES = [CONSOLE]
__all__ = ["DEPENDENCIES", "ROUTES"]
