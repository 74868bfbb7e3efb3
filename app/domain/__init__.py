"""Business areas, one folder each: schemas, services, controllers."""
