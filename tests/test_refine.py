"""Refinement: sparse vs dense random walk, affinity labels and pairs, affinity loss, AffinityNet, dense CRF."""
import math

import numpy as np
import pytest
import torch

from wsss.config import Config
from wsss.models.affinity_net import AffinityNet, affinity_loss, pair_affinities
from wsss.refine.affinity_labels import affinity_labels, grid_labels, pair_sets
from wsss.refine.crf import crf_inference
from wsss.refine.random_walk import (neighbor_offsets, pool_to_grid, radius_for_num_offsets, random_walk,
                                     random_walk_dense, rw_background, transition_weights, upsample_from_grid,
                                     valid_pair_mask, walk_cam)


# ---- neighbourhood -------------------------------------------------------------------------------------

def test_neighbor_offsets_half_disk():
    offs = neighbor_offsets(5)
    assert len(offs) == 34  # AffinityNet radius 5
    assert len(set(offs)) == len(offs)
    full = set(offs) | {(-dy, -dx) for dy, dx in offs} | {(0, 0)}
    disk = {(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5) if dy * dy + dx * dx < 25}
    assert full == disk
    assert not (set(offs) & {(-dy, -dx) for dy, dx in offs})
    assert radius_for_num_offsets(34) == 5 and radius_for_num_offsets(len(neighbor_offsets(2))) == 2
    with pytest.raises(ValueError):
        radius_for_num_offsets(35)


# ---- random walk ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("h,w,radius", [(6, 7, 2), (9, 8, 3), (12, 10, 5), (3, 4, 5), (1, 9, 3)])
@pytest.mark.parametrize("beta,logt", [(1.0, 0), (8.0, 3), (8.0, 6), (2.5, 4)])
def test_sparse_matches_dense_float64(h, w, radius, beta, logt):
    g = torch.Generator().manual_seed(h * 100 + w * 10 + radius)
    P = len(neighbor_offsets(radius))
    probs = torch.rand(4, h, w, generator=g, dtype=torch.float64)
    aff = torch.rand(P, h, w, generator=g, dtype=torch.float64)
    sparse = random_walk(probs, aff, radius, beta, logt)
    dense = random_walk_dense(probs, aff, radius, beta, logt)
    assert sparse.shape == probs.shape
    assert (sparse - dense).abs().max().item() <= 1e-4
    # much tighter in float64; this guards against an accidental loose agreement
    assert (sparse - dense).abs().max().item() <= 1e-10


def test_sparse_matches_dense_float32_default_params():
    g = torch.Generator().manual_seed(3)
    h, w, r = 16, 14, 5
    probs = torch.rand(3, h, w, generator=g)
    aff = torch.rand(len(neighbor_offsets(r)), h, w, generator=g)
    sparse = random_walk(probs, aff, r, beta=8.0, logt=8)
    dense = random_walk_dense(probs, aff, r, beta=8.0, logt=8)
    assert (sparse - dense).abs().max().item() <= 1e-4


def test_transition_weights_are_normalised_and_symmetric_pairs():
    g = torch.Generator().manual_seed(0)
    h, w, r = 7, 9, 3
    aff = torch.rand(len(neighbor_offsets(r)), h, w, generator=g, dtype=torch.float64)
    W, full = transition_weights(aff, r, beta=2.0)
    assert torch.allclose(W.sum(0), torch.ones(h, w, dtype=torch.float64))
    assert full[0] == (0, 0) and len(full) == 2 * len(neighbor_offsets(r)) + 1
    # weights towards out-of-grid partners vanish
    assert W[:, 0, 0][[k for k, (dy, dx) in enumerate(full) if dy < 0 or dx < 0]].abs().max() == 0


def _neighbour_mean(v: torch.Tensor, radius: int) -> torch.Tensor:
    C, h, w = v.shape
    out = torch.zeros_like(v)
    for y in range(h):
        for x in range(w):
            vals = [v[:, yy, xx] for yy in range(h) for xx in range(w)
                    if (yy - y) ** 2 + (xx - x) ** 2 < radius ** 2]
            out[:, y, x] = torch.stack(vals).mean(0)
    return out


