"""GPU-side augmentation: per-op and whole-pipeline parity with torchvision's v2 functional ops
applied sample by sample, the distributions of the random draws (>= 10,000 each), seeding,
and the graph-safety the CUDA-graph training step relies on."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from fastsiam.augment import AugParams, SimSiamAugment, to_normalized
from fastsiam.augment import functional as AF
from fastsiam.config import AugConfig
from fastsiam.data import TwoViewBatch

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TOL, TOL_HUE = 1e-4, 2e-3  # max abs difference allowed against torchvision (the bar)


def images(n: int, h: int = 26, w: int = 30, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    """Float images on the uint8 grid, with the cases HSV and clamping care about: grey pixels,
    pure black/white, ties between the max channels, saturated colours."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, h, w), generator=g).float() / 255
    x[0, :, :4] = x[0, :1, :4]                     # grey
    x[0, :, 4:6] = 0.0
    x[0, :, 6:8] = 1.0
    x[1 % n, 1, :3] = x[1 % n, 0, :3]              # R == G (a max tie where R is large)
    x[1 % n, :, 3:5] = torch.tensor([1.0, 0.0, 0.2]).view(3, 1, 1)
    return x.to(device)


def per_sample(op, img: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return torch.stack([op(img[i], float(values[i])) for i in range(img.shape[0])])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["brightness", "contrast", "saturation", "hue", "solarize"])
def test_colour_ops_match_torchvision_per_sample(name: str, device: str) -> None:
    x = images(6, device=device)
    g = torch.Generator().manual_seed(1)
    ours, theirs, lo, hi = {
        "brightness": (AF.adjust_brightness, TF.adjust_brightness, 0.0, 2.0),
        "contrast": (AF.adjust_contrast, TF.adjust_contrast, 0.0, 2.0),
        "saturation": (AF.adjust_saturation, TF.adjust_saturation, 0.0, 2.0),
        "hue": (AF.adjust_hue, TF.adjust_hue, -0.5, 0.5),
        "solarize": (AF.solarize, TF.solarize, 0.0, 1.0),
    }[name]
    values = (lo + (hi - lo) * torch.rand(6, generator=g)).to(device)
    got, want = ours(x, values), per_sample(theirs, x, values)
    assert got.shape == want.shape
    assert (got - want).abs().max() <= (TOL_HUE if name == "hue" else TOL)
    # channels_last input gives the same values
    cl = ours(x.contiguous(memory_format=torch.channels_last), values)
    assert (cl - want).abs().max() <= (TOL_HUE if name == "hue" else TOL)


@pytest.mark.parametrize("device", DEVICES)
def test_hue_extremes_and_identity(device: str) -> None:
    x = images(4, device=device)
    for shift in (-0.5, 0.5, 0.0, 1 / 6, -1 / 3):
        want = per_sample(TF.adjust_hue, x, torch.full((4,), shift))
        assert (AF.adjust_hue(x, shift) - want).abs().max() <= TOL_HUE
    assert (AF.adjust_hue(x, 0.0) - x).abs().max() <= 1e-6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel_size", [23, 5])
def test_gaussian_blur_matches_torchvision_per_sample(kernel_size: int, device: str) -> None:
    x = images(5, h=24, w=31, device=device)
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.7, 2.0], device=device)
    got = AF.gaussian_blur(x, sigma, kernel_size)
    want = torch.stack([
        TF.gaussian_blur(x[i], [kernel_size, kernel_size], [float(sigma[i])] * 2) for i in range(5)])
    assert (got - want).abs().max() <= TOL
    k = AF.gaussian_kernels(sigma, kernel_size)
    assert torch.allclose(k.sum(1), torch.ones(5, device=device))
    # a closed-form check independent of torchvision: exp(-d^2 / (2 sigma^2)), normalized
    d = torch.arange(kernel_size, device=device) - kernel_size // 2
    ref = torch.exp(-(d[None] ** 2) / (2 * sigma[:, None] ** 2))
    assert torch.allclose(k, ref / ref.sum(1, keepdim=True), atol=1e-6)


