"""interpret on the tiny suite, held against brute force over the same tokens."""

from __future__ import annotations

import torch
from interp_support import Interpreted

from lmscope.interp.query import feature
from lmscope.model import SiteModel, tiny_model


def _masked(run: Interpreted, name: str) -> torch.Tensor:
    return run.latents[name] * run.mask[..., None]


def test_top_contexts_equal_a_brute_force_sort_of_every_token(interpreted: Interpreted) -> None:
    run = interpreted
    T = run.ids.shape[1]
    for e in run.suite.entries:
        f = _masked(run, e["name"]).reshape(-1, e["d_sae"])
        values, rows = f.topk(run.cfg.stats.k, dim=0)
        for j in range(e["d_sae"]):
            top = feature(run.suite, e["name"], j).top
            n = int((values[:, j] > 0).sum())
            assert [ex.act for ex in top] == values[:n, j].tolist()
            # positions: those of the brute-force sort, up to ties (the same few tokens after
            # BOS in two sequences give the same activation)
            places = [(ex.seq, ex.pos) for ex in top]
            assert len(set(places)) == n
            assert all(float(f[s * T + p, j]) == ex.act for (s, p), ex in zip(places, top))
            unique = [i for i in range(n) if (f[:, j] == values[i, j]).sum() == 1]
            assert all(places[i] == divmod(int(rows[i, j]), T) for i in unique)


def test_every_stored_window_equals_the_sae_encode_of_those_tokens(
    interpreted: Interpreted,
) -> None:
    run = interpreted
    w = run.cfg.stats.window
    tok = tiny_model("gemma3").tokenizer
    checked = 0
    for e in run.suite.entries:
        f = _masked(run, e["name"])
        for j in range(e["d_sae"]):
            rec = feature(run.suite, e["name"], j)
            for ex in rec.top + [x for _, band in rec.bands for x in band]:
                lo = max(0, ex.pos - w)
                assert ex.acts == f[ex.seq, lo : ex.pos + w + 1, j].tolist()
                assert ex.act == ex.acts[ex.center] == float(f[ex.seq, ex.pos, j]) > 0
                ids = run.ids[ex.seq, lo : ex.pos + w + 1].tolist()
                assert ex.tokens == [tok.decode([i]) for i in ids]
                checked += 1
    assert checked > 1000


def test_bands_are_ordered_and_hold_as_many_samples_as_their_range_has(interpreted: Interpreted) -> None:  # fmt: skip
    run = interpreted
    for e in run.suite.entries:
        f = _masked(run, e["name"]).reshape(-1, e["d_sae"])
        for j in range(e["d_sae"]):
            rec = feature(run.suite, e["name"], j)
            acts = f[:, j][f[:, j] > 0]
            floor = float("inf")
            assert len(rec.bands) == len(rec.band_ranges) == run.cfg.stats.bands
            for (label, examples), (lo, hi) in zip(rec.bands, rec.band_ranges):
                assert label.endswith("% of max")
                got = [x.act for x in examples]
                assert got == sorted(got, reverse=True)
                assert all(lo <= a < hi for a in got)
                in_range = int(((acts >= lo) & (acts < hi)).sum())
                assert len(got) == min(run.cfg.stats.per_band, in_range)
                if got:
                    assert got[0] <= floor
                    floor = got[-1]
            assert rec.band_ranges[0][1] > rec.max_act >= rec.band_ranges[0][1] / 2


def test_density_and_histogram_equal_brute_force(interpreted: Interpreted) -> None:
    run = interpreted
    for e in run.suite.entries:
        f = _masked(run, e["name"]).reshape(-1, e["d_sae"])
        for j in range(e["d_sae"]):
            rec = feature(run.suite, e["name"], j)
            acts = f[:, j][f[:, j] > 0]
            assert rec.tokens == run.cfg.tokens == int(run.mask.sum())
            assert rec.n_fire == len(acts) and rec.density == len(acts) / run.cfg.tokens
            assert abs(rec.mean_act - float(acts.double().mean())) < 1e-6 * rec.mean_act
            assert rec.max_act == float(acts.max())
            edges = torch.tensor(rec.hist_edges, dtype=torch.float64)
            want = torch.histogram(acts.double(), bins=edges).hist.long()
            assert rec.hist_counts == want.tolist() and sum(rec.hist_counts) == len(acts)


