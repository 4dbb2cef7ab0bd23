"""The sparse-codebook language mode (issue #15): the codec, the sparse channel path of the
renderer against dense rendering of the same coefficients (forward and gradients, CPU library
and torch reference), queries without a decoder, training on the tabletop scene against the
query bars, and a saved run's queries after a reload."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from langfield.codec import codec_class, codec_file, fit_codec, load_codec
from langfield.codec.codebook import CodebookCodec, kmeans_codebook, project_topk_simplex, topk_softmax
from langfield.render import rasterization
from langfield.render.sparse import dense_from_sparse, rasterize_sparse, render_sparse, sparse_topk
from langfield.render.synthetic import random_scene


def sparse_weights(N, levels, L, k, seed):
    """Random coefficients with exactly k non-zeros per level on the simplex."""
    g = torch.Generator().manual_seed(seed)
    w = torch.zeros(N, levels, L)
    for lv in range(levels):
        idx = torch.argsort(torch.rand(N, L, generator=g), dim=1)[:, :k]
        val = torch.rand(N, k, generator=g) + 0.05
        w[:, lv].scatter_(1, idx, val / val.sum(1, keepdim=True))
    return w.reshape(N, levels * L)


def dense_and_meta(s, weights, backend):
    col = weights.clone().requires_grad_(True)
    out, alpha, meta = rasterization(s.means, s.quats, s.scales, s.opacities, col, s.viewmats, s.Ks, s.width,
                                     s.height, backend=backend)
    return col, out, alpha, meta


def sparse_from_meta(meta, idx, w, n, backend):
    return rasterize_sparse(meta["means2d"].detach(), meta["conics"].detach(), idx, w, meta["opacities"].detach(),
                            meta["width"], meta["height"], meta["tile_size"], meta["isect_offsets"],
                            meta["flatten_ids"], n, backend=backend)


# ------------------------------------------------------------------ sparse = dense
@pytest.mark.parametrize("C", [1, 3])
@pytest.mark.parametrize("L,levels", [(64, 2), (128, 1)])
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_sparse_render_equals_dense_forward_and_gradient(C, L, levels, k):
    s = random_scene(300, C=C, width=45, height=34, D=3, seed=7 * C + k + L)
    n = levels * L
    weights = sparse_weights(300, levels, L, k, seed=k + L)
    col, dense, dense_alpha, meta = dense_and_meta(s, weights, "cpu")
    idx, w = sparse_topk(weights, L, k)
    w = w.clone().requires_grad_(True)
    sp, sp_alpha, _ = sparse_from_meta(meta, idx, w, n, "cpu")
    assert sp.shape == dense.shape == (C, s.height, s.width, n)
    scale = float(dense.detach().abs().max())
    assert scale > 0.1  # the scene is drawn
    assert float((sp - dense).detach().abs().max()) <= 1e-6 * scale
    assert torch.equal(sp_alpha, dense_alpha)
    G = torch.randn(dense.shape, generator=torch.Generator().manual_seed(1))
    (dense * G).sum().backward()
    (sp * G).sum().backward()
    ref = col.grad.gather(1, idx.long())  # the dense gradient at the pairs
    gscale = float(ref.abs().max())
    assert gscale > 0
    # the dense backward recovers T back to front (division by 1 - alpha): up to 3e-5 of the scale off
    # the float64 truth here, where the sparse backward (front to back, as the forward) stays within
    # 1e-6 (test_sparse_native_equals_torch_reference)
    assert float((w.grad - ref).abs().max()) <= 1e-4 * gscale, float((w.grad - ref).abs().max())


@pytest.mark.parametrize("k", [1, 3, 5, 6, 7])
def test_sparse_native_equals_torch_reference(k):
    s = random_scene(200, C=2, width=33, height=29, D=3, seed=k)
    L = 64
    weights = sparse_weights(200, 1, L, k, seed=100 + k)
    idx, w = sparse_topk(weights, L, k)
    _, _, _, meta = dense_and_meta(s, weights, "cpu")
    wn = w.clone().requires_grad_(True)
    wt = w.clone().requires_grad_(True)
    a, aa, _ = sparse_from_meta(meta, idx, wn, L, "cpu")
    b, ab, _ = sparse_from_meta(meta, idx, wt, L, "torch")
    assert float((a - b).detach().abs().max()) <= 2e-6 and float((aa - ab).detach().abs().max()) <= 2e-6
    G = torch.rand(a.shape, generator=torch.Generator().manual_seed(2))
    (a * G).sum().backward()
    (b * G).sum().backward()
    assert float((wn.grad - wt.grad).abs().max()) <= 1e-4 * float(wt.grad.abs().max())
    # against the float64 reference: the native sparse gradient is float32-accurate
    m = {n: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for n, v in meta.items()}
    w64 = w.detach().double().requires_grad_(True)
    r64, _, _ = sparse_from_meta(m, idx, w64, L, "torch")
    (r64 * G.double()).sum().backward()
    assert float((a.detach().double() - r64.detach()).abs().max()) <= 1e-6
    assert float((wn.grad.double() - w64.grad).abs().max()) <= 2e-6 * float(w64.grad.abs().max())


def test_sparse_unused_pairs_and_duplicates():
    s = random_scene(150, C=1, width=30, height=20, D=3, seed=3)
    L = 16
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, L, (150, 3), generator=g, dtype=torch.int32)
    idx[::4, 2] = -1  # unused pair
    idx[1::4, 1] = idx[1::4, 0]  # the same channel twice: the weights add
    w = torch.rand(150, 3, generator=g)
    dense = dense_from_sparse(idx, w, L)
    _, ref, _, meta = dense_and_meta(s, dense, "cpu")
    out, _, _ = sparse_from_meta(meta, idx, w, L, "cpu")
    assert float((out - ref.detach()).abs().max()) <= 1e-5 * float(ref.detach().abs().max())
    with pytest.raises(ValueError, match=r"channel indices must be in \[-1, 16\)"):
        sparse_from_meta(meta, idx.clamp_max(L - 1) + 1, w, L, "cpu")
    with pytest.raises(ValueError, match="weights only"):
        rasterize_sparse(meta["means2d"].detach().requires_grad_(True), meta["conics"], idx, w, meta["opacities"], 30, 20, 16,
                         meta["isect_offsets"], meta["flatten_ids"], L, backend="cpu")


def test_render_sparse_of_a_model_equals_render_language():
    from langfield.render.model import Cameras, render
    from langfield.scene import Gaussians

    s = random_scene(250, C=2, width=40, height=30, D=3, seed=11)
    L, k, levels = 32, 4, 3
    lang = sparse_weights(250, levels, L, k, seed=5)
    g = Gaussians(s.means, F.normalize(s.quats, dim=-1), s.scales.log(), torch.logit(s.opacities),
                  torch.rand(250, 1, 3), torch.zeros(250, 0, 3), lang=lang)
    cams = Cameras(s.viewmats, s.Ks, s.width, s.height)
    dense = render(g, cams, colors=False, language=True, backend="cpu")
    idx, w = sparse_topk(g.lang, L, k)
    a = render_sparse(g, cams, idx, w, levels * L, backend="cpu")  # own projection
    full = render(g, cams, language=True, depth=True, backend="cpu")
    b = render_sparse(g, cams, idx, w, levels * L, meta=full.meta)  # the colour pass's projection and tiles
    for o in (a, b):
        assert float((o.lang - dense.lang).abs().max()) <= 1e-6
        assert float((o.alpha - dense.alpha).abs().max()) <= 1e-6
    assert float((b.lang - full.lang).abs().max()) <= 1e-6


# ------------------------------------------------------------------ fused relevancy (queries without maps)
def codebook_and_embeddings(L, D=24, Q=2, C=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    cb = F.normalize(torch.randn(L, D, generator=g), dim=-1)
    E = F.normalize(torch.randn(Q + C, D, generator=g), dim=-1)
    return cb, E


@pytest.mark.parametrize("C,L,levels,k,tile,min_alpha", [(1, 64, 3, 4, 16, 0.5), (2, 16, 2, 3, 16, -1.0),
                                                         (1, 32, 1, 5, 8, 0.2), (1, 8, 2, 8, 5, 0.5)])
def test_fused_relevancy_equals_reference(C, L, levels, k, tile, min_alpha):
    """The fused op (coefficients blended and scored inside the tile) = the torch reference
    (dense maps, then cosines and LERF relevancy), with colour channels blended in the same pass
    exactly as rasterization() renders them."""
    from langfield.render.sparse import rasterize_sparse_relevancy, scores_to_relevancy

    s = random_scene(300, C=C, width=45, height=34, D=3, seed=C + L + k)
    weights = sparse_weights(300, levels, L, k, seed=k)
    col = torch.rand(C, 300, 4, generator=torch.Generator().manual_seed(2))
    bg = torch.rand(C, 4, generator=torch.Generator().manual_seed(3))
    dense_lang, alpha, meta = rasterization(s.means, s.quats, s.scales, s.opacities, weights, s.viewmats, s.Ks,
                                            s.width, s.height, backend="cpu", tile_size=tile)
    dense_col, _, _ = rasterization(s.means, s.quats, s.scales, s.opacities, col, s.viewmats, s.Ks, s.width,
                                    s.height, backend="cpu", tile_size=tile, backgrounds=bg)
    idx, w = sparse_topk(weights, L, k)
    cb, E = codebook_and_embeddings(L)
    A, G = cb @ E.t(), cb @ cb.t()
    args = (meta["means2d"].detach(), meta["conics"].detach(), idx, w, meta["opacities"].detach(), s.width, s.height,
            tile, meta["isect_offsets"], meta["flatten_ids"], levels, A, G, 2)
    ref = scores_to_relevancy(dense_lang, A, G, levels, 2, 10.0, alpha[..., 0], min_alpha)
    assert ref.shape == (C, 2, levels, s.height, s.width) and float(ref.std()) > 0.05
    for be in ("cpu", "torch"):
        rel, rgb, a = rasterize_sparse_relevancy(*args, min_alpha=min_alpha, colors=col, backgrounds=bg, backend=be)
        assert float((rel - ref).abs().max()) <= 2e-6, be
        assert float((rgb - dense_col).abs().max()) <= 1e-6 and float((a - alpha[..., 0]).abs().max()) <= 1e-6, be
        rel2, none, _ = rasterize_sparse_relevancy(*args, min_alpha=min_alpha, backend=be)  # no colour channels
        assert none is None and torch.equal(rel2, rel)
    # the native op's last-blended ids, wanted (tracked in the same pass) or not: the maps are the
    # same, and the ids are those of the sparse forward
    from langfield.render import native
    from langfield.render.sparse import _check_pairs

    sp_idx, sp_w = _check_pairs(idx, w, levels * L, C, 300)
    nat = (meta["means2d"].detach(), meta["conics"].detach(), sp_idx, sp_w, meta["opacities"].detach(), s.width,
           s.height, tile, meta["isect_offsets"], meta["flatten_ids"], levels, A, G, 2, 10.0, min_alpha)
    r1, c1, a1, last1 = native.rasterize_sparse_relevancy(*nat, colors=col, backgrounds=bg, want_last_ids=True)
    r0, c0, a0, last0 = native.rasterize_sparse_relevancy(*nat, colors=col, backgrounds=bg)
    _, _, last_fwd = native.rasterize_sparse(meta["means2d"].detach(), meta["conics"].detach(), sp_idx, sp_w,
                                             meta["opacities"].detach(), s.width, s.height, tile,
                                             meta["isect_offsets"], meta["flatten_ids"], levels * L)
    assert last0 is None and torch.equal(last1, last_fwd) and int((last1 >= 0).sum()) > 0
    assert torch.equal(r0, r1) and torch.equal(c0, c1) and torch.equal(a0, a1)
    # a non-finite colour adds only where its Gaussian blends (0 * inf stays out elsewhere): the
    # other pixels and channels are those of the finite colours, bit for bit, and nothing is NaN
    col_inf = col.clone()
    col_inf[:, 7, 1] = float("inf")
    _, rgb_inf, _ = rasterize_sparse_relevancy(*args, min_alpha=min_alpha, colors=col_inf, backgrounds=bg,
                                               backend="cpu")
    inf = torch.isinf(rgb_inf)
    assert bool(inf[..., 1].any()) and not bool(inf[..., [0, 2, 3]].any()) and not bool(torch.isnan(rgb_inf).any())
    assert torch.equal(rgb_inf[~inf], c1[~inf])
    if min_alpha > 0:
        empty = (alpha[..., 0] <= min_alpha)[:, None, None].expand_as(rel)
        assert bool(empty.any()) and bool((rel[empty] == 0).all()) and bool((rel[~empty] > 0).all())
    with pytest.raises(ValueError, match="must be"):
        rasterize_sparse_relevancy(*args[:-1], 5)  # Q = every column: no canonical phrase left


def codebook_field(N=600, L=16, k=4, levels=("subpart", "part", "whole"), dense_until_done=True, seed=0):
    """blob_field's geometry and text encoder with a codebook codec: each object's Gaussians use
    entries near its name's embedding (so queries find them), the background random ones."""
    import langfield.viewer  # noqa: F401
    from langfield.field import LanguageField
    from langfield.viewer.synthetic import blob_field

    base = blob_field(N // 3, n_background=N // 4, text_dim=32)
    g = base.gaussians
    n = g.num
    gen = torch.Generator().manual_seed(seed)
    names = base.text_encoder.encode(["red mug", "green ball", "blue box"])
    cb = F.normalize(torch.cat([names,
                                torch.randn(L - 3, 32, generator=gen)]), dim=-1)
    obj = torch.arange(n) // (N // 3)  # 0, 1, 2 objects, 3 background
    raw = torch.rand(n, len(levels), L, generator=gen)
    for o in range(3):
        raw[obj == o, :, o] += 3.0
    raw[obj == 3, :, :3] = -1.0  # the background never uses the names' entries
    w = project_topk_simplex(raw, k if dense_until_done else L).reshape(n, -1)
    codec = CodebookCodec(cb, topk=k).eval()
    return LanguageField(g.clone().set_lang(w, requires_grad=False), decoder=codec, text_encoder=base.text_encoder,
                         levels=list(levels), latent_dim=L, cameras=base.cameras, kind="memory", stage="language")


@pytest.mark.parametrize("k_sparse", [True, False])
def test_field_codebook_render_query_equals_dense_reference(k_sparse):
    """LanguageField on a codebook codec: render() draws colour + depth and keeps the sparse pass
    for later (latents on demand = the dense render within 1e-6, also for coefficients that are
    not k-sparse yet); query() through the fused pass = query_maps on the dense maps;
    render_query() (one pass) = render() + query(); a level given = that level's maps."""
    from langfield.field import LazyLatents
    from langfield.query import query_maps
    from langfield.render.model import Cameras, render

    f = codebook_field(dense_until_done=k_sparse)
    cam = f.cameras[0]
    texts = ["red mug", "green ball", "blue box"]
    r = f.render_camera(cam)
    assert isinstance(r.latents, LazyLatents) and not r.latents.computed and r.sparse is not None
    res = f.query(r, texts)
    assert not r.latents.computed  # the fused pass never made the coefficient maps
    full = render(f.gaussians, Cameras.of(cam.viewmat, cam.K, cam.width, cam.height), language=True, depth=True)
    assert torch.equal(r.rgb, full.rgb[0].clamp(0, 1)) and torch.equal(r.alpha, full.alpha[0])
    dense = {lv: full.lang[0][..., i * 16:(i + 1) * 16] for i, lv in enumerate(f.levels)}
    for lv in f.levels:
        assert float((r.latents[lv] - dense[lv]).abs().max()) <= 1e-6
    tq = f.text_query
    ref = query_maps(dense, f.codec, tq.embed(texts), tq.canon, valid=r.alpha > 0.5)
    r1, one = f.render_query(cam.viewmat, cam.K, cam.width, cam.height, texts)
    assert torch.equal(r1.rgb, r.rgb) and float((r1.depth - r.depth).abs().max()) <= 1e-6
    for x, y, z, name in zip(res, ref, one, texts):
        assert float((x.relevancy - y.relevancy).abs().max()) <= 1e-5
        assert x.level == y.level == z.level and x.point == y.point == z.point
        assert torch.equal(x.relevancy, z.relevancy) and torch.equal(x.mask, z.mask)
        assert x.text == name
    # the queries find their objects, left to right in camera 0's view: mug, ball, box
    assert res[0].point[0] < res[1].point[0] < res[2].point[0], [x.point for x in res]
    assert all(0.01 < float(x.mask.float().mean()) < 0.3 for x in res)
    one_level = f.query(r, "blue box", level="part")
    ref_level = query_maps({"part": dense["part"]}, f.codec, tq.embed("blue box"), tq.canon, valid=r.alpha > 0.5)
    assert one_level.levels == ["part"] and float((one_level.relevancy - ref_level.relevancy).abs().max()) <= 1e-5
    # stride > 1 (approximate, opt-in) takes the maps
    assert f.query(r, "blue box", stride=2).relevancy.shape == (3, cam.height, cam.width)


# ------------------------------------------------------------------ the codec
def test_projection_and_activation():
    v = torch.tensor([[0.3, -1.0, 2.0, 0.1, 0.5], [0.0, 0.0, 0.0, 0.0, 0.0], [5.0, 4.0, 3.0, 2.0, 1.0]])
    p = project_topk_simplex(v, 2)
    assert torch.allclose(p.sum(-1), torch.ones(3)) and bool((p >= 0).all())
    assert int((p > 0).sum(-1).max()) <= 2
    # row 0: top-2 = (2.0, 0.5) -> projection (1, 0); row 2: (5, 4) -> (1, 0)
    assert torch.allclose(p[0], torch.tensor([0, 0, 1.0, 0, 0])) and torch.allclose(p[2], torch.tensor([1.0, 0, 0, 0, 0]))
    assert torch.allclose(p[1].sort().values[-2:], torch.tensor([0.5, 0.5]))
    q = project_topk_simplex(torch.tensor([[0.5, 0.45, 0.0, 0.2]]), 3)  # top-3 sum 1.15: each loses 0.05
    assert torch.allclose(q, torch.tensor([[0.45, 0.4, 0.0, 0.15]]), atol=1e-6)
    assert torch.allclose(project_topk_simplex(q, 3), q, atol=1e-7)  # idempotent
    # against the projection by bisection on the threshold (float64), for whole rows (k = L) and
    # top-k, with ties and rows far off the simplex
    g = torch.Generator().manual_seed(4)
    for shape, k in (((500, 3, 4), 4), ((300, 16), 16), ((300, 16), 5)):
        x = torch.randn(*shape, generator=g) * torch.rand(*shape[:-1], 1, generator=g) * 3
        x[:20] = x[:20].round()  # ties
        sel, idx = x.topk(k, -1)
        sel = sel.double()
        lo, hi = sel.min(-1, keepdim=True).values - 1, sel.max(-1, keepdim=True).values
        for _ in range(200):
            mid = (lo + hi) / 2
            big = (sel - mid).clamp_min(0).sum(-1, keepdim=True) > 1
            lo, hi = torch.where(big, mid, lo), torch.where(big, hi, mid)
        p = project_topk_simplex(x, k)
        ref = torch.zeros_like(x, dtype=torch.float64).scatter_(-1, idx, (sel - lo).clamp_min(0))  # ties: topk's pick
        assert float((p.double() - ref).abs().max()) <= 2e-6 and int((p > 0).sum(-1).max()) <= k
        assert torch.allclose(p.sum(-1), torch.ones(shape[:-1]), atol=1e-5)
    # entries so large that u - 1 rounds to u in float32 (and +inf, counted as 1e30): one-hot
    big = torch.tensor([[1e8, 0.0, 0.0, 0.0], [float("inf"), 1.0, 0.0, 0.0], [3e7, 3e7 - 0.5, 0.0, 0.0]])
    for k in (4, 2):
        pb = project_topk_simplex(big, k)
        assert torch.equal(pb[:2], torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0]])), (k, pb)
        assert float(pb[2].sum()) == pytest.approx(1.0, abs=1e-6) and float(pb[2, 0]) >= 0.5
    w = topk_softmax(torch.tensor([[1.0, 3.0, 2.0, 0.0]]), 2)
    e = math.exp(1.0)
    assert torch.allclose(w, torch.tensor([[0.0, e / (1 + e), 1 / (1 + e), 0.0]]))
    codec = CodebookCodec(F.normalize(torch.randn(8, 16), dim=-1), topk=3)
    lang = project_topk_simplex(torch.rand(5, 2, 8), 3).reshape(5, 16)
    assert torch.allclose(codec.activate(lang.clamp_min(1e-30).log()), lang, atol=1e-6)  # log is the logits view