def test_gaussian_blur_rejects_images_smaller_than_the_padding() -> None:
    with pytest.raises(ValueError, match=r"kernel_size 23 .* larger than 11 px .* got 8x8"):
        AF.gaussian_blur(torch.rand(2, 3, 8, 8), torch.ones(2), 23)
    with pytest.raises(ValueError, match="positive odd"):
        AF.gaussian_kernels(torch.ones(2), 4)


@pytest.mark.parametrize("device", DEVICES)
def test_grayscale_flip_normalize_match_torchvision(device: str) -> None:
    x = images(4, device=device)
    assert torch.equal(AF.rgb_to_grayscale(x), TF.rgb_to_grayscale(x, num_output_channels=3))
    mask = torch.tensor([True, False, True, False], device=device)
    want = torch.stack([TF.horizontal_flip(x[i]) if mask[i] else x[i] for i in range(4)])
    assert torch.equal(AF.hflip(x, mask), want)
    assert (AF.normalize(x, MEAN, STD) - TF.normalize(x, list(MEAN), list(STD))).abs().max() <= TOL
    u8 = (x * 255).round().to(torch.uint8)
    got = to_normalized(u8, MEAN, STD)
    want = TF.normalize(TF.to_dtype(u8, torch.float32, scale=True), list(MEAN), list(STD))
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert (got - want).abs().max() <= TOL
    assert to_normalized(u8, MEAN, STD, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_hflip_of_uint8_channels_last_views_is_exact() -> None:
    # the loader's layout: NHWC uint8 seen as [B, 3, H, W]; odd width has a middle column
    g = torch.Generator().manual_seed(3)
    u8 = torch.randint(0, 256, (5, 7, 9, 3), generator=g, dtype=torch.uint8).permute(0, 3, 1, 2)
    mask = torch.tensor([True, False, True, True, False])
    got = AF.hflip(u8, mask)
    assert got.dtype == torch.uint8
    assert torch.equal(got, torch.where(mask.view(-1, 1, 1, 1), u8.flip(-1), u8))
    assert torch.equal(AF.hflip(u8, torch.zeros(5, dtype=torch.bool)), u8)


def test_ops_reject_bad_input() -> None:
    with pytest.raises(ValueError, match=r"adjust_hue: expected float images of shape \[B, 3, H, W\]"):
        AF.adjust_hue(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), 0.1)
    with pytest.raises(ValueError, match=r"one value per sample, shape \[2\], got \[3\]"):
        AF.adjust_brightness(torch.rand(2, 3, 4, 4), torch.ones(3))
    with pytest.raises(ValueError, match="bool mask"):
        AF.hflip(torch.rand(2, 3, 4, 4), torch.ones(2))
    with pytest.raises(ValueError, match="to_normalized: expected uint8"):
        to_normalized(torch.rand(2, 3, 4, 4), MEAN, STD)


def test_colour_matrices_are_the_jitter_ops_and_identity_is_exact() -> None:
    """Brightness, contrast and saturation as one colour matrix (plus the mean luma for
    contrast) equal the ops; the identity matrix and the delta blur kernel return the input
    bit for bit, so the samples that skip an op carry no error."""
    x = images(6)
    f = torch.linspace(0.0, 1.9, 6)
    eye = torch.eye(3).expand(6, 3, 3)
    luma = torch.tensor([list(AF.LUMA)] * 3)
    mean_luma = AF.rgb_to_grayscale(x)[:, 0].mean(dim=(1, 2))
    fm = f.view(6, 1, 1)
    cases = {
        "brightness": (fm * eye, None, AF.adjust_brightness),
        "saturation": (fm * eye + (1 - fm) * luma, None, AF.adjust_saturation),
        "contrast": (fm * eye, ((1 - f) * mean_luma).unsqueeze(1).expand(6, 3), AF.adjust_contrast),
    }
    for name, (matrix, offset, op) in cases.items():
        assert (AF.color_matrix(x, matrix, offset) - op(x, f)).abs().max() <= 1e-6, name
    assert torch.equal(AF.color_matrix(x, eye), x)
    nhwc = AF.color_matrix(x, fm * eye, channels_last_out=True)
    assert nhwc.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(nhwc, AF.color_matrix(x, fm * eye))
    delta = torch.zeros(6, 9)
    delta[:, 4] = 1.0
    assert torch.equal(AF.separable_blur(x, delta), x)


