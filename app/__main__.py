"""``python -m app`` runs the CLI."""

from app.server.cli import main

main()
