"""Database access: tables, engines and tenant-scoped transactions."""