# ---- the whole pipeline against torchvision, sample by sample ----------------------------

def reference_view(x: torch.Tensor, p: AugParams, i: int, aug: SimSiamAugment) -> torch.Tensor:
    """One sample through torchvision's v2 functional ops in the official order:
    ColorJitter (ops in this sample's order, disabled ones skipped), grayscale, blur,
    solarize, flip, normalize."""
    ops = {0: (TF.adjust_brightness, aug.brightness), 1: (TF.adjust_contrast, aug.contrast),
           2: (TF.adjust_saturation, aug.saturation), 3: (TF.adjust_hue, aug.hue)}
    if p.jitter[i]:
        for op in p.order[i].tolist():
            fn, strength = ops[op]
            if strength > 0:
                x = fn(x, float(p.factors[i, op]))
    if p.gray[i]:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if p.blur[i]:
        k = aug.blur_kernel_size
        x = TF.gaussian_blur(x, [k, k], [float(p.sigma[i])] * 2)
    if p.solarize[i]:
        x = TF.solarize(x, aug.solarize_threshold)
    if p.flip[i]:
        x = TF.horizontal_flip(x)
    return TF.normalize(x, list(aug.mean), list(aug.std))


def all_orders_params(aug: SimSiamAugment, device: str) -> AugParams:
    """48 samples: each of the 24 jitter orders twice, the other switches mixed, factors drawn."""
    n = 48
    g = torch.Generator().manual_seed(3)
    p = aug.sample_params(n, "cpu", g)
    order = torch.tensor(list(itertools.permutations(range(4))) * 2)
    on = torch.arange(n)
    params = p._replace(order=order, jitter=on % 5 != 4, gray=on % 7 == 3, blur=on % 2 == 0,
                        flip=on % 3 == 0, solarize=(on % 4 == 1) & (aug.solarize_p > 0))
    return AugParams(*(t.to(device) for t in params))