def test_training_schedule_moves_weights_to_the_right_entries():
    """The language stage's schedule on a toy: fresh zero coefficients projected with progress 0
    (uniform 1/L), Adam at the stage's default lr, projection after each step with step/steps
    (dense simplex for the first half, k-sparse after): every weight vector ends k-sparse on the
    simplex with its largest weight on the target's main entry."""
    g = torch.Generator().manual_seed(3)
    L, k, steps = 32, 4, 300
    codec = CodebookCodec(F.normalize(torch.randn(L, 64, generator=g), dim=-1), topk=k)
    z = torch.zeros(64, 2 * L)
    codec.project_(z, 0.0)
    assert torch.equal(z, torch.full_like(z, 1.0 / L))
    z.requires_grad_(True)
    main_ = torch.arange(64) % L
    t = F.normalize(0.8 * codec.codebook[main_] + 0.2 * codec.codebook[(main_ + 7) % L], dim=-1)
    opt = torch.optim.Adam([z], lr=0.0025, eps=1e-15)
    valid = torch.ones(1, 64, dtype=torch.bool)
    for step in range(1, steps + 1):
        loss = sum(codec.loss(z[None, :, i * L:(i + 1) * L], t[None], valid) for i in range(2))
        opt.zero_grad()
        loss.backward()
        opt.step()
        codec.project_(z.data, step / steps)
        if step == steps // 2 - 1:
            assert int((z > 0).reshape(64, 2, L).sum(-1).max()) > k  # dense phase
    w = z.detach().reshape(64, 2, L)
    assert int((w > 0).sum(-1).max()) <= k and float((w.sum(-1) - 1).abs().max()) < 1e-5
    assert bool((w.argmax(-1) == main_[:, None]).all())
    cos = (codec.decode(w) * t[:, None]).sum(-1)
    assert float(cos.min()) > 0.99, float(cos.min())


