"""Usage reports: a tenant's own and the operator's, as JSON or CSV, and the quarantine."""
