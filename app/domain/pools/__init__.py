"""The operator's view of the generation pools (``GET /admin/pools``)."""
