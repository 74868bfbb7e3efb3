"""HTTP layer: app factory, auth middleware, error mapping, controllers."""