def test_codec_decode_scores_targets_loss_and_files(tmp_path):
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(6, 32, generator=g), dim=-1)
    lab = torch.randint(0, 6, (600,), generator=g)
    x = centres[lab] + 0.05 * torch.randn(600, 32, generator=g)
    ceiling = float((F.normalize(x, dim=-1) * centres[lab]).sum(-1).mean())  # cosine to the true centres
    codec, rep = fit_codec("codebook", [x[:300], x[300:]], latent_dim=12, seed=0, device="cpu", topk=2)
    assert isinstance(codec, CodebookCodec) and codec.kind == "codebook" and codec_class("codebook") is CodebookCodec
    assert (codec.in_dim, codec.latent_dim, codec.target_dim, codec.topk) == (32, 12, 32, 2)
    # k-means finds the 6 clusters: as close as the true centres (0.96 here)
    assert rep["heldout_cos"] > ceiling - 0.005 and rep["train_cos"] > ceiling - 0.005, (rep, ceiling)
    z = codec.encode(x[:50])
    assert z.shape == (50, 12) and int((z > 0).sum(-1).max()) <= 2 and torch.allclose(z.sum(-1), torch.ones(50))
    # decode_scores == decode @ emb.T, for any (dense) coefficients
    zz = torch.rand(40, 12, generator=g)
    emb = F.normalize(torch.randn(5, 32, generator=g), dim=-1)
    assert torch.allclose(codec.decode_scores(zz, emb), codec.decode(zz) @ emb.t(), atol=1e-5)
    t = codec.targets(x[:4] * 3)
    assert torch.allclose(t.norm(dim=-1), torch.ones(4))
    # loss: 0 at the truth, positive elsewhere, valid pixels only, gradient to the coefficients
    pred = torch.zeros(2, 2, 12)
    pred[..., 0] = 1.0
    target = codec.decode(pred)
    valid = torch.tensor([[True, True], [False, True]])
    assert float(codec.loss(pred, target, valid)) == pytest.approx(0.0, abs=1e-5)
    p2 = pred.clone()
    p2[1, 0] = torch.rand(12)  # an invalid pixel does not count
    assert float(codec.loss(p2, target, valid)) == pytest.approx(0.0, abs=1e-5)
    p3 = pred.clone().requires_grad_(True)
    bad = codec.decode(torch.eye(12)[[1, 1, 1, 1]].reshape(2, 2, 12))
    loss = codec.loss(p3, bad, valid)
    loss.backward()
    assert float(loss.detach()) > 0.1 and float(p3.grad.abs().sum()) > 0 and float(p3.grad[1, 0].abs().sum()) == 0
    assert float(codec.loss(pred, target, torch.zeros(2, 2, dtype=torch.bool))) == 0.0
    # files: safetensors + json, exact round trip
    path = codec.save(tmp_path / "codebook")
    assert path.endswith(".safetensors") and codec_file("codebook") == "codebook.safetensors"
    back = load_codec(tmp_path / "codebook", "codebook")
    assert torch.equal(back.codebook, codec.codebook) and back.topk == 2 and back.report["n_train"] == rep["n_train"]
    assert torch.equal(back.decode_scores(zz, emb), codec.decode_scores(zz, emb))
    doc = json.loads((tmp_path / "codebook.json").read_text())
    assert doc["config"]["format"] == "langfield-codebook"
    # a file of another kind, bad sizes: one-line errors naming the file
    from langfield.io.checkpoint import CheckpointError, save_checkpoint

    save_checkpoint(str(tmp_path / "bad.safetensors"), {"codebook": torch.rand(4, 8)},
                    config={"format": "langfield-codebook", "model": {"in_dim": 9, "latent_dim": 4}})
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: field 'model'"):
        load_codec(tmp_path / "bad", "codebook")
    with pytest.raises(CheckpointError, match="not a langfield codebook"):
        from langfield.codec.autoencoder import SceneAutoencoder

        SceneAutoencoder(32, (8,), 3, (8,)).save(tmp_path / "ae")
        load_codec(tmp_path / "ae", "codebook")
    with pytest.raises(ValueError, match="topk must be in 1..12"):
        fit_codec("codebook", [x], latent_dim=12, topk=13, device="cpu")


