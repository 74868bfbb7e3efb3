"""The audit log: admin actions and key operations, recorded with the change itself."""