@pytest.mark.parametrize("beta,aff_value", [(0.0, None), (8.0, 1.0)])
def test_uniform_walk_averages(beta, aff_value):
    """beta = 0 (or all affinities 1): one step is the plain mean over the pixel's reach; many steps make every
    pixel equal to the degree-weighted global mean (the walk conserves sum_i deg_i v_i)."""
    g = torch.Generator().manual_seed(1)
    h, w, r = 6, 8, 3
    P = len(neighbor_offsets(r))
    v = torch.rand(2, h, w, generator=g, dtype=torch.float64)
    aff = torch.rand(P, h, w, generator=g, dtype=torch.float64) if aff_value is None else \
        torch.full((P, h, w), aff_value, dtype=torch.float64)
    one = random_walk(v, aff, r, beta=beta, steps=1)
    assert torch.allclose(one, _neighbour_mean(v, r), atol=1e-12)
    deg = 1 + valid_pair_mask(h, w, r).sum(0).double()
    deg = deg + torch.stack([valid_pair_mask(h, w, r)[p].flip(0).flip(1) for p in range(P)]).sum(0).double()
    limit = (v * deg).sum((1, 2)) / deg.sum()
    far = random_walk(v, aff, r, beta=beta, logt=10)
    assert torch.allclose(far, limit.view(2, 1, 1).expand_as(far), atol=1e-9)
    assert far.std((1, 2)).max() < 1e-9
    # the plain global mean differs (border pixels have fewer neighbours), so the test is not vacuous
    assert not torch.allclose(limit, v.mean((1, 2)), atol=1e-6)


def test_walk_propagates_along_high_affinity_only():
    """Two regions joined by affinity 1 inside and 0 across: scores never cross the cut."""
    h, w, r = 6, 10, 3
    offs = neighbor_offsets(r)
    region = torch.zeros(h, w, dtype=torch.long)
    region[:, 5:] = 1
    aff = torch.zeros(len(offs), h, w, dtype=torch.float64)
    for p, (dy, dx) in enumerate(offs):
        for y in range(h):
            for x in range(w):
                if 0 <= y + dy < h and 0 <= x + dx < w and region[y, x] == region[y + dy, x + dx]:
                    aff[p, y, x] = 1.0
    v = torch.zeros(1, h, w, dtype=torch.float64)
    v[0, 2, 1] = 1.0  # a seed in the left region
    out = random_walk(v, aff, r, beta=8.0, logt=6)
    assert out[0][region == 1].abs().max() == 0
    assert out[0][region == 0].min() > 0


