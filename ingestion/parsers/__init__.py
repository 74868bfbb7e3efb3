"""One module per format: bytes -> `ParsedDocument`."""
