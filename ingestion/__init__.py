"""Pure document processing: bytes -> structured text -> chunks with offsets."""
