"""Attribution graphs over the replacement model: direct effects between every pair of nodes.

Nodes, in this order (rows and columns of ``Graph.adjacency``):

1. features: every active transcoder latent (layer, position, latent) at an ordinary position (a
   CLT's latents by the layer that encodes them);
2. errors: one per (layer, position), layer-major;
3. tokens: one embedding node per position;
4. logits: the top-probability next tokens at the last position (until their probabilities sum to
   ``logit_prob``, at most ``max_logits``).

A node's *input* is what it reads from the residual stream in the linearised model (see
``lmscope.circuits.replacement``): a feature's ``mlp_in · W_enc[:, i]`` (its pre-activation less
``b_enc``), a logit's de-meaned logit ``final · (W_U[:, t] − mean_v W_U[:, v])``. Errors and
tokens have no inputs. A source node writes a vector into the residual stream: a feature
``a · W_dec[i]`` into its layer's mlp_out (a CLT feature of layer s ``a · W_dec[s→l][i]`` into the
mlp_out of every layer l ≥ s), an error its error vector, a token its embedding.

``adjacency[t, s]`` is the direct effect of s on t: the part of t's input carried by s, i.e.
``(∂ input_t / ∂ written_s) · written_s``, with every other source held at its clean value,
attention patterns and norm scales frozen. The linear model makes it exact: removing s (zeroing
its vector) lowers t's input by exactly ``adjacency[t, s]``, and every input is the sum of its
row plus constants (biases). Rows are computed by batched backward passes: the replacement model
runs once on ``batch_size`` copies of the prompt, and each backward injects one target's
direction per copy, so a graph costs about ``n_targets / batch_size`` backward passes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lmscope.circuits.replacement import Linearised, Pass, Transcoder, linearise
from lmscope.errors import CircuitError
from lmscope.model import LoadedModel


@dataclass
class Graph:
    """An unpruned attribution graph (``lmscope.circuits.prune`` prunes and scores it)."""

    prompt: str
    token_ids: list[int]
    tokens: list[str]
    n_layers: int
    features: Tensor  # [n_f, 3] long: layer, position, latent
    activations: Tensor  # [n_f]
    logit_ids: list[int]
    logit_tokens: list[str]
    logit_probs: Tensor  # [n_logits]
    adjacency: Tensor  # [n, n] float32: adjacency[target, source]
    transcoders: list[str] = field(default_factory=list)  # each layer's transcoder, by site
    seconds: float = 0.0

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def n_features(self) -> int:
        return int(self.features.shape[0])

    @property
    def n_errors(self) -> int:
        return self.n_layers * self.n_tokens

    @property
    def n_nodes(self) -> int:
        return self.n_features + self.n_errors + self.n_tokens + len(self.logit_ids)

    def error_index(self, layer: int, position: int) -> int:
        return self.n_features + layer * self.n_tokens + position

    def token_index(self, position: int) -> int:
        return self.n_features + self.n_errors + position

    def logit_index(self, k: int) -> int:
        return self.n_features + self.n_errors + self.n_tokens + k

    @property
    def logit_weights(self) -> Tensor:
        """[n] the logit probabilities on the logit rows, 0 elsewhere: where influence starts."""
        w = torch.zeros(self.n_nodes)
        w[self.n_nodes - len(self.logit_ids) :] = self.logit_probs
        return w

    def describe(self, i: int) -> dict[str, Any]:
        """Node ``i`` as a JSON-ready record (id, kind, layer, position, latent, activation)."""
        nf, ne, nt = self.n_features, self.n_errors, self.n_tokens
        if i < nf:
            layer, pos, latent = (int(v) for v in self.features[i])
            return {
                "id": f"F{layer}.{pos}.{latent}",
                "kind": "feature",
                "layer": layer,
                "position": pos,
                "latent": latent,
                "activation": float(self.activations[i]),
            }
        if i < nf + ne:
            layer, pos = divmod(i - nf, nt)
            return {"id": f"E{layer}.{pos}", "kind": "error", "layer": layer, "position": pos}
        if i < nf + ne + nt:
            pos = i - nf - ne
            return {
                "id": f"T{pos}",
                "kind": "token",
                "layer": -1,
                "position": pos,
                "token_id": self.token_ids[pos],
            }
        k = i - nf - ne - nt
        return {
            "id": f"L{self.logit_ids[k]}",
            "kind": "logit",
            "layer": self.n_layers,
            "position": nt - 1,
            "token_id": self.logit_ids[k],
            "token": self.logit_tokens[k],
            "probability": float(self.logit_probs[k]),
        }


@dataclass(frozen=True)
class _Targets:
    """Rows to compute: per target its layer (n_layers for logits), position and direction."""

    layer: Tensor  # [n] long
    position: Tensor  # [n] long
    direction: Tensor  # [n, d]


def select_logits(
    logits: Tensor, *, max_logits: int = 10, logit_prob: float = 0.95
) -> tuple[Tensor, Tensor]:
    """The most probable tokens until their probabilities sum to ``logit_prob`` (at most
    ``max_logits``): (ids, probabilities)."""
    if max_logits < 1 or not 0 < logit_prob <= 1:
        raise CircuitError(
            f"need max_logits >= 1 and 0 < logit_prob <= 1, got {max_logits}, {logit_prob}"
        )
    probs = torch.softmax(logits.float(), -1)
    top = probs.topk(min(max_logits, probs.numel()))
    n = int((top.values.cumsum(0) < logit_prob).sum()) + 1
    return top.indices[:n], top.values[:n]


def _features(lin: Linearised) -> tuple[Tensor, Tensor]:
    rows, acts = [], []
    for layer, a in enumerate(lin.clean.acts):
        nz = a[0].nonzero()
        rows.append(torch.cat([torch.full_like(nz[:, :1], layer), nz], 1))
        acts.append(a[0][nz[:, 0], nz[:, 1]])
    return torch.cat(rows).cpu(), torch.cat(acts).float().cpu()


def _targets(lin: Linearised, features: Tensor, logit_ids: Tensor) -> _Targets:
    n = lin.n_layers
    dirs = [lin.coders.W_enc(int(l_))[:, int(i)] for l_, _, i in features.tolist()]
    w_u = lin.sites.unembedding.detach()
    logit_dirs = (w_u[:, logit_ids] - w_u.mean(1, keepdim=True)).T
    t = lin.clean.ids.shape[1]
    direction = (
        torch.cat([torch.stack(dirs).detach().float(), logit_dirs.float()])
        if dirs
        else logit_dirs.float()
    )
    layer = torch.cat([features[:, 0], torch.full((len(logit_ids),), n)])
    position = torch.cat([features[:, 1], torch.full((len(logit_ids),), t - 1)])
    return _Targets(layer, position, direction)


def _rows(
    lin: Linearised,
    p: Pass,
    leaves: list[Tensor],
    targets: _Targets,
    lo: int,
    hi: int,
    features: Tensor,
) -> Tensor:
    """Rows ``lo:hi`` of the adjacency over all source columns (features, errors, tokens)."""
    n, dev = hi - lo, leaves[0].device
    layers, positions = targets.layer[lo:hi], targets.position[lo:hi]
    outputs, grads = [], []
    for layer in sorted(set(layers.tolist())):
        pick = (layers == layer).nonzero()[:, 0]
        out = p.final if layer == lin.n_layers else p.mlp_in[layer]
        g = torch.zeros_like(out)
        rows = pick.to(dev)
        d = targets.direction[lo:hi][pick].to(dev, g.dtype)
        if layer == lin.n_layers:
            g[rows] = d
        else:
            g[rows, positions[pick].to(dev)] = d
        outputs.append(out)
        grads.append(g)
    top = int(layers.max())  # no source at or above the highest target layer matters
    wanted = leaves[: top + 1] if top < lin.n_layers else leaves
    got = torch.autograd.grad(outputs, wanted, grads, retain_graph=True, allow_unused=True)
    c = lin.clean
    t = c.ids.shape[1]
    g_out = {
        layer: got[layer + 1][:n].float()
        for layer in range(lin.n_layers)
        if layer + 1 < len(got) and got[layer + 1] is not None
    }
    feat_cols, err_cols = [], []
    for layer in range(lin.n_layers):
        sel = features[:, 0] == layer
        pos, idx = features[sel, 1].to(dev), features[sel, 2].to(dev)
        # Σ over the mlp_outs it writes of (∂input/∂mlp_out[pos]) · W_dec[idx] · a, for the
        # active latents only: one small matmul per position and decoder (features are sorted
        # by position within a layer)
        per = torch.zeros(n, len(pos), device=dev)
        runs = [v.tolist() for v in torch.unique_consecutive(pos, return_counts=True)]
        for out_layer, w in lin.coders.decoders(layer):
            g_l = g_out.get(out_layer)
            if g_l is None:
                continue
            w_dec = w.detach().float()
            start = 0
            for p_, k in zip(*runs):
                per[:, start : start + k] += g_l[:, p_] @ w_dec[idx[start : start + k]].T
                start += k
        feat_cols.append((per * c.acts[layer][0, pos, idx].float()).cpu())
        g_own = g_out.get(layer)
        errors = (
            torch.zeros(n, t) if g_own is None else (g_own * c.errors[layer][0].float()).sum(-1)
        )
        err_cols.append(errors.cpu())
    g_e = got[0]
    tok_cols = (
        torch.zeros(n, t) if g_e is None else (g_e[:n].float() * c.embed[0].float()).sum(-1).cpu()
    )
    return torch.cat([*feat_cols, *err_cols, tok_cols], 1)


def build_graph(
    loaded: LoadedModel,
    transcoders: Sequence[Transcoder],
    ids: Tensor,
    *,
    prompt: str = "",
    max_logits: int = 10,
    logit_prob: float = 0.95,
    batch_size: int = 64,
) -> Graph:
    """The attribution graph of the prompt ``ids`` [1, T] over ``transcoders`` (one per layer, or
    a single cross-layer transcoder).

    >>> graph = build_graph(loaded, transcoders, encode_prompt(loaded, "The capital of France is"))
    """
    if batch_size < 1:
        raise CircuitError(f"batch_size must be >= 1, got {batch_size}")
    start = time.perf_counter()
    with (
        torch.inference_mode(False),
        torch.enable_grad(),
        linearise(loaded, transcoders, ids) as lin,
    ):
        features, activations = _features(lin)
        logit_ids, logit_probs = select_logits(
            lin.clean.logits, max_logits=max_logits, logit_prob=logit_prob
        )
        targets = _targets(lin, features, logit_ids)
        n_t = int(targets.layer.shape[0])
        rows = min(batch_size, n_t)
        t, d = lin.clean.ids.shape[1], lin.sites.d_model
        dtype = lin.clean.embed.dtype
        leaves = [
            torch.zeros(rows, t, d, dtype=dtype, device=loaded.device, requires_grad=True)
            for _ in range(lin.n_layers + 1)
        ]
        p = lin.forward(rows=rows, leaves=leaves)
        n_f = features.shape[0]
        n_src = n_f + lin.n_layers * t + t
        n = n_src + len(logit_ids)
        adjacency = torch.zeros(n, n)
        order = torch.argsort(targets.layer, stable=True)  # chunks mostly within one layer
        sorted_targets = _Targets(
            targets.layer[order], targets.position[order], targets.direction[order]
        )
        target_rows = torch.cat([torch.arange(n_f), torch.arange(n_src, n)])[order]
        for lo in range(0, n_t, rows):
            hi = min(lo + rows, n_t)
            adjacency[target_rows[lo:hi], :n_src] = _rows(
                lin, p, leaves, sorted_targets, lo, hi, features
            )
        del p, leaves
    tok = loaded.tokenizer
    id_list = [int(i) for i in ids[0].tolist()]
    return Graph(
        prompt=prompt,
        token_ids=id_list,
        tokens=[str(tok.decode([i])) for i in id_list],
        n_layers=lin.n_layers,
        features=features,
        activations=activations,
        logit_ids=[int(i) for i in logit_ids.tolist()],
        logit_tokens=[str(tok.decode([int(i)])) for i in logit_ids.tolist()],
        logit_probs=logit_probs.float().cpu(),
        adjacency=adjacency,
        transcoders=lin.coders.sites,
        seconds=time.perf_counter() - start,
    )


def attribute(
    loaded: LoadedModel, prompt: str, transcoders: Sequence[Transcoder], **options: Any
) -> Graph:
    """``build_graph`` on the prompt's tokens (BOS added as the tokenizer does).

    >>> graph = attribute(loaded, "The capital of France is", transcoders, batch_size=128)
    """
    from lmscope.intervene.generate import encode_prompt

    return build_graph(loaded, transcoders, encode_prompt(loaded, prompt), prompt=prompt, **options)


__all__ = ["Graph", "attribute", "build_graph", "select_logits"]