def test_loss_projected_and_view_init():
    """The language stage's loss in the codebook's coordinates equals 1 - cos of the decoded
    features (in_dim-sized) and its gradient; the view initialisation picks the entries nearest
    to the mean target and fills Gaussians no view shows with their level's mean."""
    g = torch.Generator().manual_seed(5)
    L, D = 12, 40
    codec = CodebookCodec(F.normalize(torch.randn(L, D, generator=g), dim=-1), topk=3)
    z = project_topk_simplex(torch.rand(4, 5, L, generator=g), 3).requires_grad_(True)
    t = codec.targets(torch.randn(4, 5, D, generator=g))
    valid = torch.rand(4, 5, generator=g) > 0.3
    tc = codec.project_targets(t)
    assert tc.shape == (4, 5, L) and torch.allclose(tc, t @ codec.codebook.t(), atol=1e-6)
    a = codec.loss_projected(z, tc, valid)
    ga, = torch.autograd.grad(a, z)
    f = codec.decode(z)
    ref = (1 - (f * t).sum(-1))[valid].mean()
    gr, = torch.autograd.grad(ref, z)
    assert float(a) == pytest.approx(float(ref), abs=1e-6) and torch.allclose(ga, gr, atol=1e-6)
    assert float(codec.loss_projected(z, tc, torch.zeros_like(valid))) == 0.0
    # view init: Gaussian 0 shows entry 7 at level 0 and entry 2 at level 1; Gaussian 1 is unseen at level 1
    G = codec.gram()
    mean_tc = torch.stack([torch.cat([G[7], G[2]]), torch.cat([G[4], torch.zeros(L)]), torch.cat([G[5], G[9]])])
    seen = torch.tensor([[True, True], [True, False], [True, True]])
    w = codec.init_weights(mean_tc, seen).reshape(3, 2, L)
    assert int((w > 0).sum(-1).max()) == 3 and torch.allclose(w.sum(-1), torch.ones(3, 2))
    assert int(w[0, 0].argmax()) == 7 and int(w[0, 1].argmax()) == 2 and int(w[2, 1].argmax()) == 9
    fill = codec.init_weights(((G[2] + G[9]) / 2).repeat(2)[None], torch.ones(1, 2, dtype=torch.bool))
    assert torch.allclose(w[1, 1], fill.reshape(2, L)[1])  # unseen: the level's mean over the seen Gaussians


