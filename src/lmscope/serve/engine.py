"""The server's model side: one suite, its model and SAEs loaded lazily, and every torch run serialised.

Requests arrive on many threads, but interleaving forward passes (and hook installs) on one model is
not safe, so ``Engine`` runs them one at a time under a lock and publishes what it is doing in
``progress``, which the pages poll to show long computations advancing. Names that reach the engine
are checked against the suite's manifest before anything is loaded: no request string becomes a path.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lmscope.errors import LmscopeError

if TYPE_CHECKING:
    from lmscope.model import LoadedModel, SiteModel
    from lmscope.sae import SAE
    from lmscope.suite import Suite


class ServeError(LmscopeError):
    """A request the server cannot serve; ``status`` is the HTTP status that tells why."""

    status = 400

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may ask for, so that no request can hold the model for long."""

    max_text_chars: int = 2000
    max_tokens: int = 256
    max_new_tokens: int = 64
    max_interventions: int = 8
    max_top_k: int = 32
    max_coeff: float = 1e4
    max_page: int = 200
    max_graph_tokens: int = 64  # an attribution graph's cost grows with the square of its nodes


# Steering coefficients are multiples of the feature's max activation (from features.db; without
# it, of the site's mean activation norm on the prompt), as on Neuronpedia: a raw coefficient of 10
# was noise on Gemma's residual stream, whose norms are in the thousands, and huge on attn_z.
# The default 2: on Gemma 3 270M (quick preset, layers 0-2) the strongest feature at 2 gave
# KL 10-24 nats (raw 10 on feature 0: 0.0003).
DEFAULT_STEER_COEFF = 2.0


@dataclass
class Progress:
    """What the model worker is doing now: a task, its step out of steps, and how many wait."""

    task: str | None = None
    step: int = 0
    steps: int = 0
    message: str = "idle"
    started: float = 0.0
    waiting: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            busy = self.task is not None
            return {"busy": busy, "task": self.task, "step": self.step, "steps": self.steps,
                    "message": self.message, "waiting": self.waiting,
                    "elapsed_s": round(time.monotonic() - self.started, 2) if busy else 0.0}  # fmt: skip

    def update(self, **kw: Any) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self, k, v)


