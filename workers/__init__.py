"""Dramatiq broker setup and thin actors that call the service core."""