# Recipes that enable and disable the jitter ops in every combination the schedule handles
# differently (a hue with no slot around it, slots with no hue, ...), and solarize's place.
RECIPES = [
    {},
    {"hue": 0.0},
    {"brightness": 0.0, "saturation": 0.0},
    {"brightness": 0.8, "contrast": 0.0, "saturation": 0.0, "hue": 0.5},
    {"brightness": 0.0, "contrast": 0.0, "saturation": 0.0},
    {"solarize_p": 0.2, "solarize_threshold": 0.5, "blur_kernel_size": 7},
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", RECIPES)
def test_pipeline_matches_torchvision_for_every_jitter_order(config: dict, device: str) -> None:
    aug = SimSiamAugment(**config)
    p = all_orders_params(aug, device)
    x = images(48, h=24, w=24, seed=5, device=device)
    got = AF.normalize(aug.apply(x, p), aug.mean, aug.std)
    want = torch.stack([reference_view(x[i], p, i, aug) for i in range(48)])
    # 2e-3 as for hue: one hue rotation sits inside, its rounding passes through the others
    assert (got - want).abs().max() <= TOL_HUE
    assert (got - want).abs().mean() <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_forward_is_apply_of_its_draws_on_both_views(device: str) -> None:
    aug = SimSiamAugment(blur_kernel_size=9)
    g = torch.Generator(device=device).manual_seed(11)
    u8 = (images(8, h=20, w=20, device=device) * 255).round().to(torch.uint8)
    batch = TwoViewBatch.from_pair(u8.contiguous(memory_format=torch.channels_last), u8.flip(0).contiguous(),
                         torch.arange(8, device=device))
    v1, v2 = aug(batch, generator=g)
    assert v1.shape == v2.shape == (8, 3, 20, 20)
    assert v1.dtype == torch.float32 and v1.device.type == device
    assert v1.is_contiguous(memory_format=torch.channels_last)
    g.manual_seed(11)
    p = aug.sample_params(16, device, g)
    both = torch.cat([u8, u8.flip(0)]).float() / 255
    want = torch.stack([reference_view(both[i], p, i, aug) for i in range(16)])
    assert (torch.cat([v1, v2]) - want).abs().max() <= TOL_HUE


# ---- distributions of the random draws ------------------------------------------------------

N_DRAWS = 20_000


def within_3_sigma(hits: torch.Tensor, p: float) -> bool:
    n = hits.numel()
    return abs(hits.float().sum().item() - n * p) <= 3 * math.sqrt(n * p * (1 - p)) + 1e-9


def assert_uniform(values: torch.Tensor, lo: float, hi: float, atol: float = 1e-6) -> None:
    assert lo - atol <= values.min().item() and values.max().item() <= hi + atol
    # the range is reached at both ends, and each tenth holds its share within 3 sigma
    span = hi - lo
    assert values.min().item() < lo + 0.002 * span and values.max().item() > hi - 0.002 * span
    counts = torch.histc(values.double(), bins=10, min=lo, max=hi)
    n, q = values.numel(), 0.1
    assert (counts - n * q).abs().max().item() <= 3 * math.sqrt(n * q * (1 - q))


def test_draws_have_the_configured_probabilities_and_ranges() -> None:
    aug = SimSiamAugment(solarize_p=0.2)
    p = aug.sample_params(N_DRAWS, "cpu", torch.Generator().manual_seed(0))
    assert within_3_sigma(p.flip, 0.5)
    assert within_3_sigma(p.jitter, 0.8)
    assert within_3_sigma(p.gray, 0.2)
    assert within_3_sigma(p.blur, 0.5)
    assert within_3_sigma(p.solarize, 0.2)
    for op in range(3):  # brightness, contrast, saturation: [1 - 0.4, 1 + 0.4]
        assert_uniform(p.factors[:, op], 0.6, 1.4)
    assert_uniform(p.factors[:, 3], -0.1, 0.1)
    assert_uniform(p.sigma, 0.1, 2.0)
    # draws of different ops are independent, not one shared number
    assert abs(torch.corrcoef(torch.stack([p.factors[:, 0], p.factors[:, 1], p.sigma]))[0, 1:]).max() < 0.05
    # a strength above 1 clips the lower end at 0, as torchvision's ColorJitter
    p = SimSiamAugment(brightness=1.5).sample_params(N_DRAWS, "cpu", torch.Generator().manual_seed(1))
    assert_uniform(p.factors[:, 0], 0.0, 2.5)


def test_every_jitter_order_is_equally_likely() -> None:
    p = SimSiamAugment().sample_params(N_DRAWS, "cpu", torch.Generator().manual_seed(2))
    assert torch.equal(p.order.sort(dim=1).values, torch.arange(4).expand(N_DRAWS, 4))
    codes = (p.order * torch.tensor([64, 16, 4, 1])).sum(1)
    counts = torch.bincount(codes, minlength=256)
    counts = counts[counts > 0].double()
    assert counts.numel() == 24
    expected = N_DRAWS / 24
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 49.7  # chi-square, 23 degrees of freedom, p = 0.001
    # and no single order stands out: each within 4 sigma (24 cells, family-wise rate ~0.2%)
    assert (counts - expected).abs().max().item() <= 4 * math.sqrt(N_DRAWS * (1 / 24) * (23 / 24))


def test_end_to_end_rates_and_ranges_on_tiny_images() -> None:
    """The same distributions measured on outputs of the whole module (4x4 images)."""
    n, g = N_DRAWS // 2, torch.Generator().manual_seed(4)
    ident = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))

    # grayscale: the three channels of an output are equal only when grayscale was applied
    u8 = torch.randint(0, 256, (n, 3, 4, 4), dtype=torch.uint8, generator=g)
    v1, v2 = SimSiamAugment(blur_kernel_size=3, **ident)(TwoViewBatch.from_pair(u8, u8, torch.zeros(n)), g)
    out = torch.cat([v1, v2])
    gray = (out[:, 0] == out[:, 1]).flatten(1).all(1) & (out[:, 1] == out[:, 2]).flatten(1).all(1)
    assert within_3_sigma(gray, 0.2)

    # flip alone: a left-right ramp comes out mirrored half of the time
    ramp = torch.arange(4, dtype=torch.uint8).mul(60).expand(n, 3, 4, 4).contiguous()
    only_flip = dict(color_jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, **ident)
    v1, v2 = SimSiamAugment(**only_flip)(TwoViewBatch.from_pair(ramp, ramp, torch.zeros(n)), g)
    flipped = torch.cat([v1, v2])[:, 0, 0, 0] > 0.5
    assert within_3_sigma(flipped, 0.5)

    # brightness alone, always on: a flat 100/255 image scales by the factor
    flat = torch.full((n, 3, 4, 4), 100, dtype=torch.uint8)
    only_b = dict(color_jitter_p=1.0, contrast=0.0, saturation=0.0, hue=0.0, hflip_p=0.0,
                  grayscale_p=0.0, blur_p=0.0, **ident)
    v1, v2 = SimSiamAugment(**only_b)(TwoViewBatch.from_pair(flat, flat, torch.zeros(n)), g)
    assert_uniform(torch.cat([v1, v2])[:, 0, 0, 0].double() / (100 / 255), 0.6, 1.4, atol=1e-5)

    # blur alone: an impulse's centre keeps w0^2 and its right neighbour w0 * w1, where
    # w1 / w0 = exp(-1 / (2 sigma^2)) for a 3-tap kernel: that recovers each sample's sigma
    impulse = torch.zeros(n, 3, 4, 4, dtype=torch.uint8)
    impulse[:, :, 1, 1] = 255
    only_blur = dict(color_jitter_p=0.0, grayscale_p=0.0, hflip_p=0.0, blur_kernel_size=3, **ident)
    v1, v2 = SimSiamAugment(**only_blur)(TwoViewBatch.from_pair(impulse, impulse, torch.zeros(n)), g)
    out = torch.cat([v1, v2])[:, 0].double()
    blurred = out[:, 1, 2] > 0
    assert within_3_sigma(blurred, 0.5)
    ratio = out[blurred, 1, 2] / out[blurred, 1, 1]
    assert_uniform(torch.sqrt(-1 / (2 * torch.log(ratio))), 0.1, 2.0, atol=1e-4)