class Engine:
    """The suite and, once first needed, its model and SAEs.

    >>> engine = Engine(Suite.open("runs/quick/suite"))
    >>> engine.inspect("The cat sat", ["L0.resid_post__w64_l08"], top_k=5)["tokens"]
    """

    def __init__(self, suite: Suite, *, device: str | None = None, limits: Limits | None = None):
        self.suite = suite
        self.device = device
        self.limits = limits or Limits()
        self.progress = Progress()
        self._entries = {e["name"]: e for e in suite.entries}
        self._lock = threading.Lock()
        self._loaded: LoadedModel | None = None
        self._sites: SiteModel | None = None
        self._saes: dict[str, SAE] = {}

    # -- names from requests ------------------------------------------------------------------
    def entry(self, name: str) -> dict[str, Any]:
        """The manifest entry of an SAE; an unknown name (or anything path-like) is a 404."""
        e = self._entries.get(name)
        if e is None:
            shown = name if len(name) <= 80 else name[:80] + "…"
            raise ServeError(f"no SAE {shown!r} in this suite; see /api/suite for the SAEs it has", 404)  # fmt: skip
        return e

    def check_feature(self, name: str, index: int) -> dict[str, Any]:
        e = self.entry(name)
        if not 0 <= index < int(e["d_sae"]):
            raise ServeError(f"SAE {name} has features 0–{int(e['d_sae']) - 1}; there is no feature {index}", 404)  # fmt: skip
        return e

    def layer_group(self, kind: str) -> list[str]:
        """One SAE per layer for a site kind: each site's canonical SAE, in layer order."""
        sites = [s for s in self.suite.sites if s.split(".", 1)[1] == kind]
        if not sites:
            kinds = sorted({e["kind"] for e in self._entries.values()})
            raise ServeError(f"no SAEs on site kind {kind!r}; this suite has: {', '.join(kinds)}", 404)  # fmt: skip
        return [self.suite.resolve(s) for s in sites]

    # -- serialised model work ----------------------------------------------------------------
    @contextmanager
    def task(self, name: str, steps: int) -> Iterator[Any]:
        """Hold the model for one request; yields ``step(message)`` to report each stage."""
        self.progress.update(waiting=self.progress.waiting + 1)
        with self._lock:
            self.progress.update(waiting=self.progress.waiting - 1, task=name, step=0,
                                 steps=steps, message="starting", started=time.monotonic())  # fmt: skip
            counter = [0]

            def step(message: str) -> None:
                counter[0] += 1
                self.progress.update(step=min(counter[0], steps), message=message)

            try:
                yield step
            finally:
                self.progress.update(task=None, step=0, steps=0, message="idle")

    def _model(self, step: Any) -> tuple[LoadedModel, SiteModel]:
        if self._loaded is None or self._sites is None:
            from lmscope.model import SiteModel

            step(f"loading model {self.suite.model} (first request only)")
            self._loaded = self.suite.load_model(device=self.device)
            self._loaded.model.eval()
            self._sites = SiteModel(self._loaded)
        else:
            step("model ready")
        return self._loaded, self._sites

    def _sae(self, name: str) -> SAE:
        if name not in self._saes:
            loaded = self._loaded
            device = loaded.device if loaded is not None else None
            sae = self.suite.load_sae(name, device=device)
            sae.eval()
            self._saes[name] = sae
        return self._saes[name]

    def max_act(self, name: str, index: int) -> float:
        """The feature's max activation recorded by `lmscope interpret` (0.0 without features.db)."""
        from lmscope.interp.query import feature

        try:
            return float(feature(self.suite, name, index).max_act)
        except LmscopeError:  # no features.db, or it lacks this SAE
            return 0.0

    def steer_unit(self, name: str, index: int, ids: Any) -> tuple[float, str]:
        """What steering coefficient 1 adds for a feature, and what that is: its max activation,
        or (never seen firing) the site's mean activation norm on the prompt ``ids``, over the
        length of its decoder direction."""
        import torch

        top = self.max_act(name, index)
        if top > 0:
            return top, "max_act"
        assert self._sites is not None
        site = self._entries[name]["site"]
        with torch.inference_mode():
            x = self._sites.run(ids, read=[site], return_logits=False).acts[site][0, 1:]
            w = self._sae(name).W_dec[index].norm()
        return float(x.norm(dim=-1).mean() / w.clamp(min=1e-12)), "site_norm"

    def default_sae(self) -> str:
        """The steering page's first SAE: the middle layer's residual stream, where steering
        reads most clearly in the output (else the suite's first SAE)."""
        resid = [s for s in self.suite.sites if s.endswith(".resid_post")]
        if not resid:
            return str(self.suite.entries[0]["name"])
        return self.suite.resolve(resid[len(resid) // 2])

    def default_feature(self, name: str) -> int:
        """A feature worth steering with by default: the SAE's strongest (0 without features.db)."""
        from lmscope.interp.query import features

        try:
            top = features(self.suite, name, order="max_act", limit=1)
        except LmscopeError:
            return 0
        return top[0].index if top else 0

    def _tokenize(self, text: str) -> tuple[Any, list[str]]:
        import torch

        assert self._loaded is not None
        tok = self._loaded.tokenizer
        ids: list[int] = list(tok(text, add_special_tokens=False).input_ids)
        if not ids:
            raise ServeError("the text is empty after tokenisation; type some text", 422)
        if len(ids) > self.limits.max_tokens:
            raise ServeError(f"the text is {len(ids)} tokens; the limit is {self.limits.max_tokens}", 422)  # fmt: skip
        # Training saw BOS-prefixed sequences and never BOS itself: prefix it, then drop its row.
        bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        full = ([bos] if bos is not None else []) + list(ids)
        return torch.tensor([full]), [str(tok.decode([i])) for i in ids]

    def _latents(self, text: str, names: list[str], step: Any) -> tuple[list[str], dict[str, Any]]:
        """Tokens of ``text`` and each SAE's latents on them, [T, d_sae], from one forward pass."""
        import torch

        _, sites = self._model(step)
        ids, tokens = self._tokenize(text)
        step(f"loading {len(names)} SAE(s)")
        saes = {n: self._sae(n) for n in names}
        step(f"running the model and {len(names)} SAE(s) on {len(tokens)} tokens")
        reads = sorted({self._entries[n]["site"] for n in names})
        with torch.inference_mode():
            acts = sites.run(ids, read=reads, return_logits=False).acts
            first = ids.shape[1] - len(tokens)
            out = {}
            for n, sae in saes.items():
                x = acts[self._entries[n]["site"]][0, first:]
                out[n] = sae.encode(x.to(sae.W_enc.dtype)).float().cpu()
        return tokens, out

    def inspect(
        self, text: str, names: list[str], *, top_k: int = 8, feature: tuple[str, int] | None = None
    ) -> dict[str, Any]:
        """Which features fire on each token of ``text``, per SAE, and one chosen feature's acts."""
        for n in names:
            self.entry(n)
        if feature is not None:
            self.check_feature(*feature)
        wanted = list(dict.fromkeys(names + ([feature[0]] if feature else [])))
        with self.task("inspect", steps=3) as step:
            tokens, lat = self._latents(text, wanted, step)
        result: dict[str, Any] = {"tokens": tokens, "saes": []}
        for n in names:
            f = lat[n]
            k = min(top_k, f.shape[1])
            vals, idx = f.topk(k, dim=1)
            per_token = [
                [{"index": int(i), "act": round(float(v), 4)} for v, i in zip(vr, ir) if v > 0]
                for vr, ir in zip(vals.tolist(), idx.tolist())
            ]
            result["saes"].append({"sae": n, "site": self._entries[n]["site"],
                                   "l0": [int(c) for c in (f > 0).sum(1).tolist()],
                                   "top": per_token})  # fmt: skip
        if feature is not None:
            acts = lat[feature[0]][:, feature[1]]
            result["feature"] = {"sae": feature[0], "index": feature[1],
                                 "acts": [round(float(a), 4) for a in acts.tolist()]}  # fmt: skip
        return result

    def steer(
        self,
        prompt: str,
        features: list[tuple[str, int, float]],
        *,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        seed: int = 0,
    ) -> dict[str, Any]:
        """Generate from ``prompt`` without and with the features added, side by side."""
        from lmscope.intervene import Steer, compare, generate

        if not features:
            raise ServeError("pick at least one feature to steer with", 422)
        for name, index, _ in features:
            self.check_feature(name, index)
        with self.task("steer", steps=5) as step:
            loaded, _ = self._model(step)
            ids, _ = self._tokenize(prompt)  # bounds the prompt
            step(f"loading {len(features)} SAE(s)")
            units = [self.steer_unit(n, i, ids) for n, i, _ in features]
            interventions = [Steer(self._sae(n), i, c * u[0]) for (n, i, c), u in zip(features, units)]  # fmt: skip
            step(f"generating {max_new_tokens} tokens without steering")
            plain = generate(loaded, prompt, (), max_new_tokens=max_new_tokens,
                             temperature=temperature, seed=seed)  # fmt: skip
            step(f"generating {max_new_tokens} tokens with {len(features)} feature(s) steered")
            steered = generate(loaded, prompt, interventions, max_new_tokens=max_new_tokens,
                               temperature=temperature, seed=seed)  # fmt: skip
            step("comparing the next-token distributions")
            nxt = compare(loaded, prompt, interventions, top=8)
        return {"prompt": prompt, "baseline": plain, "steered": steered,
                "next_token": {"baseline": nxt["clean"], "steered": nxt["intervened"], "kl": nxt["kl"]},
                "features": [{"sae": n, "index": i, "coeff": c, "unit": u, "unit_of": w, "strength": c * u}
                             for (n, i, c), (u, w) in zip(features, units)],
                "max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed}  # fmt: skip
