"""Retrieval quality of dense, sparse (BM25) and hybrid (RRF) search on a labeled set.

    .venv/bin/python bench/retrieval_quality.py [--products 40] [--seed 7]

The script builds its corpus and questions itself (seeded, offline): the knowledge base
of a fictional hardware maker, Northwind Dynamics: one manual per product (overview,
installation, maintenance, troubleshooting with error codes, warranty), written from the
same templates so that products look alike and their identifiers matter, plus HR and IT
policies on distinct topics. Questions come in three kinds (one identifier and one
mixed question per product, one paraphrase question per policy rule):
- identifier: "What does error E-4821 mean on the NW-3307?" (rare tokens decide);
- paraphrase: a policy question with none of the answer's rare words ("Am I allowed to
  bring my dog to work?" for "Pets are welcome in the office on Fridays");
- mixed: a product question in other words than the manual's.
Each question's label is the fact sentence it asks about; a retrieved chunk is relevant
if it contains that sentence, so labels survive any chunking settings.

Everything goes through the product's code path: parse + chunk (``ingestion``), dense
MiniLM + BM25 vectors (``app.embeddings``), the embedded Qdrant store, and the query the
search service builds (prefetch max(50, 5 x k), RRF fusion in the store). Prints recall@5
and MRR@10 per mode; exits 1 if hybrid does not beat both dense and sparse on both.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from app.domain.knowledge.pipeline import point_id
from app.domain.search.service import MIN_PREFETCH, PREFETCH_FACTOR
from app.embeddings import Models, load_models
from app.settings import IngestSettings
from ingestion import chunk_document, parse_document
from retrieval.vectorstore import (
    ChunkPoint,
    HybridQuery,
    VectorStore,
    VectorStoreConfig,
    open_vector_store,
)

K_RECALL, K_MRR = 5, 10
KINDS = ("sensor", "valve", "pump", "controller", "gateway", "actuator", "meter", "relay")
MATERIALS = ("stainless steel", "anodised aluminium", "cast iron", "polycarbonate")
SYMPTOMS = (
    ("the display stays blank", "check that the supply voltage is above 22 volts"),
    ("the unit overheats", "clean the air intake and reduce the duty cycle"),
    ("readings drift over time", "run the zero-point calibration from the service menu"),
    ("the network link drops", "replace the shielded cable and reseat the connector"),
    ("the motor stalls on start", "lower the start torque limit to 60 percent"),
    ("the seal leaks", "fit a new gasket from the spare parts kit"),
)
# (fact in the policy, paraphrased question sharing none of its rare words)
POLICIES = [
    ("Pets are welcome in the office on Fridays as long as they stay on a leash.",
     "Am I allowed to bring my dog to work?"),
    ("Staff may work remotely for up to three days in every week.",
     "How often can I do my job from home?"),
    ("Expense claims must be filed within thirty days of the purchase.",
     "What is the deadline to get reimbursed for something I bought?"),
    ("New parents receive sixteen weeks of paid leave after a birth or adoption.",
     "How much time off do I get when my baby arrives?"),
    ("Laptops are replaced by the IT desk every four years.",
     "When will I get a new computer?"),
    ("Passwords expire after ninety days and cannot be reused.",
     "How long until I must change my login secret?"),
    ("The cafeteria offers a free breakfast between seven and nine.",
     "Is there food in the morning at the canteen?"),
    ("Business travel abroad needs approval from a director two weeks ahead.",
     "Who must sign off before I fly overseas for a meeting?"),
    ("Visitors must wear a badge and be escorted at all times.",
     "Do guests need someone to accompany them inside the building?"),
    ("Overtime is compensated with time off at one and a half times the hours worked.",
     "What do I get if I stay late to finish a project?"),
    ("Bicycles can be parked in the underground garage next to the lifts.",
     "Where do I leave my bike?"),
    ("Employees get a yearly budget of five hundred euros for training courses.",
     "How much money can I spend on learning new skills?"),
    ("Lost or stolen phones must be reported to security within one hour.",
     "What should I do if my mobile goes missing?"),
    ("The office is closed between Christmas and New Year.",
     "Are we working during the winter holidays?"),
    ("Smoking is only allowed in the marked area behind the loading dock.",
     "Where can I have a cigarette?"),
    ("Sick leave longer than three days requires a doctor's note.",
     "When do I need a medical certificate for being ill?"),
    ("Each team may order one dinner per month for social events paid by the company.",
     "Does the firm cover a meal when our group goes out together?"),
    ("Confidential documents must be shredded, never thrown in the paper bin.",
     "How do I get rid of sensitive paperwork?"),
    ("Parking permits are assigned by seniority and renewed every January.",
     "How are car spots given out?"),
    ("Interns are paid a monthly stipend of nine hundred euros.",
     "Do trainees earn money?"),
]
FILLER = [
    "Northwind Dynamics designs equipment for industrial automation and building services.",
    "Keep this document with the equipment and follow local safety regulations.",
    "Only qualified personnel should open the housing or change the wiring.",
    "Contact your account manager for questions not covered by this document.",
    "Illustrations may differ slightly from the delivered product.",
]


@dataclass(frozen=True)
class Question:
    """A question, its kind, and the fact sentence a relevant chunk contains."""

    text: str
    kind: str
    fact: str


def build(products: int, seed: int) -> tuple[list[tuple[str, str]], list[Question]]:
    """(filename, markdown) documents and the labeled questions about them."""
    rng = random.Random(seed)  # noqa: S311  (reproducible text, not security)
    docs: list[tuple[str, str]] = []
    questions: list[Question] = []
    codes = rng.sample(range(1000, 9999), products * 4)
    for i in range(products):
        model = f"NW-{rng.randint(1000, 9999)}"
        kind = KINDS[i % len(KINDS)]
        months = rng.choice([6, 9, 12, 18, 24, 36])
        torque = rng.randint(3, 40)
        years = rng.choice([1, 2, 3, 5])
        material = rng.choice(MATERIALS)
        install = (f"Mount the {model} {kind} on a flat surface and tighten the four "
                   f"bolts to {torque} newton metres.")
        maintain = f"The {model} {kind} must be recalibrated every {months} months."
        warranty = f"The {model} carries a warranty of {years} years from delivery."
        sections = [
            f"# {model} {kind} manual",
            f"## Overview\n\nThe {model} is a {kind} with a {material} housing. "
            f"{rng.choice(FILLER)} {rng.choice(FILLER)}",
            f"## Installation\n\n{install} {rng.choice(FILLER)}",
            f"## Maintenance\n\n{maintain} {rng.choice(FILLER)}",
        ]
        trouble = []
        for j, (symptom, fix) in enumerate(rng.sample(SYMPTOMS, 3)):
            code = f"E-{codes[i * 4 + j]}"
            fact = f"Error {code} means {symptom}: {fix}."
            trouble.append(fact)
            if j == i % 2:  # one per product, in one of two phrasings
                asked_code = (f"What does error {code} mean?" if j == 0
                              else f"My {model} shows {code}, what should I do?")
                questions.append(Question(asked_code, "identifier", fact))
        sections.append("## Troubleshooting\n\n" + "\n\n".join(trouble))
        sections.append(f"## Warranty\n\n{warranty} {rng.choice(FILLER)}")
        docs.append((f"{model.lower()}-manual.md", "\n\n".join(sections)))
        mixed = [
            (f"How often does the {model} {kind} need a new calibration?", maintain),
            (f"What torque do the mounting bolts of the {model} need?", install),
            (f"How long is the {model} covered against defects?", warranty),
        ]
        asked, fact = mixed[i % 3]
        questions.append(Question(asked, "mixed", fact))
    for n, start in enumerate(range(0, len(POLICIES), 4)):
        group = POLICIES[start:start + 4]
        body = [f"# Staff handbook, chapter {n + 1}"]
        for fact, question in group:
            body.append(f"## Rule\n\n{fact} {rng.choice(FILLER)}")
            questions.append(Question(question, "paraphrase", fact))
        docs.append((f"handbook-{n + 1}.md", "\n\n".join(body)))
    return docs, questions


async def index(store: VectorStore, models: Models, tenant: uuid.UUID,
                docs: list[tuple[str, str]]) -> int:
    """Ingest through parse -> chunk -> dense + BM25 -> upsert; the number of chunks."""
    kb = uuid.uuid4()
    total = 0
    for filename, text in docs:
        doc_id = uuid.uuid4()
        chunks = chunk_document(parse_document(text.encode(), "markdown"), models.counter)
        texts = [c.text for c in chunks]
        dense = models.dense.embed(texts)
        sparse = models.sparse.encode_documents(texts)
        points = [ChunkPoint(id=point_id(doc_id, 1, c.index), dense=d, sparse=s, payload={
            "kb_id": str(kb), "document_id": str(doc_id), "version": 1, "text": c.text,
            "filename": filename}) for c, d, s in zip(chunks, dense, sparse, strict=True)]
        await store.upsert(tenant, points)
        total += len(points)
    return total


async def evaluate(store: VectorStore, models: Models, tenant: uuid.UUID,
                   questions: list[Question]) -> dict[str, dict[str, tuple[float, float]]]:
    """mode -> kind ('all' too) -> (recall@5, MRR@10)."""
    ranks: dict[str, dict[str, list[int | None]]] = {}
    for q in questions:
        dense = models.dense.embed([q.text])[0]
        sparse = models.sparse.encode_query(q.text)
        for mode in ("dense", "sparse", "hybrid"):
            query = HybridQuery(
                dense=dense if mode != "sparse" else None,
                sparse=sparse if mode != "dense" else None,
                limit=K_MRR, prefetch_limit=max(MIN_PREFETCH, K_MRR * PREFETCH_FACTOR))
            hits = await store.query(tenant, query)
            rank = next((i for i, h in enumerate(hits, 1) if q.fact in h.payload["text"]),
                        None)
            for kind in (q.kind, "all"):
                ranks.setdefault(mode, {}).setdefault(kind, []).append(rank)
    return {mode: {kind: _scores(r) for kind, r in by_kind.items()}
            for mode, by_kind in ranks.items()}


def _scores(ranks: list[int | None]) -> tuple[float, float]:
    recall = sum(1 for r in ranks if r is not None and r <= K_RECALL) / len(ranks)
    mrr = sum(1 / r for r in ranks if r is not None) / len(ranks)
    return recall, mrr


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--products", type=int, default=40)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    docs, questions = build(args.products, args.seed)
    models = load_models(IngestSettings())
    folder = Path(tempfile.mkdtemp(prefix="tenantrag-quality-"))
    store = open_vector_store(VectorStoreConfig(backend="embedded", path=folder, dense_dim=384))
    tenant = uuid.uuid4()
    try:
        started = time.perf_counter()
        chunks = asyncio.run(index(store, models, tenant, docs))
        counts = ", ".join(f"{k} {sum(q.kind == k for q in questions)}"
                           for k in ("identifier", "paraphrase", "mixed"))
        print(f"corpus: {len(docs)} documents, {chunks} chunks (indexed in "
              f"{time.perf_counter() - started:.0f} s); questions: {len(questions)} ({counts})")
        results = asyncio.run(evaluate(store, models, tenant, questions))
    finally:
        asyncio.run(store.close())
        shutil.rmtree(folder, ignore_errors=True)
    print(f"| mode | recall@{K_RECALL} | MRR@{K_MRR} | recall@{K_RECALL} identifier / "
          f"paraphrase / mixed |")
    print("|---|---|---|---|")
    for mode, by_kind in results.items():
        recall, mrr = by_kind["all"]
        kinds = " / ".join(f"{by_kind[k][0]:.2f}" for k in ("identifier", "paraphrase", "mixed"))
        print(f"| {mode} | {recall:.3f} | {mrr:.3f} | {kinds} |")
    hybrid = results["hybrid"]["all"]
    losers = [m for m in ("dense", "sparse")
              if not (hybrid[0] > results[m]["all"][0] and hybrid[1] > results[m]["all"][1])]
    if losers:
        print(f"hybrid does NOT beat {' and '.join(losers)} on both metrics")
        return 1
    print("hybrid beats dense and sparse on recall@5 and MRR@10")
    return 0


if __name__ == "__main__":
    sys.exit(main())
