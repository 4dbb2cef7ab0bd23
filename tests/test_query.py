
import pytest
import torch
import torch.nn.functional as F

from langfield.autoencoder import SceneAutoencoder
from langfield.query import (CANONICAL_PHRASES, QueryResult, TextQuery, box_filter, colormap, heatmap_overlay,
                             majority_filter, normalize_map, query_maps, recolor, relevancy, relevancy_maps,
                             result_from_maps, save_png, select_gaussians, split_levels)

D = 32


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


class TableDecoder(torch.nn.Module):
    """A decoder that maps latent (k, 0, 0) to feature table[k] exactly: a one-hot readout."""

    def __init__(self, table):
        super().__init__()
        self.table = table
        self.latent_dim = 3

    def forward(self, z):
        w = F.softmax(-((z[:, :1] - torch.arange(len(self.table)).float()) ** 2) * 50.0, dim=-1)
        return w @ self.table


# ------------------------------------------------------------------------------------------

def test_relevancy_matches_lerf_formula_elementwise():
    f = unit(4, 5, D, seed=1)
    pos = unit(3, D, seed=2)
    canon = unit(4, D, seed=3)
    r = relevancy(f, pos, canon)
    assert r.shape == (4, 5, 3)
    for i in range(4):
        for j in range(5):
            for q in range(3):
                vals = []
                for c in range(4):
                    logits = 10.0 * torch.stack([f[i, j] @ pos[q], f[i, j] @ canon[c]])
                    vals.append(torch.softmax(logits, 0)[0])
                assert r[i, j, q].item() == pytest.approx(min(vals).item(), abs=1e-6)
    r1 = relevancy(f, pos[1], canon)
    assert r1.shape == (4, 5) and torch.allclose(r1, r[..., 1])
    # a feature equal to the query beats random canonical phrases
    assert relevancy(pos[0], pos[0], canon) > 0.5


def test_text_query_caches_and_normalises():
    calls = []

    class Enc:
        def encode(self, texts):
            calls.append(list(texts))
            return torch.stack([torch.full((D,), float(len(t))) + torch.arange(D) for t in texts])

    tq = TextQuery(Enc())
    assert tq.canon.shape == (len(CANONICAL_PHRASES), D)
    e = tq.embed("red mug")
    assert e.shape == (D,) and e.norm().item() == pytest.approx(1.0)
    both = tq.embed(["red mug", "handle"])
    assert both.shape == (2, D) and torch.equal(both[0], e)
    tq.canon
    assert calls == [list(CANONICAL_PHRASES), ["red mug"], ["handle"]]


def test_chunked_decoding_equals_unchunked_and_valid_mask():
    torch.manual_seed(0)
    ae = SceneAutoencoder(in_dim=D, encoder_dims=(16,), latent_dim=3, decoder_dims=(8, 16)).eval()
    maps = {0: torch.randn(13, 11, 3), 1: torch.randn(13, 11, 3)}
    q, canon = unit(2, D, seed=4), unit(4, D, seed=5)
    full, keys = relevancy_maps(maps, ae, q, canon, chunk=10 ** 6)
    small, _ = relevancy_maps(maps, ae, q, canon, chunk=7)
    assert keys == [0, 1] and full.shape == (2, 2, 13, 11)
    assert torch.allclose(full, small, atol=1e-6)
    # against the plain decode path
    with torch.no_grad():
        ref = relevancy(ae.decode(maps[1]), q, canon)  # [H, W, Q]
    assert torch.allclose(full[:, 1], ref.permute(2, 0, 1), atol=1e-5)
    # a generic callable decoder and decoder=None on features give the same numbers
    gen, _ = relevancy_maps(maps, lambda z: ae.decode(z), q, canon, chunk=5)
    assert torch.allclose(gen, full, atol=1e-5)
    with torch.no_grad():
        feats = {k: ae.decode(v) for k, v in maps.items()}
    assert torch.allclose(relevancy_maps(feats, None, q, canon)[0], full, atol=1e-5)
    valid = torch.zeros(13, 11, dtype=torch.bool)
    valid[2:9, 3:7] = True
    part, _ = relevancy_maps(maps, ae, q, canon, chunk=6, valid=valid)
    assert torch.allclose(part[..., valid], full[..., valid], atol=1e-6)
    assert (part[..., ~valid] == 0).all()