def test_kmeans_with_fewer_distinct_points_than_entries():
    x = F.normalize(torch.eye(5, 16), dim=-1).repeat(20, 1)
    C, rep = kmeans_codebook(x, 8, iters=10, seed=1)
    assert C.shape == (8, 16) and torch.isfinite(C).all()
    assert rep["mean_cos"] == pytest.approx(1.0, abs=1e-6)  # every point has its exact centre


# ------------------------------------------------------------------ training on the tabletop scene
LANG_STEPS = 600
CODEBOOK_SIZE = 64  # the language stage's defaults for a codebook: L = 64, k = 4, lr 0.01, sparse training
TOPK = 4


@pytest.fixture(scope="module")
def codebook_run(tmp_path_factory):
    """Tabletop at the size of tests/test_language.py's demo (96x96, 16 views, 300 RGB steps; 600
    language steps instead of 1000), language stage with the codebook codec at its defaults (L=64,
    k=4, lr 0.01: coefficients from the views, k pairs per level trained through the sparse pass)."""
    import langfield.train.language as LL
    from langfield.scenes import make_scene
    from langfield.train.rgb import train_rgb

    out = tmp_path_factory.mktemp("codebook")
    data, run = out / "data", out / "run"
    make_scene("tabletop", data, views=16, size="96x96", progress=False, workers=1)
    train_rgb(data, run, steps=300, device="cpu", progress=False, evaluate=False)
    res = LL.train_language(run, features="labels", codec="codebook", steps=LANG_STEPS, ae_steps=30,
                            text_encoder="offline", device="cpu", progress=False, ckpt_every=LANG_STEPS,
                            log=lambda *_: None)
    return out, res


