import math

import pytest
import torch
from transformers import Dinov2Model

from gen3d.cameras import orbit_cameras, spherical_cameras
from gen3d.models.tgs import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TGS,
    ModulatedLayerNorm,
    TGSConfig,
    camera_condition,
    count_parameters,
    project_points,
    projected_features,
    sample_planes,
    scatter_to_planes,
)
from gen3d.rendering.gaussian import render_gaussians
from gen3d.representations.gaussians import GaussianModel

DINOV2_BASE_PARAMETERS = 86_580_480
"""facebook/dinov2-base: patch embedding, CLS and mask tokens, 37x37+1 positions, 12 layers, final norm."""


def input_views(batch: int = 2, size: int = 32):
    """RGBA images [B, size, size, 4]: a colored disk on white with its mask, and B orbit cameras."""
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    disk = (((xs - size / 2) ** 2 + (ys - size / 2) ** 2) < (size / 3) ** 2).float()  # [H, W]
    colors = torch.tensor([[0.9, 0.2, 0.1], [0.1, 0.3, 0.8]])[torch.arange(batch) % 2]  # [B, 3]
    rgb = disk[None, ..., None] * colors[:, None, None] + (1 - disk[None, ..., None])  # on white
    image = torch.cat([rgb, disk[None, ..., None].expand(batch, -1, -1, -1)], -1)
    return image, orbit_cameras(batch, distance=2.5, width=size, height=size)


def test_output_shapes_of_the_tiny_model():
    cfg = TGSConfig.tiny()
    model = TGS(cfg)
    image, cameras = input_views()
    out = model(image, cameras)
    N = cfg.num_points * math.prod(cfg.up_factors)
    assert N == cfg.num_gaussians == 512
    assert out.coarse_points.shape == (2, cfg.num_points, 3)
    assert out.points.shape == out.means.shape == out.log_scales.shape == (2, N, 3)
    assert out.quats.shape == (2, N, 4) and out.opacity_logits.shape == (2, N) and out.sh.shape == (2, N, 1, 3)
    R2 = 2 * cfg.triplane_resolution
    assert out.planes.shape == (2, 3, cfg.triplane_channels, R2, R2)
    assert torch.allclose(out.quats.norm(dim=-1), torch.ones(2, N))
    assert (out.log_scales <= math.log(cfg.max_scale) + 1e-6).all()
    gaussians = out.gaussians(1)
    assert isinstance(gaussians, GaussianModel) and gaussians.num_gaussians == N and gaussians.sh_degree == 0
    assert torch.equal(gaussians.means, out.means[1]) and gaussians.means.requires_grad
    copy = out.gaussians(1, detach=True)
    assert copy.means.is_leaf and torch.equal(copy.sh, out.sh[1])
    tokens = model.tokenizer(image, model.camera_embedder(torch.zeros(2, 25)))
    assert tokens.shape == (2, 1 + cfg.num_patches, cfg.image_width)


def test_sh_degree_sets_the_color_coefficients():
    out = TGS(TGSConfig.tiny(sh_degree=2, num_points=16))(*input_views())
    assert out.sh.shape == (2, 64, 9, 3) and out.gaussians(0).sh_degree == 2


def test_at_init_coarse_points_are_zero_and_the_modulation_is_the_identity():
    model = TGS(TGSConfig.tiny())
    image, cameras = input_views()
    out = model(image, cameras)
    assert torch.count_nonzero(out.coarse_points) == 0
    assert torch.allclose(out.means, out.points)  # zero offset head
    assert torch.allclose(out.log_scales, torch.full_like(out.log_scales, -5.0))
    assert torch.allclose(torch.sigmoid(out.opacity_logits), torch.full_like(out.opacity_logits, 0.1))
    assert torch.equal(out.quats, torch.tensor([1.0, 0, 0, 0]).expand_as(out.quats))

    # The same ViT without modulation: a plain Dinov2Model loads the tokenizer's weights by name.
    plain = Dinov2Model(model.tokenizer.vit.config).eval()
    result = plain.load_state_dict(model.tokenizer.vit.state_dict(), strict=False)
    assert not result.missing_keys and result.unexpected_keys
    assert all(".modulation." in key for key in result.unexpected_keys)
    pixels = (image[..., :3].permute(0, 3, 1, 2) - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        IMAGENET_STD).view(1, 3, 1, 1)
    cam_emb = torch.randn(2, model.cfg.image_width)
    with torch.no_grad():
        tokens = model.tokenizer(image, cam_emb)
        expected = plain(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-5)