def planted_scene(H=48, W=64):
    """Three feature kinds: background, the target (matches the query) and a distractor;
    level 1 has the target in a box, level 0 and 2 do not."""
    q = unit(D, seed=10)
    canon = unit(4, D, seed=11)
    bg = canon[2]  # background looks like "stuff": relevancy well below 0.5
    other = unit(D, seed=13)
    table = torch.stack([bg, q, other])
    dec = TableDecoder(table)
    z = torch.zeros(3, H, W, 3)
    z[0, 5:15, 40:60, 0] = 2  # a distractor on level 0
    z[1, 20:40, 10:30, 0] = 1  # the target on level 1
    return {f"l{i}": z[i] for i in range(3)}, dec, q, canon


def test_level_choice_point_and_mask_pick_the_planted_match():
    maps, dec, q, canon = planted_scene()
    res = query_maps(maps, dec, q, canon, smooth=9)
    assert isinstance(res, QueryResult)
    assert res.levels == ["l0", "l1", "l2"] and res.level == "l1" and res.level_index == 1
    x, y = res.point
    assert 10 <= x < 30 and 20 <= y < 40
    gt = torch.zeros(48, 64, dtype=torch.bool)
    gt[20:40, 10:30] = True
    iou = (res.mask & gt).sum() / (res.mask | gt).sum()
    assert iou > 0.8
    assert res.heatmap.min() >= 0 and res.heatmap.max() <= 1
    assert res.best.shape == (48, 64)
    # several queries in one pass: the list follows the queries
    other_q = F.normalize(dec.table[2], dim=-1)
    both = query_maps(maps, dec, torch.stack([q, other_q]), canon, smooth=9, texts=["target", "other"])
    assert [r.level for r in both] == ["l1", "l0"] and both[1].text == "other"
    assert torch.allclose(both[0].relevancy, res.relevancy)
    # decoding at stride 2 (block-averaged latents, bilinear upsampling) finds the same
    half = query_maps(maps, dec, q, canon, smooth=9, stride=2)
    assert half.level == "l1" and half.relevancy.shape == res.relevancy.shape
    assert ((half.mask & gt).sum() / (half.mask | gt).sum()) > 0.7
    odd = query_maps({k: v[:47, :63] for k, v in maps.items()}, dec, q, canon, smooth=9, stride=4,
                     valid=torch.ones(47, 63, dtype=torch.bool))
    assert odd.relevancy.shape == (3, 47, 63) and odd.level == "l1"


def test_mask_thresholding_on_a_synthetic_map():
    H, W = 40, 40
    yy, xx = torch.meshgrid(torch.arange(H).float(), torch.arange(W).float(), indexing="ij")
    rel = 0.3 + 0.4 * torch.exp(-((xx - 20) ** 2 + (yy - 20) ** 2) / (2 * 6.0 ** 2))
    res = result_from_maps(rel[None], smooth=1, threshold=0.4, majority=0)
    # normalised: clip(2 (m - min)/(max - min) - 1, 0, 1) > 0.4  <=>  (m - min)/(max - min) > 0.7
    n = (rel - rel.min()) / (rel.max() - rel.min())
    assert torch.equal(res.mask, n > 0.7)
    assert torch.allclose(res.heatmap, (2 * n - 1).clamp(0, 1), atol=1e-6)
    assert res.point == (20, 20)
    # a flat map selects nothing; a higher threshold selects less
    assert not result_from_maps(torch.full((1, 8, 8), 0.5)).mask.any()
    hi = result_from_maps(rel[None], smooth=1, threshold=0.8, majority=0)
    assert hi.mask.sum() < res.mask.sum() and (hi.mask <= res.mask).all()
    # majority filtering removes an isolated pixel and keeps a block
    m = torch.zeros(20, 20, dtype=torch.bool)
    m[3, 3] = True
    m[10:16, 10:16] = True
    f = majority_filter(m, 3)
    assert not f[3, 3] and f[11:15, 11:15].all()


