"""The KL phase: fine-tune trained SAEs spliced into the model, on what the model's outputs feel.

MSE weighs every direction of a site alike, but the model does not: an SAE with FVU 0.06 can still
cost 0.6 nats of next-token loss. Here each SAE is spliced in (its reconstruction replaces its site
at every real token) and trained on

    loss = KL(clean ‖ spliced next-token distribution) + kl_mse_coeff · ‖x − x̂‖² (normalised units)

with θ frozen (so sparsity stays what the MSE phase reached). Cost control:
- one clean forward per batch serves every SAE; each SAE then runs (and backpropagates through)
  only the layers from its own site on (``SiteModel.run_from``, fed the cached clean stream);
- the KL is taken over a vocabulary subset ``V``: the union over the batch of each token's top
  ``kl_top_k`` clean next tokens, plus one *tail* bucket holding the rest of the vocabulary, whose
  logits are held at their clean values. The clean side is exact (the tail's log-mass is a
  logsumexp over the complement); the spliced side is exact on V and approximates the tail tokens
  as unmoved. With ``kl_top_k`` ≥ vocab, V is everything and this is the exact KL.

Checkpointed like the suite trainer (``<out>/.finetune/``: SAE states, Adam moments, data position;
``checkpoint.json`` there is the commit point); ``resume=True`` ends identical to an uninterrupted
run. SAEs are saved folded, with ``training["kl"]`` recording steps, tokens and the KL before/after.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lmscope.atomic import write_bytes_atomic
from lmscope.data import TokenBatches
from lmscope.errors import ConfigError
from lmscope.model import LoadedModel, Site, SiteModel
from lmscope.sae import SAE, load_sae, save_sae
from lmscope.train import checkpoint as ck
from lmscope.train.config import TrainConfig
from lmscope.train.trainer import TrainingInterrupted

FT_DIR = ".finetune"
_CHUNK = 256  # rows per full-vocabulary chunk of the clean logits


def _normalised(sae: SAE) -> SAE:
    """The SAE as it ran in training: on x / C_in, reconstructing target / C_out."""
    t = sae.cfg.training
    c_in, c_out = float(t.get("input_scale", 1.0)), float(t.get("output_scale") or 1.0)
    if not sae.cfg.is_transcoder:
        c_out = c_in
    out = sae.folded(C=1 / c_in, C_out=1 / c_out if sae.cfg.is_transcoder else None)
    out.cfg.training = dict(t)
    return out


def _refolded(sae: SAE) -> SAE:
    t = sae.cfg.training
    c_in, c_out = float(t.get("input_scale", 1.0)), float(t.get("output_scale") or 1.0)
    return sae.folded(C=c_in, C_out=c_out if sae.cfg.is_transcoder else None)


def _scales(sae: SAE) -> tuple[float, float]:
    t = sae.cfg.training
    c_in = float(t.get("input_scale", 1.0))
    return c_in, float(t.get("output_scale") or c_in) if sae.cfg.is_transcoder else c_in


# --- the vocabulary-efficient KL ------------------------------------------------------------


def _logits(sm: SiteModel, normed: Tensor, cols: Tensor | None) -> Tensor:
    w = sm.model.get_output_embeddings().weight
    z = normed @ (w.T if cols is None else w[cols].T)
    cap = getattr(sm.model.config.get_text_config(), "final_logit_softcapping", None)
    return z if cap is None else torch.tanh(z / cap) * cap


def clean_topk(sm: SiteModel, h: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """For clean final residual rows h [n, d]: the vocabulary subset V (sorted ids, the union of
    every row's top-k), the clean logits on V [n, |V|] and each row's tail logsumexp [n] over
    the tokens outside V (−inf when V is the whole vocabulary)."""
    with torch.no_grad():
        normed = sm.final_norm(h)
        vocab = sm.model.get_output_embeddings().weight.shape[0]
        top = []
        for i in range(0, len(h), _CHUNK):
            z = _logits(sm, normed[i : i + _CHUNK], None).float()
            top.append(z.topk(min(k, vocab), dim=-1).indices)
        cols = torch.unique(torch.cat(top))
        outside = torch.ones(vocab, dtype=torch.bool, device=h.device)
        outside[cols] = False
        tails = []
        for i in range(0, len(h), _CHUNK):
            z = _logits(sm, normed[i : i + _CHUNK], None).float()
            tails.append(torch.logsumexp(z.masked_fill(~outside, -math.inf), -1))
        return cols, _logits(sm, normed, cols).float(), torch.cat(tails)


def topk_tail_kl(clean_v: Tensor, tail: Tensor, spliced_v: Tensor) -> Tensor:
    """Mean over rows of KL(clean ‖ spliced) on V plus the tail bucket (its spliced logit = clean)."""
    lp = torch.log_softmax(torch.cat([clean_v, tail[:, None]], 1), -1)
    lq = torch.log_softmax(torch.cat([spliced_v, tail[:, None]], 1), -1)
    p = lp.exp()
    return torch.where(p > 0, p * (lp - lq), 0.0).sum(-1).mean()


# --- splicing --------------------------------------------------------------------------------


def _final_resid(sm: SiteModel, out: Site, value: Tensor, acts: dict[str, Tensor]) -> Tensor:
    """The last resid_post with ``out`` set to ``value``, running only the layers from it on."""
    last = f"L{sm.n_layers - 1}.resid_post"
    if out.kind in ("resid_pre", "resid_post"):
        start = out.layer + (out.kind == "resid_post")
        if start == sm.n_layers:
            return value
        return sm.run_from(start, value, read=[last], return_logits=False).acts[last]
    resid = acts[f"L{out.layer}.resid_pre"]
    return sm.run_from(
        out.layer, resid, read=[last], replace={out: lambda _x: value}, return_logits=False
    ).acts[last]


def _needed(sm: SiteModel, saes: Sequence[SAE]) -> list[str]:
    reads = {f"L{sm.n_layers - 1}.resid_post"}
    for s in saes:
        out = sm.site(s.cfg.out_site or s.cfg.site)
        reads |= {s.cfg.site, str(out)}
        if out.kind not in ("resid_pre", "resid_post"):
            reads.add(f"L{out.layer}.resid_pre")
    return sorted(reads)


def spliced_kl_loss(
    sm: SiteModel,
    sae: SAE,
    acts: dict[str, Tensor],
    mask: Tensor,
    ref: tuple[Tensor, Tensor, Tensor],
    mse_coeff: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, KL, normalised MSE) of a normalised-form SAE spliced at every ``mask`` token."""
    cols, clean_v, tail = ref
    c_in, c_out = _scales(sae)
    out = sm.site(sae.cfg.out_site or sae.cfg.site)
    x_in, x = acts[sae.cfg.site], acts[str(out)]
    x_hat = _reconstruct(sae, x_in[mask] / c_in)
    mse = (x_hat - x[mask] / c_out).pow(2).sum(-1).mean()
    spliced = x.clone()
    spliced[mask] = (x_hat * c_out).to(x.dtype)
    h = _final_resid(sm, out, spliced, acts)[mask]
    kl = topk_tail_kl(clean_v, tail, _logits(sm, sm.final_norm(h), cols).float())
    return kl + mse_coeff * mse, kl, mse


def _reconstruct(sae: SAE, x: Tensor) -> Tensor:
    x_hat = sae.decode(sae.encode(x))
    skip = getattr(sae, "skip_out", None)
    return x_hat if skip is None else x_hat + skip(x)


# --- the loop --------------------------------------------------------------------------------


def finetune_suite(
    loaded: LoadedModel,
    folders: Sequence[str | Path],
    cfg: TrainConfig,
    *,
    corpus: str = "default",
    seq_len: int = 128,
    resume: bool = False,
    max_steps: int | None = None,
) -> list[Path]:
    """KL-fine-tune the saved SAEs in ``folders`` (one suite) for ``cfg.kl_tokens`` tokens.

    Tokens come from the corpus's train split (seed ``cfg.seed + 1``, so not the MSE phase's
    order), ``cfg.kl_batch_size`` sequences per step. ``max_steps`` stops early with a
    checkpoint (``TrainingInterrupted``), as does SIGINT/SIGTERM; ``resume=True`` continues.
    An SAE whose config already records a finished KL phase is left alone.
    """
    paths = [Path(f) for f in folders]
    if cfg.kl_tokens <= 0 or not paths:
        return paths
    root = paths[0].parent
    ckdir = root / FT_DIR
    names = [p.name for p in paths]
    rec = ck.read_commit(ckdir)
    if rec is not None and not resume:
        raise ConfigError(f"{ckdir} holds a KL-phase checkpoint; pass resume=True")
    saes = [load_sae(p, device=loaded.device) for p in paths]
    if rec is None and all("kl" in s.cfg.training for s in saes):
        return paths  # finished earlier
    total = max(1, cfg.kl_tokens // (cfg.kl_batch_size * seq_len))
    norm = [_normalised(s).train() for s in saes]
    for s in norm:
        if "threshold" in dict(s.named_parameters()):
            s.get_parameter("threshold").requires_grad_(False)
    opts = [_adam(s, cfg) for s in norm]
    step, hist = 0, [[math.nan, math.nan] for _ in norm]  # KL at the first and last step
    if rec is not None:
        if rec["saes"] != names or rec["config"] != _result_cfg(cfg):
            raise ConfigError("cannot resume the KL phase: its SAEs or kl_* settings differ")
        step, hist = int(rec["step"]), rec["hist"]
        for name, s, opt in zip(names, norm, opts, strict=True):
            tensors, _ = ck.load_sae_state(ck.sae_ckpt_dir(ckdir, name), step)
            s.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae.")})
            ck.load_optimizer_tensors(opt, _pnames(s), tensors)
    sm = SiteModel(loaded)
    grads_were = [p.requires_grad for p in loaded.model.parameters()]
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    batches = TokenBatches(corpus, loaded.tokenizer, seq_len=seq_len, batch_size=cfg.kl_batch_size,
                           split="train", seed=cfg.seed + 1, skip=step * cfg.kl_batch_size)  # fmt: skip
    needed = _needed(sm, saes)
    bar = tqdm(total=total * len(norm), initial=step * len(norm), unit="splice",
               desc=f"KL phase, {len(norm)} SAEs", disable=not cfg.progress, dynamic_ncols=True)  # fmt: skip
    try:
        with ck.StopOnSignal() as stop:
            while step < total:
                if stop.signum is not None or (max_steps is not None and step >= max_steps):
                    _save_ckpt(ckdir, step, names, norm, opts, hist, cfg)
                    raise TrainingInterrupted(f"KL phase stopped at step {step}/{total}; checkpoint in {ckdir}; rerun with resume=True")  # fmt: skip
                block = next(batches, None)
                if block is None:
                    break
                ids, mask = block.input_ids.to(loaded.device), block.mask.to(loaded.device)
                with torch.no_grad():
                    acts = sm.run(ids, read=needed, return_logits=False).acts
                    ref = clean_topk(sm, acts[f"L{sm.n_layers - 1}.resid_post"][mask], cfg.kl_top_k)
                for i, (s, opt) in enumerate(zip(norm, opts, strict=True)):
                    for g in opt.param_groups:
                        g["lr"] = cfg.kl_lr * _lr_scale(step, total)
                    opt.zero_grad(set_to_none=True)
                    loss, kl, _ = spliced_kl_loss(sm, s, acts, mask, ref, cfg.kl_mse_coeff)
                    loss.backward()
                    s.remove_parallel_grads()
                    opt.step()
                    s.renormalise_decoder()
                    hist[i][1] = float(kl.detach())
                    if step == 0:
                        hist[i][0] = float(kl.detach())
                    bar.update(1)
                step += 1
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total:
                    _save_ckpt(ckdir, step, names, norm, opts, hist, cfg)
    finally:
        bar.close()
        for param, was in zip(loaded.model.parameters(), grads_were, strict=True):
            param.requires_grad_(was)
    for path, s, h in zip(paths, norm, hist, strict=True):
        out = _refolded(s.eval())
        kl_rec = {"steps": step, "tokens_per_step": cfg.kl_batch_size * seq_len,
                  "kl_first": h[0], "kl_last": h[1], **_result_cfg(cfg)}  # fmt: skip
        out.cfg.training = {**s.cfg.training, "kl": kl_rec}
        _save_keeping_files(out, path)
    ck.clear(ckdir, names)
    return paths


def _lr_scale(step: int, total: int) -> float:
    """Constant, then a linear decay to 0.1 over the last half: short phases end calmly."""
    half = total / 2
    return 1.0 if step < half else 1.0 - 0.9 * (step - half) / max(half, 1)


def _adam(sae: SAE, cfg: TrainConfig) -> torch.optim.Adam:
    params = [p for p in sae.parameters() if p.requires_grad]
    return torch.optim.Adam(params, lr=cfg.kl_lr, betas=(0.9, 0.999))


def _pnames(sae: SAE) -> list[str]:
    return [n for n, p in sae.named_parameters() if p.requires_grad]


def _result_cfg(cfg: TrainConfig) -> dict[str, Any]:
    keys = ("kl_tokens", "kl_batch_size", "kl_lr", "kl_mse_coeff", "kl_top_k", "seed")
    return {k: getattr(cfg, k) for k in keys}


def _save_ckpt(
    ckdir: Path,
    step: int,
    names: list[str],
    norm: list[SAE],
    opts: list[torch.optim.Adam],
    hist: list[list[float]],
    cfg: TrainConfig,
) -> None:
    for name, s, opt in zip(names, norm, opts, strict=True):
        tensors = {f"sae.{k}": v for k, v in s.state_dict().items()}
        tensors.update(ck.optimizer_tensors(opt, _pnames(s)))
        ck.save_sae_state(ck.sae_ckpt_dir(ckdir, name), step, tensors, {})
    ck.commit(ckdir, step, names, {"hist": hist, "config": _result_cfg(cfg)})


def _save_keeping_files(sae: SAE, d: Path) -> None:
    """``save_sae`` replaces the folder whole: keep the other files (train_log.jsonl) across it."""
    keep = {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}
    save_sae(sae, d)
    for name, data in keep.items():
        if not (d / name).exists():
            write_bytes_atomic(d / name, data)
