"""The graph explorer's server side: attribution graphs of prompts over the suite's per-layer
transcoders (``lmscope.circuits``), saved with their annotations under ``<suite>/graphs/``, and
steering from a graph's features.

A built graph is the ``lmscope.graph`` document of ``graph_json`` (pruned at the request's
thresholds, which bound the page's pruning slider) plus what the page needs: each feature's SAE
and label, and the total influence, so that the browser can re-prune by node influence without
the full adjacency. Built documents stay in a small in-memory cache under a key; saving names a
key, so the server only ever writes graphs it computed itself.

>>> explorer = Explorer(engine)
>>> doc = explorer.build("The capital of France is")
>>> explorer.save("France", doc["key"], {"node_threshold": 0.5, "pinned": [], "supernodes": []})
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections import OrderedDict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lmscope.errors import LmscopeError
from lmscope.serve import catalog
from lmscope.serve.engine import Engine, ServeError

GRAPHS = "graphs"  # the saved graphs' folder inside the suite
SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{0,59}$")
CACHED = 8  # built graphs kept for saving
MAX_EDGES = 10_000  # edges sent to the page: an SVG with more stops being readable anyway
TOP_LOGITS = 10
NO_TRANSCODERS = (
    "This suite has no per-layer transcoders (mlp_in → mlp_out), which attribution graphs need: "
    "train one per layer with the TOML in docs/circuits.md, “Training the transcoders”."
)


def slugify(name: str) -> str:
    """A file-safe name for a saved graph: lower case letters, digits and dashes."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:60].strip("-")
    if not slug:
        raise ServeError("give the graph a name with at least one letter or digit", 422)
    return slug


def transcoder_names(engine: Engine) -> list[str]:
    """The suite's mlp_in → mlp_out transcoders, one per layer in layer order: each layer's
    canonical one, else its first (the rule of ``lmscope.circuits.suite_transcoders``)."""
    entries = [e for e in engine.suite.entries if e.get("out_site") and e["kind"] == "mlp_in"]
    canon = set(engine.suite.manifest.get("canonical", {}).values())
    chosen: dict[int, str] = {}
    for e in entries:
        if e["layer"] not in chosen or e["name"] in canon:
            chosen[int(e["layer"])] = e["name"]
    return [chosen[layer] for layer in sorted(chosen)]