def test_random_walk_checks_shapes():
    with pytest.raises(ValueError, match="offsets"):
        random_walk(torch.rand(2, 5, 5), torch.rand(3, 5, 5), radius=5)
    with pytest.raises(ValueError, match="grid"):
        random_walk(torch.rand(2, 5, 5), torch.rand(34, 5, 6), radius=5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_random_walk_cuda_matches_cpu():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(3, 20, 24, generator=g)
    aff = torch.rand(34, 20, 24, generator=g)
    cpu = random_walk(probs, aff, 5, 8.0, 8)
    gpu = random_walk(probs.cuda(), aff.cuda(), 5, 8.0, 8).cpu()
    assert (cpu - gpu).abs().max() <= 1e-4


def test_rw_background_and_grid_helpers():
    cam = np.zeros((2, 4, 4), np.float32)
    cam[0, 0, 0] = 1.0
    cam[1, 1, 1] = 0.5
    bg = rw_background(cam, 2.0)
    assert bg[0, 0] == 0 and bg[1, 1] == pytest.approx(0.25) and bg[3, 3] == 1
    assert rw_background(np.zeros((0, 3, 5)), 16.0).shape == (3, 5)
    t = torch.rand(2, 19, 21)
    grid = pool_to_grid(t, (3, 3))
    assert grid.shape == (2, 3, 3)
    assert torch.allclose(grid[:, 0, 0], t[:, :8, :8].mean((1, 2)))
    const = torch.full((3, 4, 5), 0.3)
    assert torch.allclose(upsample_from_grid(const, (30, 37)), torch.full((3, 30, 37), 0.3))


def test_walk_cam_returns_normalised_probs_with_background_first():
    g = torch.Generator().manual_seed(0)
    cam = torch.rand(2, 37, 45, generator=g)
    aff = torch.rand(34, 5, 6, generator=g)
    probs = walk_cam(cam, aff, radius=5, beta=8, logt=4, bg_alpha=16)
    assert probs.shape == (3, 37, 45)
    assert torch.allclose(probs.sum(0), torch.ones(37, 45), atol=1e-5)


# ---- affinity labels ----------------------------------------------------------------------------------------

def _rings_cam(size=64):
    yy, xx = np.mgrid[:size, :size]
    d = np.sqrt((yy - size / 2) ** 2 + (xx - size / 2) ** 2)
    cam = np.zeros((1, size, size), np.float32)
    cam[0][d < 26] = 0.15   # uncertain: (1-m)^4 = 0.52 > m (low alpha: bg), (1-m)^24 = 0.02 < m (high: fg)
    cam[0][d < 12] = 0.9    # confident foreground
    return cam, d


def test_affinity_labels_leave_uncertain_band_at_255():
    cam, d = _rings_cam()
    image = np.full((64, 64, 3), 128, np.uint8)
    label = affinity_labels(image, cam, np.array([7]), low_alpha=4, high_alpha=24)
    assert label.dtype == np.uint8 and label.shape == (64, 64)
    assert np.all(label[d < 8] == 7)
    assert np.all(label[(d > 16) & (d < 22)] == 255)
    assert np.all(label[d > 30] == 0)
    assert set(np.unique(label)) <= {0, 7, 255}


def test_affinity_labels_without_classes_and_size_check():
    image = np.zeros((10, 12, 3), np.uint8)
    assert np.all(affinity_labels(image, np.zeros((0, 10, 12), np.float32), np.zeros(0)) == 0)
    with pytest.raises(ValueError, match="does not match"):
        affinity_labels(image, np.zeros((1, 10, 11), np.float32), np.array([1]))


def test_grid_labels_nearest_centre():
    lab = np.arange(16 * 16).reshape(16, 16)
    g = grid_labels(lab, (2, 2))
    assert g.tolist() == [[lab[4, 4], lab[4, 12]], [lab[12, 4], lab[12, 12]]]
    gt = grid_labels(torch.from_numpy(lab), (2, 2))
    assert gt.tolist() == g.tolist()


def test_pair_sets_drop_ignored_and_out_of_grid():
    lab = torch.tensor([[0, 0, 1], [255, 1, 1]])
    bg, fg, neg = pair_sets(lab, radius=2)   # offsets (0,1), (1,-1), (1,0), (1,1)
    offs = neighbor_offsets(2)
    assert offs == ((0, 1), (1, -1), (1, 0), (1, 1))
    assert bg.shape == (4, 2, 3)
    pairs = {(p, y, x): ("bg" if bg[p, y, x] else "fg" if fg[p, y, x] else "neg" if neg[p, y, x] else None)
             for p in range(4) for y in range(2) for x in range(3)}
    assert pairs[(0, 0, 0)] == "bg"      # (0,0)-(0,1): 0-0
    assert pairs[(0, 0, 1)] == "neg"     # (0,1)-(0,2): 0-1
    assert pairs[(0, 1, 1)] == "fg"      # (1,1)-(1,2): 1-1
    assert pairs[(2, 0, 0)] is None      # (0,0)-(1,0): touches 255
    assert pairs[(0, 1, 0)] is None      # starts at 255
    assert pairs[(0, 0, 2)] is None      # partner outside the grid
    assert pairs[(3, 0, 1)] == "neg"     # (0,1)-(1,2): 0-1
    assert pairs[(1, 0, 2)] == "fg"      # (0,2)-(1,1): 1-1
    # by hand: bg {(0,0)-(0,1)}; fg {(0,2)-(1,1), (0,2)-(1,2), (1,1)-(1,2)}; neg {(0,0)-(1,1), (0,1)-(0,2),
    # (0,1)-(1,1), (0,1)-(1,2)}; the three pairs with (1,0) = 255 dropped
    assert (int(bg.sum()), int(fg.sum()), int(neg.sum())) == (1, 3, 4)


# ---- AffinityNet and its loss -------------------------------------------------------------------------------

def test_affinity_loss_hand_example():
    lab = torch.tensor([[0, 0, 1]])
    aff = torch.zeros(1, 4, 1, 3)
    aff[0, 0, 0, 0] = 0.5   # bg-positive pair
    aff[0, 0, 0, 1] = 0.25  # negative pair
    loss, terms = affinity_loss(aff, lab.unsqueeze(0))
    want = -math.log(0.5) / 4 + 0.0 / 4 + -math.log(0.75) / 2
    assert loss.item() == pytest.approx(want, abs=1e-4)
    assert int(terms["n_bg"]) == 1 and int(terms["n_fg"]) == 0 and int(terms["n_neg"]) == 1
    assert terms["fg"].item() == 0.0  # empty set guarded
    # perfect affinities give ~0 loss; swapped ones a large loss
    good = aff.clone()
    good[0, 0, 0, 0], good[0, 0, 0, 1] = 1.0, 0.0
    bad = aff.clone()
    bad[0, 0, 0, 0], bad[0, 0, 0, 1] = 0.0, 1.0
    assert affinity_loss(good, lab.unsqueeze(0))[0].item() < 1e-4
    assert affinity_loss(bad, lab.unsqueeze(0))[0].item() > 5


def test_affinity_loss_all_ignored_is_zero_not_nan():
    lab = torch.full((1, 4, 4), 255)
    loss, _ = affinity_loss(torch.rand(1, 34, 4, 4), lab)
    assert loss.item() == 0.0


def _tiny_cfg():
    cfg = Config()
    cfg.model.backbone = "tiny"
    cfg.model.width = 8
    return cfg


def test_affinity_net_forward_loss_backward():
    torch.manual_seed(0)
    net = AffinityNet(_tiny_cfg().model)
    x = torch.randn(2, 3, 64, 48)
    out = net(x)
    assert out["aff"].shape == (2, 34, 8, 6)
    assert out["feat"].shape == (2, 448, 8, 6)
    valid = out["valid"]
    assert torch.all(out["aff"][:, ~valid] == 0)
    assert torch.all((out["aff"][:, valid] > 0) & (out["aff"][:, valid] <= 1))
    # a_ij computed from the features directly, for one pair (offset (1, 0) at (2, 3))
    p = neighbor_offsets(5).index((1, 0))
    f = out["feat"][0]
    want = torch.exp(-(f[:, 2, 3] - f[:, 3, 3]).abs().mean())
    assert torch.allclose(out["aff"][0, p, 2, 3], want, atol=1e-6)
    labels = torch.randint(0, 3, (2, 64, 48))
    labels[:, :16] = 255
    loss, _ = affinity_loss(out["aff"], labels)
    loss.backward()
    assert net.embed.weight.grad is not None and net.embed.weight.grad.abs().sum() > 0
    groups = {g["name"]: g for g in net.param_groups(0.1, 5e-4)}
    assert groups["new_weight"]["lr_mult"] == 10 and groups["backbone_weight"]["lr_mult"] == 1
    n_new = sum(p.numel() for p in groups["new_weight"]["params"])
    assert n_new == sum(p.numel() for m in (net.proj4, net.proj5, net.proj6, net.embed) for p in m.parameters())


def test_pair_affinities_identical_features_are_one():
    feat = torch.ones(1, 5, 4, 4)
    aff = pair_affinities(feat, 3)
    valid = valid_pair_mask(4, 4, 3)
    assert torch.all(aff[0][valid] == 1) and torch.all(aff[0][~valid] == 0)


# ---- dense CRF ------------------------------------------------------------------------------------------------

def _two_colour_image(h=48, w=64, seed=0):
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.int32)
    img[:, : w // 2] = (200, 40, 40)
    img[:, w // 2:] = (30, 60, 220)
    return np.clip(img + rng.integers(-8, 9, img.shape), 0, 255).astype(np.uint8)


def test_crf_keeps_confident_input():
    rng = np.random.default_rng(1)
    h, w = 40, 52
    image = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
    lab = np.zeros((h, w), int)
    lab[5:25, 4:20] = 1
    lab[18:38, 28:50] = 2
    probs = np.eye(3, dtype=np.float32)[lab].transpose(2, 0, 1)
    q = crf_inference(image, probs, Config().crf)
    assert q.shape == probs.shape and q.dtype == np.float32
    assert np.allclose(q.sum(0), 1, atol=1e-4)
    assert np.array_equal(q.argmax(0), lab)


def test_crf_snaps_blurred_boundary_to_image_edge():
    h, w = 48, 64
    image = _two_colour_image(h, w)
    x = np.arange(w)
    # soft ramp whose 0.5 crossing sits 8 px right of the colour edge at x = 32
    p1 = np.tile(1 / (1 + np.exp(-(x - 40) / 6.0)), (h, 1)).astype(np.float32)
    probs = np.stack([1 - p1, p1])
    truth = np.tile(x >= w // 2, (h, 1))
    before = np.mean((probs.argmax(0) == 1) == truth)
    q = crf_inference(image, probs, Config().crf)
    after = np.mean((q.argmax(0) == 1) == truth)
    assert before < 0.9
    assert after > 0.98 and after > before
    # the label boundary now sits on the colour edge in every row
    assert np.all(q.argmax(0)[:, 31] == 0) and np.all(q.argmax(0)[:, 33] == 1)


def test_crf_size_mismatch_and_dtype_errors():
    image = np.zeros((10, 12, 3), np.uint8)
    with pytest.raises(ValueError, match=r"12x10 .* does not match .* 11x10"):
        crf_inference(image, np.ones((2, 10, 11), np.float32) / 2)
    with pytest.raises(ValueError, match="uint8"):
        crf_inference(image.astype(np.float32), np.ones((2, 10, 12), np.float32) / 2)
    # a non-contiguous view is accepted (copied)
    big = np.zeros((10, 24, 3), np.uint8)
    out = crf_inference(big[:, ::2], np.ones((2, 10, 12), np.float32) / 2, {"iters": 2})
    assert out.shape == (2, 10, 12)
    # so is a read-only one (np.asarray of a PIL image)
    ro = np.zeros((10, 12, 3), np.uint8)
    ro.flags.writeable = False
    assert crf_inference(ro, np.ones((2, 10, 12), np.float32) / 2, {"iters": 1}).shape == (2, 10, 12)


def test_affinity_net_learns_a_fixed_example():
    """A few SGD steps on one image with two labelled regions lower the affinity loss clearly."""
    torch.manual_seed(0)
    net = AffinityNet(_tiny_cfg().model)
    net.train()
    x = torch.randn(1, 3, 48, 48)
    x[:, :, :, 24:] += 2.0
    labels = torch.zeros(1, 48, 48, dtype=torch.long)
    labels[:, :, 24:] = 3
    labels[:, :8] = 255
    opt = torch.optim.SGD(net.param_groups(0.05, 0.0), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(15):
        loss, _ = affinity_loss(net(x)["aff"], labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]


def test_walk_with_region_affinities_fixes_a_blurred_cam():
    """A blurred, off-centre CAM of a disk: walking it with affinities that respect the object's boundary
    (1 inside a region, 0.05 across) raises the two-class IoU well above the thresholded CAM's."""
    from wsss.pseudolabel import cam_scores, labels_from_scores

    S = 128
    yy, xx = np.mgrid[:S, :S]
    gt = (np.sqrt((yy - 60) ** 2 + (xx - 66) ** 2) < 36).astype(np.uint8)
    cam = np.exp(-((yy - 52) ** 2 + (xx - 58) ** 2) / (2 * 30.0 ** 2)).astype(np.float32)[None]

    def miou(lab):
        fg = ((lab > 0) & (gt > 0)).sum() / ((lab > 0) | (gt > 0)).sum()
        bg = ((lab == 0) & (gt == 0)).sum() / ((lab == 0) | (gt == 0)).sum()
        return (fg + bg) / 2

    base = miou(labels_from_scores(*cam_scores(cam, [1], 0.26)))
    g = grid_labels(torch.from_numpy(gt), (16, 16)).long()
    offs = neighbor_offsets(5)
    pad = torch.nn.functional.pad(g, (4, 4, 0, 4), value=-1)
    aff = torch.stack([torch.where(pad[dy:dy + 16, 4 + dx:4 + dx + 16] == g, 1.0, 0.05) for dy, dx in offs])
    probs = walk_cam(torch.from_numpy(cam), aff, radius=5, beta=8, logt=8, bg_alpha=4)
    walked = miou(labels_from_scores(probs.numpy(), [0, 1]))
    assert base < 0.7 and walked > base + 0.2


def test_matched_bg_alpha_crosses_the_cam_at_the_threshold():
    """rw.bg_alpha null: (1 - m)^alpha == m at m = infer.bg_threshold, so the walk starts from the CAM's labels."""
    from wsss.refine.random_walk import matched_bg_alpha

    for t in (0.1, 0.26, 0.37, 0.5, 0.58, 0.9):
        a = matched_bg_alpha(t)
        assert (1 - t) ** a == pytest.approx(t)
        assert (1 - (t + 0.01)) ** a < t + 0.01 and (1 - (t - 0.01)) ** a > t - 0.01
    assert matched_bg_alpha(0.5) == pytest.approx(1.0)
    for bad in (0.0, 1.0, -0.2):
        with pytest.raises(ValueError, match="infer.bg_threshold"):
            matched_bg_alpha(bad)
    # labels of the walk's starting scores equal the CAM's thresholded labels
    rng = np.random.default_rng(0)
    cam = rng.random((2, 12, 12)).astype(np.float32)
    t = 0.42
    bg = rw_background(cam, matched_bg_alpha(t))
    start = np.concatenate([bg[None], cam]).argmax(0)
    thresholded = np.where(cam.max(0) > t, cam.argmax(0) + 1, 0)
    assert (start == thresholded).mean() > 0.99
