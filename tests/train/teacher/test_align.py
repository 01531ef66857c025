"""Features must follow the image: every geometric augmentation reaches the DDPM features."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from d3n.train.detector.data import AugmentConfig, DetectionDataset
from d3n.train.teacher.align import warp_pieces


def image_features(img_chw: torch.Tensor, size: int) -> torch.Tensor:
    """A stand-in for DDPM features that is a function of the pixels: the image, area-downsampled."""
    return F.interpolate(img_chw[None].float() / 255, size=(size, size), mode="area")[0]


def warped(ds: DetectionDataset, item: dict, level_hw: int, stride: int, feat_size: int) -> torch.Tensor:
    feats = []
    for p in item["pieces"]:
        src = cv2.imread(str(ds.files[p.index]))[:, :, ::-1].transpose(2, 0, 1).copy()
        feats.append(image_features(torch.from_numpy(src), feat_size))
    return warp_pieces(torch.stack(feats), [item["pieces"]], (level_hw, level_hw), stride)[0]


def test_flip_gives_exactly_flipped_features(synth_small):
    ds_plain = DetectionDataset(synth_small, "train", 128)
    ds_flip = DetectionDataset(synth_small, "train", 128, AugmentConfig(mosaic=0, scale=0, translate=0,
                                                                         fliplr=1.0, hsv_h=0, hsv_s=0, hsv_v=0))
    a, b = ds_plain[0], ds_flip[0]
    assert torch.equal(b["img"], torch.flip(a["img"], dims=[-1]))
    fa = warped(ds_plain, a, 16, 8, 16)
    fb = warped(ds_flip, b, 16, 8, 16)
    torch.testing.assert_close(fb, torch.flip(fa, dims=[-1]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("aug", [
    AugmentConfig(mosaic=0, scale=0.4, translate=0.0, fliplr=0, hsv_h=0, hsv_s=0, hsv_v=0),
    AugmentConfig(mosaic=0, scale=0.0, translate=0.2, fliplr=0, hsv_h=0, hsv_s=0, hsv_v=0),
    AugmentConfig(mosaic=1.0, scale=0.3, translate=0.1, fliplr=0.5, hsv_h=0, hsv_s=0, hsv_v=0),
], ids=["scale", "translate", "mosaic+all"])
def test_warped_features_match_features_of_the_augmented_image(synth_small, aug):
    """Warped features of the originals agree with features computed on the augmented image itself."""
    ds = DetectionDataset(synth_small, "train", 128, aug, seed=3)
    for idx in range(4):
        item = ds[idx]
        got = warped(ds, item, 16, 8, 64)
        want = image_features(item["img"], 16)
        # padding (value 114) has no source features: compare where a source image is visible, in
        # cells away from an image's edge (an edge cell's features are its visible part's, the
        # augmented image's mixes in the padding)
        seen = (got.abs().sum(0) > 0).float()
        visible = F.avg_pool2d(seen[None, None], 3, 1, 1)[0, 0] == 1
        assert visible.float().mean() > 0.2
        err = (got - want).abs()[:, visible].mean().item()
        assert err < 0.03, f"item {idx}: features drift from the image (mean abs err {err:.3f})"
        # and a deliberately wrong map (no augmentation applied to the features) would fail
        if aug.scale or aug.translate or aug.mosaic:
            plain = DetectionDataset(synth_small, "train", 128)[idx]
            wrong = warped(ds, plain, 16, 8, 64)
            assert (wrong - want).abs()[:, visible].mean().item() > err


def test_labels_follow_the_same_map(synth_small):
    ds = DetectionDataset(synth_small, "train", 128, AugmentConfig(mosaic=1.0, scale=0.3, translate=0.1,
                                                                   fliplr=0.5, hsv_h=0, hsv_s=0, hsv_v=0), seed=1)
    for idx in range(6):
        lab = ds[idx]["labels"].numpy()
        assert lab.shape[1] == 5
        assert ((lab[:, 1:] >= 0) & (lab[:, 1:] <= 1)).all()
        assert (lab[:, 3:] > 0).all()


def test_augmentation_is_seeded(synth_small):
    aug = AugmentConfig()
    a = DetectionDataset(synth_small, "train", 128, aug, seed=5)[2]
    b = DetectionDataset(synth_small, "train", 128, aug, seed=5)[2]
    assert torch.equal(a["img"], b["img"]) and torch.equal(a["labels"], b["labels"])
    assert np.allclose(a["pieces"][0].M, b["pieces"][0].M)


def test_a_finer_feature_map_is_averaged_over_each_cell_not_point_sampled():
    """A 64-cell map under a 16-cell level (a DDPM input 4x finer than the stride-8 grid at 128 px):
    columns 1, 0, 0, 0 repeated average to 0.25 in every cell; one sample at each cell centre would
    read 0 (it falls between two zero columns). At the level's own resolution nothing changes."""
    from types import SimpleNamespace

    from d3n.train.teacher.align import subsamples

    piece = SimpleNamespace(M=np.eye(3), rect=(0, 0, 128, 128), src_hw=(128, 128))
    row = torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(16)
    fine = row.expand(64, 64)[None, None].clone()
    assert subsamples((64, 64), (16, 16)) == 4
    got = warp_pieces(fine, [[piece]], (16, 16), 8)
    torch.testing.assert_close(got, torch.full((1, 1, 16, 16), 0.25))
    same = torch.rand(1, 2, 16, 16)
    assert subsamples((16, 16), (16, 16)) == 1  # one feature cell per level cell: sampled as before
    torch.testing.assert_close(warp_pieces(same, [[piece]], (16, 16), 8), same)