def test_seeded_runs_reproduce_and_views_get_their_own_draws() -> None:
    aug = SimSiamAugment(blur_kernel_size=5)
    u8 = (images(16, 12, 12) * 255).round().to(torch.uint8)
    batch = TwoViewBatch.from_pair(u8, u8.clone(), torch.zeros(16))
    a = aug(batch, torch.Generator().manual_seed(7))
    b = aug(batch, torch.Generator().manual_seed(7))
    c = aug(batch, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    # identical crops in both views, yet (almost) every sample's two views differ
    differ = (a[0] - a[1]).flatten(1).abs().amax(1) > 1e-3
    assert differ.float().mean() > 0.9
    # the default generator is used without one, and follows torch.manual_seed
    torch.manual_seed(9)
    d = aug(batch)
    torch.manual_seed(9)
    assert torch.equal(d[0], aug(batch)[0])


# ---- module contract --------------------------------------------------------------------------

def test_float_views_pass_through_and_output_formats() -> None:
    v = torch.randn(4, 3, 8, 8)
    batch = TwoViewBatch.from_pair(v, v + 1, torch.zeros(4))
    a, b = SimSiamAugment(out_dtype=torch.bfloat16)(batch)
    assert a.dtype == torch.bfloat16 and a.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(a, v.to(torch.bfloat16)) and torch.equal(b, (v + 1).to(torch.bfloat16))
    a, _ = SimSiamAugment(channels_last=False)(batch)
    assert torch.equal(a, v) and a.is_contiguous()
    u8 = torch.randint(0, 256, (4, 3, 12, 12), dtype=torch.uint8)
    a, _ = SimSiamAugment(out_dtype=torch.float16, blur_kernel_size=5)(TwoViewBatch.from_pair(u8, u8, torch.zeros(4)))
    assert a.dtype == torch.float16 and a.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="expected uint8"):
        SimSiamAugment()(TwoViewBatch.from_pair(u8.int(), u8.int(), torch.zeros(4)))


