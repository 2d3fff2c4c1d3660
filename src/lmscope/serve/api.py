"""The JSON API under ``/api/``: everything the pages show, for notebooks and other tools.

The OpenAPI schema is at ``/openapi.json``; ``/api`` lists the endpoints as a page. Errors come back
as ``{"error": message}`` with a 4xx status (5xx only for a server fault, still without a traceback).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from lmscope.serve import catalog
from lmscope.serve.engine import Engine, Limits, ServeError

LIMITS = Limits()
NAME = Field(min_length=1, max_length=200, description="an SAE name, as listed by /api/suite")


class InspectRequest(BaseModel):
    """Text to run through the model, and which SAEs to read it with."""

    text: str = Field(min_length=1, max_length=LIMITS.max_text_chars, description="the text to inspect")  # fmt: skip
    saes: list[str] = Field(default_factory=list, max_length=64, description="SAE names to read")
    kind: str | None = Field(None, max_length=40, description="all layers at once: every site of this kind (its canonical SAE), e.g. resid_post")  # fmt: skip
    top_k: int = Field(8, ge=1, le=LIMITS.max_top_k, description="features listed per token")
    feature_sae: str | None = Field(None, max_length=200, description="highlight this feature's SAE…")  # fmt: skip
    feature_index: int | None = Field(None, ge=0, description="…and index: its activation on every token")  # fmt: skip


class SteerFeature(BaseModel):
    sae: str = NAME
    index: int = Field(ge=0, description="the feature (latent) index")
    coeff: float = Field(ge=-LIMITS.max_coeff, le=LIMITS.max_coeff, description="multiples of the feature's max activation (features.db; else the site's mean norm on the prompt) along its decoder direction")  # fmt: skip


class SteerRequest(BaseModel):
    """A prompt and the features to add while generating; the reply holds both continuations."""

    prompt: str = Field(min_length=1, max_length=LIMITS.max_text_chars)
    features: list[SteerFeature] = Field(min_length=1, max_length=LIMITS.max_interventions)
    max_new_tokens: int = Field(24, ge=1, le=LIMITS.max_new_tokens)
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 = greedy")
    seed: int = Field(0, ge=0, le=2**31 - 1)


def _engine(request: Request) -> Engine:
    return request.app.state.engine  # type: ignore[no-any-return]


router = APIRouter(prefix="/api", tags=["api"])


@router.get("/suite", summary="The suite: model, SAEs with eval metrics, canonical choices")
def suite(request: Request) -> dict[str, Any]:
    return catalog.overview(_engine(request))


@router.get("/status", summary="Whether the model is busy, with what, and how far along")
async def status(request: Request) -> dict[str, Any]:
    e = _engine(request)
    return {**e.progress.snapshot(), "model_loaded": e._loaded is not None}


@router.get("/saes/{sae}", summary="One SAE: metrics, frequency histogram, dead/dense counts")
def sae(request: Request, sae: str) -> dict[str, Any]:
    return catalog.sae_detail(_engine(request), sae)


@router.get("/saes/{sae}/features", summary="An SAE's features, a page at a time")
def features(
    request: Request,
    sae: str,
    order: str = Query("density", description=f"one of {', '.join(catalog.ORDERS)}"),
    offset: int = Query(0, ge=0, le=2**31 - 1),  # SQLite's integers end at 2⁶³: a 500 beyond
    limit: int = Query(50, ge=1, le=LIMITS.max_page),
) -> list[dict[str, Any]]:
    return catalog.feature_list(_engine(request), sae, order=order, offset=offset, limit=limit)


@router.get("/search", summary="Find features by id, by the tokens they fire on, or by logit-lens tokens")  # fmt: skip
def search(
    request: Request,
    q: str = Query(
        ..., min_length=1, max_length=200, description="a token, a word, or an id (123 or SAE:123)"
    ),  # fmt: skip
    by: str = Query("activating", description=f"one of {', '.join(catalog.SEARCH_BY)}"),
    sae: str | None = Query(None, max_length=200, description="only this SAE's features"),
    limit: int = Query(50, ge=1, le=LIMITS.max_page),
) -> list[dict[str, Any]]:
    return catalog.feature_search(_engine(request), q, sae=sae, by=by, limit=limit)


@router.get("/labels", summary="The labels (lmscope explain) of some features, e.g. ?f=SAE:12&f=SAE:40")  # fmt: skip
def labels(
    request: Request,
    f: Annotated[list[str], Query(max_length=LIMITS.max_page, description="features as SAE:index")],
) -> list[dict[str, Any]]:
    keys = []
    for item in f:
        name, _, idx = item.rpartition(":")
        if not name or not idx.isdigit():
            raise ServeError(f"features are SAE:index, got {item[:80]!r}", 422)
        keys.append((name, int(idx)))
    return catalog.labels(_engine(request), keys)


@router.get("/saes/{sae}/features/{index}", summary="One feature: top contexts, quantile bands, histogram, logit lens, neighbours")  # fmt: skip
def feature(request: Request, sae: str, index: int) -> dict[str, Any]:
    return catalog.feature_detail(_engine(request), sae, index)


@router.post("/inspect", summary="Which features fire on each token of a text (one forward pass)")
async def inspect(request: Request, body: InspectRequest) -> dict[str, Any]:
    engine = _engine(request)
    names = list(body.saes) + (engine.layer_group(body.kind) if body.kind else [])
    if not names and body.feature_sae is None:
        raise ServeError("name the SAEs to read (saes) or a site kind for all layers (kind)", 422)
    feature = None
    if body.feature_sae is not None or body.feature_index is not None:
        if body.feature_sae is None or body.feature_index is None:
            raise ServeError("to highlight a feature give both feature_sae and feature_index", 422)
        feature = (body.feature_sae, body.feature_index)
    names = list(dict.fromkeys(names))
    # Torch work runs in a worker thread so that /api/status keeps answering meanwhile.
    result = await run_in_threadpool(engine.inspect, body.text, names, top_k=body.top_k, feature=feature)  # fmt: skip
    return catalog.with_labels(engine, result)


@router.post("/steer", summary="Generate with and without steering features, side by side")
async def steer(request: Request, body: SteerRequest) -> dict[str, Any]:
    engine = _engine(request)
    feats = [(f.sae, f.index, f.coeff) for f in body.features]
    return await run_in_threadpool(engine.steer, body.prompt, feats, max_new_tokens=body.max_new_tokens,
                                   temperature=body.temperature, seed=body.seed)  # fmt: skip
