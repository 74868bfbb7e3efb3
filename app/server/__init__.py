"""The composition root: the app factory and its lifespan, the server launchers and the CLI.

The only package that may import everything below it (domain areas, the HTTP toolkit,
quotas, inference, the database, ``workers`` and the dev stack); nothing imports it.
"""