@pytest.mark.slow
def test_codebook_training_meets_the_query_bars(codebook_run):
    out, res = codebook_run
    m = res["metrics"]
    prim = m[m["primary"]]
    # the autoencoder at this size (bench/query.py --quality, 1000 steps): loc 0.84, mIoU 0.31, 3D 0.64;
    # the codebook at its defaults must not be lower by more than 0.01 (issue #15)
    assert m["primary"] == "names" and prim["n"] >= 20
    assert prim["loc"] >= 0.83, prim
    assert prim["miou"] >= 0.30, prim
    assert prim["miou_3d"] >= 0.63, prim
    run = out / "run"
    doc = json.loads((run / "config.json").read_text())
    lang = doc["language"]
    assert lang["codec"] == {"kind": "codebook", "file": "codebook.safetensors"} and lang["latent_dim"] == CODEBOOK_SIZE
    assert lang["config"]["lr"] == 0.01 and lang["config"]["codebook_train"] == "sparse"  # defaults, stored resolved
    assert (run / "codebook.safetensors").is_file() and (run / "codebook.json").is_file()
    from langfield.field import LanguageField

    f = LanguageField.load(run, device="cpu")
    assert isinstance(f.codec, CodebookCodec) and f.gaussians.lang.shape[1] == 3 * CODEBOOK_SIZE
    w = f.gaussians.lang.reshape(f.num, 3, CODEBOOK_SIZE)
    assert int((w > 0).sum(-1).max()) <= TOPK and bool((w >= 0).all())  # k-sparse ...
    assert float((w.sum(-1) - 1).abs().max()) < 1e-5  # ... on the simplex