def test_box_filter():
    x = torch.rand(2, 17, 23)
    assert torch.allclose(box_filter(x, 1), x)
    b = box_filter(x, 5)
    assert b.shape == x.shape
    assert b[0, 8, 10].item() == pytest.approx(x[0, 6:11, 8:13].mean().item(), abs=1e-6)
    assert torch.allclose(box_filter(torch.full((9, 9), 0.7), 29), torch.full((9, 9), 0.7))  # small images
    assert torch.allclose(normalize_map(torch.full((1, 4, 4), 3.0)), torch.zeros(1, 4, 4))


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("size", [2, 3, 4, 11, 21, 29, 30])
def test_box_filter_equals_window_means(size, native):
    """The running-sum box filter (the native lf_box_filter, and the torch one) = the mean of
    each window of the reflect-101 padded map (replicated borders when the image is smaller
    than the window)."""
    import torch.nn.functional as F

    from langfield.query import box_filter_torch

    fn = box_filter if native else box_filter_torch

    for H, W in ((48, 64), (7, 9)):
        x = torch.rand(3, H, W, generator=torch.Generator().manual_seed(size))
        a, b = (size - 1) // 2, size // 2
        mode = "reflect" if (H > max(a, b) and W > max(a, b)) else "replicate"
        pad = F.pad(x[:, None].double(), (b, a, b, a), mode=mode)
        ref = F.avg_pool2d(pad, size, stride=1)[:, 0].float()
        out = fn(x, size)
        assert out.shape == x.shape and out.dtype == torch.float32
        assert float((out - ref).abs().max()) <= (1e-7 if native else 1e-6), (size, H, W)


@pytest.mark.gpu
def test_box_filter_cuda_equals_cpu():
    """lf_box_filter's CUDA driver sums in the CPU driver's order: identical results."""
    x = torch.rand(3, 480, 640, generator=torch.Generator().manual_seed(0))
    for size in (2, 29):
        assert torch.equal(box_filter(x.cuda(), size).cpu(), box_filter(x, size))
    small = torch.rand(2, 7, 9)
    assert torch.equal(box_filter(small.cuda(), 29).cpu(), box_filter(small, 29))


def test_split_levels():
    r = torch.arange(2 * 3 * 9.0).reshape(2, 3, 9)
    d = split_levels(r, 3)
    assert list(d) == [0, 1, 2] and torch.equal(d[2], r[..., 6:])


def test_select_gaussians_picks_exactly_the_planted_ones():
    q = unit(D, seed=20)
    canon = unit(4, D, seed=21)
    table = torch.stack([canon[0], q, unit(D, seed=23)])
    dec = TableDecoder(table)
    N = 1000
    g = torch.Generator().manual_seed(0)
    planted = torch.zeros(N, dtype=torch.bool)
    planted[torch.randperm(N, generator=g)[:137]] = True
    lang = torch.zeros(N, 2, 3)  # two levels
    lang[:, 0, 0] = 2.0  # level 0: everything is the distractor
    lang[:, 1, 0] = torch.where(planted, 1.0, 0.0)  # level 1: planted ones match
    lang += 0.01 * torch.randn(N, 2, 3, generator=g)
    sel = select_gaussians(lang, dec, q, canon, chunk=64)
    assert sel.level == 1
    assert torch.equal(sel.mask, planted)
    mask, scores = sel
    assert scores.shape == (N,) and sel.level_scores.shape == (2, N)
    assert torch.equal(sel.indices, planted.nonzero().squeeze(1))
    # flat [N, levels * L] layout, explicit level, "max" over levels, normalised threshold
    flat = select_gaussians(lang.reshape(N, 6), dec, q, canon, level=1)
    assert torch.equal(flat.mask, planted) and torch.allclose(flat.scores, sel.scores)
    assert torch.equal(select_gaussians(lang, dec, q, canon, level="max").mask, planted)
    assert torch.equal(select_gaussians(lang, dec, q, canon, normalize=True, threshold=0.4).mask, planted)
    assert not select_gaussians(lang, dec, q, canon, level=0, normalize=False, threshold=0.5).mask.any()
    # several queries in one decode pass == one at a time
    q2 = unit(D, seed=24)
    many = select_gaussians(lang, dec, torch.stack([q, q2]), canon)
    assert len(many) == 2 and torch.equal(many[0].mask, sel.mask)
    assert torch.equal(many[1].scores, select_gaussians(lang, dec, q2, canon).scores)


