"""A tenant's content rules: a blocklist on the user's input and the model's output, and
an optional disclaimer."""