def test_from_config_and_validation() -> None:
    aug = SimSiamAugment.from_config(AugConfig(), out_dtype=torch.bfloat16)
    default = SimSiamAugment()
    assert aug.extra_repr().replace("bfloat16", "float32") == default.extra_repr()
    assert aug.mean == MEAN and aug.std == STD and aug.solarize_p == 0.0
    for bad, match in [
        (dict(blur_kernel_size=22), "SimSiamAugment: 'aug.blur_kernel_size' must be an odd integer, got 22"),
        (dict(hue=0.6), "SimSiamAugment: 'aug.hue' must be <= 0.5, got 0.6"),
        (dict(grayscale_p=1.5), "'aug.grayscale_p' must be <= 1.0, got 1.5"),
        (dict(blur_sigma=[2.0, 0.1]), r"'aug.blur_sigma' must be \[min, max\] with min <= max"),
        (dict(std=[0.2, 0.0, 0.2]), "'aug.std' must be >= 1e-06, got 0.0"),
        (dict(fused_color="yes"), "'aug.fused_color' must be true or false"),
        (dict(out_dtype=torch.int32), "out_dtype must be a floating dtype"),
    ]:
        with pytest.raises(ValueError, match=match):
            SimSiamAugment(**bad)


def test_traces_as_one_graph_without_host_sync() -> None:
    """torch.compile(fullgraph=True) refuses .item(), tensor-valued Python branches and
    data-dependent shapes: the CPU's proof that the module can sit in a CUDA graph."""
    aug = SimSiamAugment(blur_kernel_size=5, solarize_p=0.2)
    u8 = torch.randint(0, 256, (4, 3, 12, 12), dtype=torch.uint8)
    batch = TwoViewBatch.from_pair(u8, u8, torch.zeros(4))
    aug(batch)  # builds the per-device constants, as the warm-up before capture does
    traced = torch.compile(aug, fullgraph=True, backend="eager", dynamic=False)
    torch.manual_seed(0)
    a = traced(batch)
    torch.manual_seed(0)
    b = aug(batch)
    assert torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1])


# ---- CUDA only ----------------------------------------------------------------------------------

@pytest.mark.cuda
def test_cuda_no_host_sync_and_graph_replays_draw_fresh_parameters() -> None:
    aug = SimSiamAugment(out_dtype=torch.bfloat16)
    u8 = torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8, device="cuda")
    batch = TwoViewBatch.from_pair(u8.contiguous(memory_format=torch.channels_last), u8.clone(), torch.zeros(8, device="cuda"))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        aug(batch)  # warm-up
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.set_sync_debug_mode("error")
    try:
        aug(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out1, _ = aug(batch)
    graph.replay()
    first = out1.clone()
    graph.replay()
    assert not torch.equal(first, out1)
    assert torch.isfinite(out1.float()).all() and out1.dtype == torch.bfloat16
    assert out1.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.cuda
@pytest.mark.slow
def test_cuda_compiled_pipeline_matches_eager() -> None:
    u8 = torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8, device="cuda")
    batch = TwoViewBatch.from_pair(u8, u8.flip(0), torch.zeros(8, device="cuda"))
    g = torch.Generator(device="cuda")
    eager = SimSiamAugment()(batch, g.manual_seed(5))
    compiled = SimSiamAugment(compile=True)(batch, g.manual_seed(5))
    for a, b in zip(eager, compiled):
        assert b.is_contiguous(memory_format=torch.channels_last)
        assert (a - b).abs().max() <= 1e-3  # normalized units: fused kernels round differently