def test_select_gaussians_with_autoencoder_chunks_agree():
    torch.manual_seed(0)
    ae = SceneAutoencoder(in_dim=D, encoder_dims=(16,), latent_dim=3, decoder_dims=(8, 16)).eval()
    lang = torch.randn(300, 9)
    q, canon = unit(D, seed=1), unit(4, D, seed=2)
    a = select_gaussians(lang, ae, q, canon, chunk=17)
    b = select_gaussians(lang, ae, q, canon, chunk=10 ** 6)
    assert a.level_scores.shape == (3, 300)
    assert torch.allclose(a.level_scores, b.level_scores, atol=1e-6)
    with torch.no_grad():
        ref = relevancy(ae.decode(lang.reshape(300, 3, 3)), q, canon)  # [N, 3]
    assert torch.allclose(a.level_scores, ref.t(), atol=1e-5)


def test_recolor_rgb_and_sh0():
    rgb = torch.rand(10, 3)
    m = torch.zeros(10, dtype=torch.bool)
    m[[1, 4]] = True
    out = recolor(rgb, m, (1, 0, 0), dim=0.5)
    assert torch.equal(out[m], torch.tensor([[1.0, 0, 0]] * 2))
    assert torch.allclose(out[~m], rgb[~m] * 0.5)
    assert torch.equal(rgb, rgb.clone())  # input untouched
    sh0 = torch.randn(10, 1, 3)
    out = recolor(sh0, m, (0, 1, 0), sh0=True)
    C0 = 0.28209479177387814
    assert torch.allclose(out[m] * C0 + 0.5, torch.tensor([0.0, 1, 0]).expand(2, 1, 3), atol=1e-6)
    assert torch.allclose(out[~m], sh0[~m], atol=1e-6)
    half = recolor(rgb, m, (1, 1, 1), blend=0.5)
    assert torch.allclose(half[m], (rgb[m] + 1) / 2)


def test_heatmap_overlay_and_png(tmp_path):
    from PIL import Image

    rgb = torch.rand(12, 16, 3)
    rel = torch.linspace(0, 1, 12 * 16).reshape(12, 16)
    out = heatmap_overlay(rgb, rel, alpha=0.5)
    assert out.shape == (12, 16, 3) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    mask = rel > 0.5
    out2 = heatmap_overlay((rgb * 255).to(torch.uint8), rel, mask=mask, dim=0.3)
    assert torch.allclose(out2[~mask], ((rgb * 255).to(torch.uint8).float() / 255 * 0.3)[~mask], atol=1e-6)
    c = colormap(torch.tensor([0.0, 0.5, 1.0]))
    assert c.shape == (3, 3)
    assert c[2, 0] > c[2, 2] and c[1, 1] > 0.8  # turbo: red end, green-ish middle
    assert colormap(torch.tensor([0.125]), 0, 1)[0].argmax() == 2  # blue at the low end
    save_png(tmp_path / "h.png", out)
    save_png(tmp_path / "m.png", mask)
    im = Image.open(tmp_path / "h.png")
    assert im.size == (16, 12) and im.mode == "RGB"
    assert Image.open(tmp_path / "m.png").mode == "L"
    with pytest.raises(ValueError):
        heatmap_overlay(rgb, rel[:5])