def test_logit_lens_equals_the_direct_product_through_the_gemma_norm_weight(interpreted: Interpreted) -> None:  # fmt: skip
    loaded = tiny_model("gemma3")
    model = SiteModel(loaded)
    norm_weight = model.final_norm.weight.detach()  # Gemma's RMSNorm scales by (1 + weight)
    w_u = loaded.model.get_output_embeddings().weight.detach().T
    n = interpreted.cfg.n_logits
    for e in interpreted.suite.entries:
        w_dec = interpreted.suite.load_sae(e["name"]).W_dec.detach()
        logits = (w_dec * (1 + norm_weight)) @ w_u
        up, down = logits.topk(n, dim=1), logits.topk(n, dim=1, largest=False)
        for j in range(e["d_sae"]):
            rec = feature(interpreted.suite, e["name"], j)
            for got, want in ((rec.logits_up, up), (rec.logits_down, down)):
                assert [t for t, _ in got] == [loaded.tokenizer.decode([int(i)]) for i in want.indices[j]]  # fmt: skip
                assert torch.allclose(torch.tensor([v for _, v in got]), want.values[j], rtol=1e-4, atol=1e-6)  # fmt: skip


def test_neighbours_and_cross_layer_matches_equal_a_brute_force_cosine_search(interpreted: Interpreted) -> None:  # fmt: skip
    suite = interpreted.suite
    (l0, l1) = [e["name"] for e in suite.entries]
    unit = {n: torch.nn.functional.normalize(suite.load_sae(n).W_dec.detach(), dim=1) for n in (l0, l1)}  # fmt: skip
    n = interpreted.cfg.n_neighbours
    for name, other, field in ((l0, l1, "next_layer"), (l1, l0, "prev_layer")):
        cross = (unit[name] @ unit[other].T).topk(n, dim=1)
        same = unit[name] @ unit[name].T
        same.fill_diagonal_(float("-inf"))
        within = same.topk(n, dim=1)
        for j in range(len(unit[name])):
            rec = feature(suite, name, j)
            got = getattr(rec, field)
            assert [(s, i) for s, i, _ in got] == [(other, int(i)) for i in cross.indices[j]]
            assert torch.allclose(torch.tensor([c for *_, c in got]), cross.values[j], atol=1e-5)
            assert [(s, i) for s, i, _ in rec.neighbours] == [(name, int(i)) for i in within.indices[j]]  # fmt: skip
            assert torch.allclose(torch.tensor([c for *_, c in rec.neighbours]), within.values[j], atol=1e-5)  # fmt: skip
        missing = "prev_layer" if field == "next_layer" else "next_layer"
        assert getattr(feature(suite, name, 0), missing) == []  # no layer -1 or 2 in this suite


def test_the_bf16_candidate_path_gives_the_exact_logit_lens() -> None:
    """Large vocabularies pick candidates in bf16 and rescore them in fp32: same lists, exact values."""
    from lmscope.interp.lens import lens_matrix, logit_lens

    model = SiteModel(tiny_model("gemma3"))
    directions = torch.nn.functional.normalize(torch.randn(300, model.unembedding.shape[0], generator=torch.Generator().manual_seed(0)), dim=1)  # fmt: skip
    exact = logit_lens(model, directions, 10, approx=False)
    fast = logit_lens(model, directions, 10, approx=True)
    for e, f in zip(exact[1::2], fast[1::2], strict=True):
        assert torch.equal(e, f)  # the same token ids in the same order
    for e, f in zip(exact[::2], fast[::2], strict=True):
        torch.testing.assert_close(e, f, rtol=1e-5, atol=1e-5)
    want = lens_matrix(model, directions) @ model.unembedding.detach().float()
    torch.testing.assert_close(fast[0], want.topk(10, dim=1).values, rtol=1e-5, atol=1e-5)
