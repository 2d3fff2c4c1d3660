"""The HTML pages: server-rendered Jinja templates (autoescaped), with a little JavaScript for the
inspector, the steering playground and the graph explorer, which call the JSON API."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, Response
from jinja2 import Environment, PackageLoader, select_autoescape

from lmscope.serve import catalog, views
from lmscope.serve.api import LIMITS
from lmscope.serve.engine import DEFAULT_STEER_COEFF, Engine, ServeError

FRONTIER_METRICS = ("fvu", "delta_lm_loss", "ce_recovered", "kl")
# request bodies' parts, listed on /api beside the bodies (every *Request)
API_PARTS = ("SteerFeature", "GraphFeature", "Annotations", "Supernode")
TABLE_METRICS = ("l0", "fvu", "explained_variance", "cos_sim", "delta_lm_loss", "kl", "ce_recovered", "dead", "dense")  # fmt: skip


def make_env() -> Environment:
    env = Environment(
        loader=PackageLoader("lmscope.serve", "templates"),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(colour=views.act_colour, alpha=views.act_alpha, tok=views.show_token, fmt=views.fmt)  # fmt: skip
    env.globals.update(limits=LIMITS, table_metrics=TABLE_METRICS)
    return env


def render(request: Request, template: str, status: int = 200, **ctx: Any) -> HTMLResponse:
    env: Environment = request.app.state.templates
    engine: Engine = request.app.state.engine
    html = env.get_template(template).render(suite_name=engine.suite.path.name, model=engine.suite.model,
                                             path=request.url.path, **ctx)  # fmt: skip
    return HTMLResponse(html, status_code=status)


def _engine(request: Request) -> Engine:
    return request.app.state.engine  # type: ignore[no-any-return]


router = APIRouter(include_in_schema=False)


@router.get("/", response_class=HTMLResponse)
def overview_page(request: Request) -> HTMLResponse:
    engine = _engine(request)
    data = catalog.overview(engine)
    plots = [(m, views.svg_frontier(data["saes"], m)) for m in FRONTIER_METRICS
             if any(m in s["metrics"] for s in data["saes"])]  # fmt: skip
    if not plots:
        plots = [("fvu", views.svg_frontier(data["saes"], "fvu"))]
    # the report's suite-wide plots (frontiers, metrics across layers); per-SAE ones are on SAE pages
    images = [
        f
        for f in data["report"]
        if f.endswith((".png", ".svg")) and ("frontier" in f or "layers" in f)
    ]
    return render(request, "overview.html", data=data, plots=plots, images=images)


@router.get("/sae/{sae}", response_class=HTMLResponse)
def sae_page(
    request: Request,
    sae: str,
    q: str = Query("", max_length=200),
    by: str = Query("activating", max_length=20),
    order: str = Query("density", max_length=20),
    offset: int = Query(0, ge=0, le=2**31 - 1),
) -> HTMLResponse:
    engine = _engine(request)
    detail = catalog.sae_detail(engine, sae)
    hists = [(h, views.svg_histogram(h["edges"], h["counts"], xlabel=h["label"]))
             for h in (detail["frequency_histogram"], detail["l0_histogram"]) if h is not None]  # fmt: skip
    rows: list[dict[str, Any]] = []
    message = None
    if detail["has_features"]:
        try:
            if q.strip():
                rows = catalog.feature_search(engine, q, sae=sae, by=by, limit=100)
            else:
                rows = catalog.feature_list(engine, sae, order=order, offset=offset, limit=50)
        except ServeError as e:
            message = str(e)
    return render(request, "sae.html", d=detail, hists=hists, rows=rows, q=q, by=by,
                  order=order, offset=offset, message=message, orders=catalog.ORDERS,
                  search_by=catalog.SEARCH_BY)  # fmt: skip


@router.get("/sae/{sae}/feature/{index}", response_class=HTMLResponse)
def feature_page(request: Request, sae: str, index: int) -> HTMLResponse:
    engine = _engine(request)
    f = catalog.feature_detail(engine, sae, index)
    examples = [ex for ex in f["top"]] + [ex for _, band in f["bands"] for ex in band]
    scale = max([f["max_act"], *(max(ex["acts"], default=0.0) for ex in examples)])
    hist_svg = views.svg_histogram(f["hist_edges"], f["hist_counts"], xlabel="activation (when firing)")  # fmt: skip
    return render(request, "feature.html", f=f, scale=scale, hist_svg=hist_svg,
                  entry=engine.entry(sae), known=set(engine.suite.names))  # fmt: skip


INSPECT_TEXT = "The capital of France is Paris. def add(a, b):\n    return a + b"


def _sae_options(engine: Engine) -> dict[str, Any]:
    entries = engine.suite.entries
    kinds = list(dict.fromkeys(e["kind"] for e in entries))
    # the inspector's first choice: the residual stream reads best (attn_z strips rarely fire)
    kinds.sort(key=lambda k: k != "resid_post")
    return {"saes": [e["name"] for e in entries], "kinds": kinds}


@router.get("/inspect", response_class=HTMLResponse)
def inspect_page(
    request: Request,
    text: str = Query("", max_length=LIMITS.max_text_chars),
    sae: str = Query("", max_length=200),
    feature: int | None = Query(None, ge=0),
) -> HTMLResponse:
    engine = _engine(request)
    if sae:
        engine.entry(sae)
    text = text or INSPECT_TEXT  # something to inspect at the first click
    return render(request, "inspect.html", text=text, sae=sae, feature=feature, **_sae_options(engine))  # fmt: skip


@router.get("/steer", response_class=HTMLResponse)
def steer_page(
    request: Request,
    sae: str = Query("", max_length=200),
    feature: int | None = Query(None, ge=0),
    coeff: float = Query(0.0, ge=-LIMITS.max_coeff, le=LIMITS.max_coeff),
) -> HTMLResponse:
    engine = _engine(request)
    if sae:
        engine.entry(sae)
    options = _sae_options(engine)
    if not sae and feature is None:  # defaults that visibly steer (issue 16)
        sae = engine.default_sae()
    if feature is None:
        feature = engine.default_feature(sae or options["saes"][0])
    coeff = coeff or DEFAULT_STEER_COEFF
    return render(request, "steer.html", sae=sae, feature=feature, coeff=coeff, **options)


GRAPH_PROMPT = "The Eiffel Tower is in Paris and the Colosseum is in the city of"


@router.get("/graph", response_class=HTMLResponse)
def graph_page(
    request: Request,
    prompt: str = Query("", max_length=LIMITS.max_text_chars),
    saved: str = Query("", max_length=80),
) -> HTMLResponse:
    """The graph explorer: ``?prompt=`` traces a prompt on load, ``?saved=`` reloads a saved graph."""
    explorer = request.app.state.explorer
    unavailable = explorer.unavailable()
    graphs = [] if unavailable else explorer.saved()
    if saved and saved not in {g["slug"] for g in graphs}:
        raise ServeError(f"no saved graph {saved[:80]!r}; the list is on /graph", 404)
    return render(
        request,
        "graph.html",
        prompt=prompt,
        saved=saved,
        graphs=graphs,
        unavailable=unavailable,
        example=GRAPH_PROMPT,
    )


@router.get("/report/{name:path}")
def report(request: Request, name: str) -> Response:
    body, media = catalog.report_file(_engine(request), name)
    return Response(body, media_type=media)


@router.get("/api", response_class=HTMLResponse)
def api_page(request: Request) -> HTMLResponse:
    """The API's endpoints as a page, from the same OpenAPI schema as /openapi.json (works offline)."""
    schema = request.app.openapi()
    ops = [(method.upper(), path, op.get("summary", ""), [p["name"] for p in op.get("parameters", [])],
            op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {}).get("$ref", "").rsplit("/", 1)[-1])  # fmt: skip
           for path, item in schema["paths"].items() for method, op in item.items()]  # fmt: skip
    bodies = {name: s.get("properties", {}) for name, s in schema.get("components", {}).get("schemas", {}).items()
              if name.endswith("Request") or name in API_PARTS}  # fmt: skip
    return render(request, "api.html", ops=ops, bodies=bodies)