class Explorer:
    """Builds, caches, saves and reloads attribution graphs, and steers from their features."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.folder = engine.suite.path / GRAPHS
        self._built: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    # -- what the page can offer --------------------------------------------------------------
    def unavailable(self) -> str | None:
        """Why this suite cannot make graphs (one line), or None when it can."""
        return None if transcoder_names(self.engine) else NO_TRANSCODERS

    def _require(self) -> list[str]:
        names = transcoder_names(self.engine)
        if not names:
            raise ServeError(NO_TRANSCODERS, 409)
        return names

    # -- model work ---------------------------------------------------------------------------
    def _prepare(self, prompt: str, names: list[str], step: Any) -> tuple[Any, list[Any], Any]:
        from lmscope.intervene.generate import encode_prompt

        loaded, _ = self.engine._model(step)
        ids = encode_prompt(loaded, prompt)
        limit = self.engine.limits.max_graph_tokens
        if ids.shape[1] > limit:
            raise ServeError(
                f"the prompt is {ids.shape[1]} tokens; graphs take at most {limit}", 422
            )
        step(f"loading {len(names)} transcoder(s)")
        return loaded, [self.engine._sae(n) for n in names], ids

    def build(
        self, prompt: str, *, node_threshold: float = 0.8, edge_threshold: float = 0.98
    ) -> dict[str, Any]:
        """The pruned graph of ``prompt`` as the page reads it (see the module docstring)."""
        from lmscope.circuits import build_graph, graph_json, prune

        names = self._require()
        with self.engine.task("graph", steps=4) as step:
            loaded, tcs, ids = self._prepare(prompt, names, step)
            step(f"attributing {ids.shape[1]} tokens over {len(tcs)} layers")
            graph = build_graph(loaded, tcs, ids, prompt=prompt)
            step("pruning and scoring")
            kept = prune(graph, node_threshold, edge_threshold)
            doc = graph_json(graph, kept, model=self.engine.suite.model)
            total = float(kept.influence.clamp(min=0).sum())
            shown = _cap_edges(graph, kept, doc, MAX_EDGES)
        key = hashlib.sha256(
            repr((prompt, node_threshold, edge_threshold, names)).encode()
        ).hexdigest()[:16]
        doc["key"] = key
        doc["explorer"] = {
            "saes": names,
            "influence_total": total,
            "edges_kept": shown[0],
            "edges_shown": shown[1],
        }
        self._label(doc)
        self._remember(doc)
        return doc

    def _label(self, doc: dict[str, Any]) -> None:
        """Each feature node's SAE and label (`lmscope explain`; None without one)."""
        names = doc["explorer"]["saes"]
        feats = [n for n in doc["nodes"] if n["kind"] == "feature"]
        for n in feats:
            n["sae"] = names[n["layer"]]
        keys = list(dict.fromkeys((n["sae"], n["latent"]) for n in feats))
        try:
            rows = catalog.labels(self.engine, keys) if keys else []
            found = {(r["sae"], r["index"]): r["label"] for r in rows}
        except LmscopeError:  # the database lacks these SAEs: no labels, still a graph
            found = {}
        for n in feats:
            n["label"] = found.get((n["sae"], n["latent"]))

    def steer(self, prompt: str, values: dict[tuple[int, int, int], float]) -> dict[str, Any]:
        """The model's top next tokens without and with the features set to ``values``."""
        import torch

        from lmscope.circuits import clamp_features

        names = self._require()
        if not values:
            raise ServeError("pick at least one feature node to clamp or ablate", 422)
        with self.engine.task("graph steer", steps=4) as step:
            loaded, tcs, ids = self._prepare(prompt, names, step)
            step("running the model with and without the clamped features")
            before = torch.log_softmax(clamp_features(loaded, tcs, ids, {}).float(), -1)
            after = torch.log_softmax(clamp_features(loaded, tcs, ids, values).float(), -1)
        kl = float((before.exp() * (before - after)).sum())
        tok = loaded.tokenizer

        def top(logp: Any, other: Any) -> list[dict[str, Any]]:
            v, i = logp.topk(TOP_LOGITS)
            return [
                {
                    "token": str(tok.decode([int(t)])),
                    "token_id": int(t),
                    "probability": float(p.exp()),
                    "other": float(other[t].exp()),
                }
                for p, t in zip(v, i)
            ]

        return {
            "prompt": prompt,
            "before": top(before, after),
            "after": top(after, before),
            "kl": max(kl, 0.0),
            "features": [
                {"layer": k[0], "position": k[1], "latent": k[2], "value": v}
                for k, v in values.items()
            ],
        }

    # -- the cache and the saved graphs -------------------------------------------------------
    def _remember(self, doc: dict[str, Any]) -> None:
        with self._lock:
            self._built[doc["key"]] = doc
            self._built.move_to_end(doc["key"])
            while len(self._built) > CACHED:
                self._built.popitem(last=False)

    def saved(self) -> list[dict[str, Any]]:
        """The saved graphs, newest first: slug, name, prompt, when, node count."""
        out = []
        for slug, path in self._files().items():
            try:
                doc = self._read(path)
            except LmscopeError:
                continue  # not one of ours, or torn by hand: not listed
            notes = doc.get("annotations") or {}
            out.append(
                {
                    "slug": slug,
                    "name": notes.get("name", slug),
                    "prompt": doc.get("prompt", ""),
                    "saved": notes.get("saved", ""),
                    "nodes": len(doc.get("nodes", [])),
                }
            )
        return sorted(out, key=lambda g: (g["saved"], g["slug"]), reverse=True)

    def _files(self) -> dict[str, Path]:
        """Saved graphs by slug, listed from the folder: no request string becomes a path."""
        if not self.folder.is_dir() or self.folder.is_symlink():
            return {}
        return {
            p.stem: p
            for p in sorted(self.folder.glob("*.json"))
            if SLUG.match(p.stem) and p.is_file() and not p.is_symlink()
        }

    @staticmethod
    def _read(path: Path) -> dict[str, Any]:
        from lmscope.circuits import load_graph

        return load_graph(path)

    def load(self, slug: str) -> dict[str, Any]:
        """A saved graph with its annotations; labels refreshed from the feature database."""
        files = self._files()
        if slug not in files:
            shown = ", ".join(files) or "none yet"
            raise ServeError(f"no saved graph {slug[:80]!r}; saved graphs: {shown}", 404)
        doc = self._read(files[slug])
        if "explorer" not in doc or "key" not in doc:
            self._adopt(doc, slug)
        self._label(doc)
        self._remember(doc)
        return doc

    def _adopt(self, doc: dict[str, Any], slug: str) -> None:
        """Give a graph written by `lmscope attribute` what the page reads: a key, each layer's
        transcoder (by its input site) and the total influence (that of its kept nodes)."""
        by_site = {self.engine.entry(n)["site"]: n for n in transcoder_names(self.engine)}
        sites = doc.get("transcoders") or []
        if not sites or any(s not in by_site for s in sites):
            raise ServeError(
                f"graph {slug} was made with transcoders this suite lacks ({', '.join(sites)})", 422
            )
        total = sum(max(float(n.get("influence", 0.0)), 0.0) for n in doc.get("nodes", []))
        doc["key"] = hashlib.sha256(f"saved:{slug}".encode()).hexdigest()[:16]
        doc["explorer"] = {
            "saes": [by_site[s] for s in sites],
            "influence_total": total,
            "edges_kept": len(doc.get("edges", [])),
            "edges_shown": len(doc.get("edges", [])),
        }

    def save(self, name: str, key: str, annotations: dict[str, Any]) -> dict[str, Any]:
        """Write the built (or reloaded) graph ``key`` with ``annotations`` to graphs/<slug>.json."""
        from lmscope.atomic import write_json_atomic

        with self._lock:
            doc = self._built.get(key)
        if doc is None:
            raise ServeError(
                "this graph is no longer in the server's memory; build it again, then save", 409
            )
        ids = {n["id"] for n in doc["nodes"]}
        named = list(annotations.get("pinned", []))
        named += [i for s in annotations.get("supernodes", []) for i in s["nodes"]]
        unknown = sorted(set(named) - ids)
        if unknown:
            raise ServeError(
                f"annotations name nodes the graph lacks: {', '.join(unknown[:5])}", 422
            )
        slug = slugify(name)
        path = self.folder / f"{slug}.json"
        if path.exists():
            try:
                self._read(path)
            except LmscopeError:
                raise ServeError(
                    f"{GRAPHS}/{slug}.json exists and is not a saved graph; choose another name",
                    409,
                ) from None
        saved = datetime.now(UTC).isoformat(timespec="seconds")
        out = {**doc, "annotations": {**annotations, "name": name, "saved": saved}}
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, out)
        self._remember(out)
        return {"slug": slug, "name": name, "saved": saved, "path": f"{GRAPHS}/{slug}.json"}


def _cap_edges(graph: Any, kept: Any, doc: dict[str, Any], limit: int) -> tuple[int, int]:
    """Keep the ``limit`` edges of ``doc`` that carry most influence (|Â[t, s]|·(infl_t + w_t),
    pruning's edge score on the whole graph); returns (edges kept by pruning, edges shown)."""
    edges = doc["edges"]
    if len(edges) <= limit:
        return len(edges), len(edges)
    import torch

    index = {graph.describe(i)["id"]: i for i in kept.node_mask.nonzero()[:, 0].tolist()}
    t = torch.tensor([index[e["target"]] for e in edges])
    s = torch.tensor([index[e["source"]] for e in edges])
    rows = graph.adjacency.abs().sum(1)
    weight = (kept.influence + graph.logit_weights)[t]
    score = graph.adjacency[t, s].abs() / rows[t].clamp_min(1e-30) * weight
    top = score.topk(limit).indices.sort().values.tolist()
    doc["edges"] = [edges[i] for i in top]
    return len(edges), limit


__all__ = ["GRAPHS", "NO_TRANSCODERS", "Explorer", "slugify", "transcoder_names"]