@pytest.mark.slow
def test_sparse_codebook_training_resumes_exactly(codebook_run, tmp_path):
    """The sparse training (coefficients from the views, k pairs per level through the sparse
    pass): 2 x 15 steps with a resume = 30 steps in one go, bit for bit; the pair indices stay
    where the view initialisation put them (saved with the checkpoint)."""
    import shutil

    import langfield.train.language as LL
    from langfield.io.checkpoint import load_checkpoint

    out, _ = codebook_run
    base = tmp_path / "base"
    shutil.copytree(out / "run", base, ignore=shutil.ignore_patterns("language", "renders", "codebook.*",
                                                                     "metrics.json"))
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(base, a)
    shutil.copytree(base, b)
    opts = dict(features="labels", codec="codebook", latent_dim=CODEBOOK_SIZE, ae_steps=30, text_encoder="offline",
                device="cpu", progress=False, evaluate=False, log=lambda *_: None, ckpt_every=15)
    LL.train_language(a, steps=30, **opts)
    LL.train_language(b, steps=15, **opts)
    LL.train_language(b, steps=30, resume=True, **opts)
    ca = load_checkpoint(sorted((a / "language" / "checkpoints").glob("*.safetensors"))[-1])
    cb_ = load_checkpoint(sorted((b / "language" / "checkpoints").glob("*.safetensors"))[-1])
    la, lb = ca.tensors["splats"]["lang"], cb_.tensors["splats"]["lang"]
    assert ca.step == cb_.step == 30 and torch.equal(la, lb)
    sup = ca.tensors["sparse"]["support"].long()
    assert torch.equal(sup, cb_.tensors["sparse"]["support"].long())
    off = torch.ones_like(la, dtype=torch.bool).scatter_(1, sup, False)
    assert bool((la[off] == 0).all())  # only the pairs' entries are non-zero
    w = la.reshape(la.shape[0], 3, CODEBOOK_SIZE)
    assert float((w.sum(-1) - 1).abs().max()) < 1e-5 and bool((w >= 0).all())


