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
from lmscope.serve.graphs import Explorer

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


class GraphRequest(BaseModel):
    """A prompt to trace; the thresholds prune the graph sent back (the page's slider prunes further)."""

    prompt: str = Field(min_length=1, max_length=LIMITS.max_text_chars)
    node_threshold: float = Field(
        0.8, ge=0.0, le=1.0, description="share of influence the kept nodes carry"
    )
    edge_threshold: float = Field(
        0.98, ge=0.0, le=1.0, description="share of influence the kept edges carry"
    )


NODE_ID = Field(min_length=1, max_length=40, pattern=r"^[FETL][0-9.]+$")


class Supernode(BaseModel):
    name: str = Field(min_length=1, max_length=80)
    nodes: list[Annotated[str, NODE_ID]] = Field(min_length=1, max_length=500)


class Annotations(BaseModel):
    """What the explorer saves beside a graph: the slider, the pinned nodes, the supernodes."""

    node_threshold: float = Field(ge=0.0, le=1.0, description="the pruning slider's value")
    pinned: list[Annotated[str, NODE_ID]] = Field(default_factory=list, max_length=500)
    supernodes: list[Supernode] = Field(default_factory=list, max_length=100)


class SaveGraphRequest(BaseModel):
    """Save a graph this server built (or reloaded), named by its key, with annotations."""

    name: str = Field(
        min_length=1, max_length=80, description="shown in the list; its slug names the file"
    )
    key: str = Field(
        pattern=r"^[0-9a-f]{16}$",
        description="the key of a graph from /api/graph or /api/graphs/{slug}",
    )
    annotations: Annotations


class GraphFeature(BaseModel):
    layer: int = Field(ge=0, le=1000)
    position: int = Field(ge=0, le=LIMITS.max_tokens)
    latent: int = Field(ge=0, le=2**31 - 1)
    value: float = Field(
        ge=-LIMITS.max_coeff, le=LIMITS.max_coeff, description="the activation to set: 0 ablates"
    )


class GraphSteerRequest(BaseModel):
    """Set transcoder features of a graph's prompt to given activations in the real model."""

    prompt: str = Field(min_length=1, max_length=LIMITS.max_text_chars)
    features: list[GraphFeature] = Field(min_length=1, max_length=64)


def _engine(request: Request) -> Engine:
    return request.app.state.engine  # type: ignore[no-any-return]


def _explorer(request: Request) -> Explorer:
    return request.app.state.explorer  # type: ignore[no-any-return]


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


@router.post(
    "/graph", summary="The attribution graph of a prompt over the suite's per-layer transcoders"
)
async def graph(request: Request, body: GraphRequest) -> dict[str, Any]:
    return await run_in_threadpool(
        _explorer(request).build,
        body.prompt,
        node_threshold=body.node_threshold,
        edge_threshold=body.edge_threshold,
    )


@router.post("/graph/steer", summary="Top next tokens with a graph's features clamped or ablated")
async def graph_steer(request: Request, body: GraphSteerRequest) -> dict[str, Any]:
    values = {(f.layer, f.position, f.latent): f.value for f in body.features}
    return await run_in_threadpool(_explorer(request).steer, body.prompt, values)


@router.get("/graphs", summary="The saved graphs (suite folder graphs/), newest first")
def saved_graphs(request: Request) -> list[dict[str, Any]]:
    return _explorer(request).saved()


@router.get("/graphs/{slug}", summary="One saved graph with its annotations")
def saved_graph(request: Request, slug: str) -> dict[str, Any]:
    return _explorer(request).load(slug)


@router.post("/graphs", summary="Save a graph with its annotations as graphs/<slug>.json")
def save_graph(request: Request, body: SaveGraphRequest) -> dict[str, Any]:
    return _explorer(request).save(body.name, body.key, body.annotations.model_dump())
