"""What a tenant key can read about its own tenant."""