@pytest.mark.slow
def test_saved_run_gives_identical_queries_and_sparse_render(codebook_run, tmp_path):
    import shutil

    from langfield.cli import main
    from langfield.eval.language import load_queries
    from langfield.field import LanguageField
    from langfield.render.model import Cameras

    out, _ = codebook_run
    run = out / "run"
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)
    a, b = LanguageField.load(run, device="cpu"), LanguageField.load(moved, device="cpu")
    qs = load_queries(out / "data" / "queries.json")
    view = qs.views[0]
    texts = [q.text for q in view.queries]
    cam = next(c for c in a.cameras if c.name == view.name)
    ra, rb = a.render_camera(cam), b.render_camera(cam)
    for x, y in zip(a.query(ra, texts), b.query(rb, texts)):
        assert torch.equal(x.relevancy, y.relevancy) and x.level == y.level and torch.equal(x.mask, y.mask)
    for x, y in zip(a.select(texts), b.select(texts)):
        assert torch.equal(x.mask, y.mask) and x.level == y.level and int(x.mask.sum()) > 0
    # the sparse pass gives the dense render's coefficients and the same query answers
    from langfield.query import query_maps
    from langfield.render.model import render

    idx, w = a.codec.sparse(a.gaussians.lang)
    cams = Cameras.of(cam.viewmat, cam.K, cam.width, cam.height)
    sp = render_sparse(a.gaussians, cams, idx, w, a.gaussians.lang_dim).lang[0]
    dense = render(a.gaussians, cams, language=True).lang[0]
    assert float((sp - dense).abs().max()) <= 1e-6
    lazy = torch.cat([ra.latents[lv] for lv in a.levels], -1)  # the field's render: the sparse pass on demand
    assert float((lazy - dense).abs().max()) <= 1e-6
    tq = a.text_query
    ref = query_maps({lv: dense[..., i * CODEBOOK_SIZE:(i + 1) * CODEBOOK_SIZE] for i, lv in enumerate(a.levels)},
                     a.codec, tq.embed(texts), tq.canon, valid=ra.alpha > 0.5)
    _, one = a.render_query(cam.viewmat, cam.K, cam.width, cam.height, texts)
    for x, y, z in zip(a.query(ra, texts), ref, one):  # fused pass = decode of the dense maps = one-pass frame
        assert float((x.relevancy - y.relevancy).abs().max()) <= 1e-5 and x.level == y.level == z.level
        assert torch.equal(x.relevancy, z.relevancy) and torch.equal(x.mask, z.mask)
    q = next(q for q in view.queries if q.text == "red mug")
    gt = torch.from_numpy(q.mask)
    res = a.query(ra, q.text)
    assert res.heatmap[gt].mean() > res.heatmap[~gt].mean() + 0.3
    # export with its sidecar opens as a field with the same 3D selection
    ply = tmp_path / "scene.ply"
    assert main(["export", str(run), "--ply", str(ply)]) == 0
    p = LanguageField.load(ply, device="cpu")
    assert isinstance(p.codec, CodebookCodec) and p.levels == a.levels
    assert torch.equal(p.select("red mug").mask, a.select("red mug").mask)
