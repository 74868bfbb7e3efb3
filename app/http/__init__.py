"""The HTTP toolkit the domain areas build on: guards, problem documents, paging, CORS,
bearer authentication, request context and OpenAPI helpers. It knows no domain area."""