def test_the_camera_changes_the_tokens_once_the_modulation_is_trained():
    model = TGS(TGSConfig.tiny()).eval()
    image, _ = input_views()
    image = image[:1].expand(2, -1, -1, -1)  # the same image twice
    cameras = spherical_cameras(torch.tensor([0.0, 90.0]), torch.tensor([10.0, 30.0]), torch.tensor([2.5, 2.0]),
                                torch.tensor([40.0, 50.0]), 32, 32)

    def tokens(cams):
        with torch.no_grad():
            return model.tokenizer(image, model.camera_embedder(camera_condition(cams)))

    assert torch.allclose(*tokens(cameras).unbind(0), atol=1e-6)  # zero-initialized: the camera is ignored
    norms = [m for m in model.modules() if isinstance(m, ModulatedLayerNorm)]
    assert len(norms) == 2 * model.cfg.image_layers
    with torch.no_grad():
        for norm in norms:
            norm.modulation.weight.normal_(0.0, 0.1)
    different = tokens(cameras)
    assert (different[0] - different[1]).abs().max() > 1e-3
    same = tokens(cameras[[0, 0]])
    torch.testing.assert_close(same[0], same[1])


def test_projection_lands_on_the_pixel_computed_from_K_and_viewmats():
    W, H = 40, 30
    cameras = spherical_cameras(torch.tensor([20.0, -70.0]), torch.tensor([15.0, -5.0]), torch.tensor([2.5, 3.0]),
                                torch.tensor([45.0, 35.0]), W, H)
    points = torch.randn(2, 50, 3) * 0.4
    uv, z = project_points(points, cameras.c2w, cameras.K)
    cam = torch.einsum("bij,bnj->bni", cameras.viewmats, torch.cat([points, torch.ones(2, 50, 1)], -1))[..., :3]
    pix = torch.einsum("bij,bnj->bni", cameras.K, cam)
    torch.testing.assert_close(uv, pix[..., :2] / pix[..., 2:], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(z, cam[..., 2])
    center, _ = project_points(torch.zeros(2, 1, 3), cameras.c2w, cameras.K)  # the cameras look at the origin
    torch.testing.assert_close(center[:, 0], torch.tensor([[W / 2, H / 2]] * 2), rtol=0, atol=1e-4)

    # Sampling: a point on the ray through the center of pixel (column i, row j) reads that pixel.
    image = torch.rand(2, H, W, 4)
    side, D = 5, 6  # a 5x5 patch grid of 6-d tokens
    patch_tokens = torch.randn(2, side * side, D)
    i, j = 17, 11
    ray = torch.linalg.inv(cameras.K) @ torch.tensor([i + 0.5, j + 0.5, 1.0])  # [2, 3] camera-space direction
    on_pixel = cameras.c2w[:, :3, :3] @ (2.2 * ray)[..., None] + cameras.c2w[:, :3, 3:]  # [2, 3, 1]
    eyes, forward = cameras.eyes, cameras.c2w[:, :3, 2]
    behind = eyes - 0.5 * forward  # depth -0.5
    outside_ray = torch.linalg.inv(cameras.K) @ torch.tensor([W + 3.0, H / 2, 1.0])
    outside = cameras.c2w[:, :3, :3] @ (2.0 * outside_ray)[..., None] + cameras.c2w[:, :3, 3:]
    pts = torch.stack([on_pixel[..., 0], behind, outside[..., 0]], 1)  # [2, 3, 3]
    feats = projected_features(pts, image, patch_tokens, cameras)
    assert feats.shape == (2, 3, 3 + D + 1)
    torch.testing.assert_close(feats[:, 0, :3], image[:, j, i, :3])
    torch.testing.assert_close(feats[:, 0, -1], image[:, j, i, 3])
    assert torch.count_nonzero(feats[:, 1:]) == 0  # behind the camera and outside the image: 0

    # Patch features: a point projecting onto the center of patch (column 3, row 1) reads its token.
    u, v = (3 + 0.5) / side * W, (1 + 0.5) / side * H
    ray = torch.linalg.inv(cameras.K) @ torch.tensor([u, v, 1.0])
    at_patch = (cameras.c2w[:, :3, :3] @ (1.7 * ray)[..., None] + cameras.c2w[:, :3, 3:])[..., 0]
    feats = projected_features(at_patch[:, None], image, patch_tokens, cameras)
    torch.testing.assert_close(feats[:, 0, 3:3 + D], patch_tokens[:, 1 * side + 3])


def test_end_to_end_gradients_and_a_few_adam_steps_fit_a_target():
    model = TGS(TGSConfig.tiny())
    image, cameras = input_views()
    views = orbit_cameras(2, elevation=20.0, distance=2.5, width=24, height=24, start_azimuth=30.0)
    white = torch.ones(3)
    target_model = GaussianModel.from_values(torch.randn(64, 3) * 0.3, 0.08, 0.8, torch.rand(64, 3))
    with torch.no_grad():
        target = render_gaussians(target_model, views, white, backend="torch").rgb  # [2, 24, 24, 3]
    groups = model.parameter_groups()
    assert sum(len(g) for g in groups.values()) == len(list(model.parameters()))
    got_gradient = dict.fromkeys(groups, False)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        rgb = render_gaussians(model(image, cameras).gaussians(0), views, white, backend="torch").rgb
        loss = torch.nn.functional.mse_loss(rgb, target)
        loss.backward()
        losses.append(loss.item())
        for name, params in groups.items():
            grads = [p.grad for p in params if p.grad is not None]
            assert all(torch.isfinite(g).all() for g in grads), name
            got_gradient[name] |= any(g.abs().sum() > 0 for g in grads)
        optimizer.step()
    # At the exact init the zero heads pass no gradient to the trunk; after one step every part gets one.
    assert all(got_gradient.values()), got_gradient
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("overrides,match", [
    ({"image_size": 30, "patch_size": 8}, "multiple of patch_size"),
    ({"width": 64, "heads": 3, "head_dim": 16}, "heads \\* head_dim"),
    ({"up_factors": ()}, "up_factors"),
    ({"up_factors": (2, 0)}, "up_factors"),
    ({"sh_degree": 4}, "sh_degree"),
    ({"norm_groups": 7}, "norm_groups"),
    ({"image_heads": 5}, "image_heads"),
    ({"pos_embed_image_size": 30}, "pos_embed_image_size"),
    ({"bound": 0.0}, "bound"),
    ({"num_points": 0}, "num_points"),
])
def test_config_validation_errors_name_the_field(overrides, match):
    with pytest.raises(ValueError, match=match):
        TGSConfig.tiny(**overrides)


def test_forward_rejects_mismatched_inputs():
    model = TGS(TGSConfig.tiny(num_points=8))
    image, cameras = input_views()
    with pytest.raises(ValueError, match="RGBA"):
        model(image[..., :3], cameras)
    with pytest.raises(ValueError, match="2 images but 1 cameras"):
        model(image, cameras[0])


def test_parameter_counts_without_building_the_paper_model():
    tiny = TGSConfig.tiny()
    assert count_parameters(tiny) == sum(p.numel() for p in TGS(tiny).parameters())
    paper = TGSConfig.paper()
    assert paper.num_gaussians == 16384 and paper.num_patches == 36 * 36
    with torch.device("meta"):  # shapes only, no memory
        model = TGS(paper)
    vit = sum(p.numel() for name, p in model.tokenizer.vit.named_parameters() if ".modulation." not in name)
    assert vit == DINOV2_BASE_PARAMETERS
    modulation = 12 * 2 * (768 * 2 * 768 + 2 * 768)
    assert sum(p.numel() for p in model.tokenizer.parameters()) == DINOV2_BASE_PARAMETERS + modulation
    assert count_parameters(paper) == sum(p.numel() for p in model.parameters())


def test_scattering_and_sampling_use_the_same_plane_grid():
    R, bound = 4, 0.5
    cells = torch.tensor([[0, 1, 2], [3, 0, 1], [1, 3, 3], [2, 2, 0]])  # distinct cells on every plane
    points = ((cells + 0.5) / R * 2 - 1) * bound  # [4, 3] cell centers
    features = torch.randn(1, 4, 5)
    planes = scatter_to_planes(points[None], features, R, bound)  # [1, 3, 5, R, R]
    xy = planes[0, 0]  # width axis x, height axis y
    torch.testing.assert_close(xy[:, cells[1, 1], cells[1, 0]], features[0, 1])
    torch.testing.assert_close(planes[0, 2][:, cells[2, 2], cells[2, 1]], features[0, 2])  # yz
    assert torch.count_nonzero(planes.abs().sum(2)) == 3 * 4
    torch.testing.assert_close(sample_planes(planes, points[None], bound), features.repeat(1, 1, 3))
    # Two points in one texel are averaged.
    twice = scatter_to_planes(points[None, [0, 0]], features[:, [0, 1]], R, bound)
    torch.testing.assert_close(twice[0, 0][:, cells[0, 1], cells[0, 0]], features[0, :2].mean(0))
