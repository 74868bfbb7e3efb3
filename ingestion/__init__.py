"""Pure document processing: bytes -> structured text -> chunks with offsets.

``detect_format`` -> ``parse_document`` -> ``chunk_document``; no DB, no network.
Untrusted files go through `IsolatedParser` (a child process per file, bounded in time
and memory) instead of ``parse_document`` directly.
"""

from ingestion.chunk import DEFAULT_CHUNKING, Chunk, ChunkingConfig, chunk_document
from ingestion.detect import detect_format
from ingestion.document import Format, ParsedDocument, Section
from ingestion.errors import (
    CorruptDocumentError,
    EmptyDocumentError,
    IngestionError,
    UnsafeDocumentError,
    UnsupportedFormatError,
)
from ingestion.instructions import instruction_reasons
from ingestion.isolated import IsolatedParser, ProcessLimits
from ingestion.limits import DEFAULT_LIMITS, ParseLimits
from ingestion.parse import parse_document
from ingestion.tokens import TokenCounter, TokenizerCounter, load_token_counter

__all__ = [
    "DEFAULT_CHUNKING",
    "DEFAULT_LIMITS",
    "Chunk",
    "ChunkingConfig",
    "CorruptDocumentError",
    "EmptyDocumentError",
    "Format",
    "IngestionError",
    "IsolatedParser",
    "ParseLimits",
    "ParsedDocument",
    "ProcessLimits",
    "Section",
    "TokenCounter",
    "TokenizerCounter",
    "UnsafeDocumentError",
    "UnsupportedFormatError",
    "chunk_document",
    "detect_format",
    "instruction_reasons",
    "load_token_counter",
    "parse_document",
]