@pytest.mark.parametrize(("compute_dtype", "max_err", "mean_err"), [
    (torch.float32, TOL_HUE, 1e-5),
    # float16 working precision (the default on CUDA for 16-bit output): within 2.5/255 of the
    # image range at worst (the hue's division amplifies roundings), 0.1/255 on average
    (torch.float16, 2.5 / 255 / 0.225, 0.1 / 255 / 0.225),
])
def test_working_precision_against_torchvision(compute_dtype, max_err, mean_err) -> None:
    aug = SimSiamAugment(blur_kernel_size=9, compute_dtype=compute_dtype)
    g = torch.Generator().manual_seed(11)
    u8 = (images(32, h=24, w=24) * 255).round().to(torch.uint8)
    v1, v2 = aug(TwoViewBatch.from_pair(u8, u8.flip(0), torch.arange(32)), generator=g)
    g.manual_seed(11)
    p = aug.sample_params(64, "cpu", g)
    both = torch.cat([u8, u8.flip(0)]).float() / 255
    want = torch.stack([reference_view(both[i], p, i, aug) for i in range(64)])
    err = (torch.cat([v1, v2]).float() - want).abs()
    assert err.max() <= max_err and err.mean() <= mean_err, (err.max(), err.mean())


def test_headline_call_traffic_on_fake_cuda() -> None:
    """2 x 256 views at 224 px, bf16 out, counted (benchmarks/augment.py --count): clean for
    capture, stages summing to the call, and the plain ops (aug.fused_color: false) within the
    bounds of their design (169 kernels, 31.3 GB before it; the fused default is
    tests/test_augment_fused.py's)."""
    from benchmarks.augment import count

    report = count(256, 224, torch.bfloat16, 3.35e12, fused_color=False)
    call = report.rows[0]
    assert call["kernels"] <= 110 and call["device_bytes"] <= 12e9, call
    assert sum(r["device_bytes"] for r in report.rows[1:]) == call["device_bytes"]
    assert report.settings["compute_dtype"] == "float16"


@pytest.mark.parametrize(("fused_color", "kernels", "nbytes"), [(False, 103, 27_917_910), (True, 29, 2_386_844)])
def test_small_call_traffic_on_fake_cuda(fused_color: bool, kernels: int, nbytes: int) -> None:
    """One call on 2 x 8 views at 64 px, bf16 out, holds the single-pass flip, the shorter hue
    chain and (fused) four kernels from the uint8 views to the output: no change may add
    traffic unnoticed."""
    from benchmarks.augment import count

    call = count(8, 64, torch.bfloat16, 3.35e12, fused_color=fused_color).rows[0]
    assert call["kernels"] <= kernels and call["device_bytes"] <= nbytes, call


def test_the_draw_table_names_every_parameter_and_keeps_the_columns():
    from fastsiam.augment.simsiam import DRAW_COLUMNS, DRAWS, split_draws

    assert tuple(name for name, _ in DRAWS) == AugParams._fields
    # The columns one sample draws, as the recipe was first written: flip, jitter, 4 factors,
    # 4 order keys, gray, blur, sigma, solarize; a reordering would change every seeded run.
    u = torch.rand(5, DRAW_COLUMNS, generator=torch.Generator().manual_seed(3))
    parts = split_draws(u)
    assert DRAW_COLUMNS == 14 and torch.equal(parts["factors"], u[:, 2:6])
    assert torch.equal(parts["order"], u[:, 6:10]) and torch.equal(parts["solarize"], u[:, 13])
    aug = SimSiamAugment(solarize_p=0.3)
    got = aug.sample_params(5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(got.flip, u[:, 0] < aug.hflip_p) and torch.equal(got.order, u[:, 6:10].argsort(1))
    assert torch.equal(got.sigma, u[:, 12] * 1.9 + 0.1) and torch.equal(got.solarize, u[:, 13] < 0.3)
