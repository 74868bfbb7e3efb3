"""Request and response bodies for ``POST /v1/retrieve``."""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

SearchMode = Literal["hybrid", "dense", "sparse"]
FilterValue = str | int | bool
# A filtered metadata key becomes part of the store's JSON path (meta.<key>): plain names only.
FilterKey = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
Filters = Annotated[dict[FilterKey, FilterValue] | None, Field(max_length=20)]


class RetrieveRequest(BaseModel):
    """Search the tenant's knowledge bases."""

    model_config = ConfigDict(extra="forbid")

    query: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1,
                                            max_length=4000)]
    knowledge_base_ids: Annotated[list[uuid.UUID] | None, Field(max_length=100)] = None
    top_k: Annotated[int, Field(ge=1, le=50)] = 5
    filters: Filters = None
    mode: SearchMode = "hybrid"
    # False: also passages below the relevance thresholds that chat applies.
    relevant_only: bool = True


class RetrievedChunk(BaseModel):
    """One passage, with where it comes from in its document's extracted text."""

    chunk_id: uuid.UUID
    document_id: uuid.UUID
    kb_id: uuid.UUID
    filename: str
    version: int
    chunk_index: int
    page: int | None
    char_start: int
    char_end: int
    heading_path: list[str]
    text: str
    score: float
    # The passage reads like instructions aimed at an AI (docs/ingestion.md); chat still
    # uses it, fenced as data and labelled as such.
    suspected_instructions: bool = False
    instruction_reasons: list[str] = Field(default_factory=list)


class RetrieveResponse(BaseModel):
    """Best passages first."""

    data: list[RetrievedChunk]
