"""SimSiam's view augmentation on the training device, batched, with per-sample random draws.

The official recipe (Chen & He, "Exploring Simple Siamese Representation Learning", CVPR 2021,
following MoCo v2 / SimCLR) augments each crop with: ColorJitter(0.4, 0.4, 0.4, 0.1) with
p=0.8, RandomGrayscale p=0.2, Gaussian blur with sigma in [0.1, 2] and p=0.5, a horizontal
flip with p=0.5, then ImageNet normalization. :class:`SimSiamAugment` runs that on a whole
:class:`~fastsiam.data.TwoViewBatch` of uint8 crops at once; every sample of every view gets
its own draws, and the result for one sample equals torchvision's v2 transforms applied to it
with the same draws (tests/test_augment.py checks this sample by sample).

Design choices:

- ColorJitter's random order. torchvision applies brightness, contrast, saturation and hue
  in a fresh random permutation per image. Brightness, contrast and saturation are each a
  per-pixel affine colour map followed by a clamp (``f I``; ``f I`` plus ``(1 - f)`` times the
  image's mean luma; ``f I + (1 - f) luma``), so one slot of the batch is one 3x3 matrix per
  sample applied by a batched GEMM (:func:`~fastsiam.augment.functional.color_matrix`), and
  the batch runs the fixed schedule ``G G G H G G G``: three generic slots, the hue rotation,
  three more. A sample whose hue comes at position ``k`` of its permutation puts its ``k``
  earlier ops in the first slots and the rest after the hue, so every one of the 24 orders
  fits; unused slots get the identity matrix, which leaves a sample unchanged bit for bit.
  No op sees a data-dependent subset of the batch.
- Identity parameters instead of selects. Every sample goes through every op; one that skips
  it gets the op's identity (factor 1, hue shift 0, a delta blur kernel, the identity colour
  matrix, a solarize threshold above 1), so no op computes a result to throw it away.
- Grayscale joins the normalization. Grayscale is a per-pixel colour map and the blur a
  per-plane filter whose kernel sums to 1, so they commute: grayscale is applied after the
  blur, in the same GEMM as ``(x - mean) / std``, which also writes the output dtype and the
  channels_last layout (when solarize is on, it keeps its place between them).
- Blur. The official code blurs with PIL (radius = sigma). This follows torchvision's
  ``GaussianBlur(kernel_size=23, sigma=(0.1, 2.0))`` as mmpretrain and solo-learn do: a true
  Gaussian truncated at 11 px (>= 5.5 sigma), reflect padding; ``aug.blur_kernel_size`` sets
  the size (23 is 10% of 224, rounded to odd, as in SimCLR).
- Flip. Mirroring commutes with every other op here (symmetric kernel, per-pixel or
  whole-image colour ops), so it is applied first, on the uint8 data (a quarter of the
  bytes), which is then converted to float once.
- Memory traffic. On a GPU these ops are memory bound. uint8 input is converted once to
  ``compute_dtype`` (float16 on CUDA for 16-bit output: half the bytes of float32). In eager
  torch each jitter slot needs its GEMM (read and write the batch), its clamp (torchvision
  clamps after every op, and no eager GEMM clamps its output) and the contrast's mean luma,
  and the hue rotation ~20 plane-sized passes: 2 x 256 views at 224 px, bf16 out, count 103
  kernels and 10.6 GB (``benchmarks/augment.py --count``, fake CUDA). On CUDA, by default
  (``fused_color``), the call is four runtime-compiled kernels from the uint8 views to the
  output (:mod:`fastsiam.augment.fused`): the flip, the conversion and the whole ColorJitter
  (every sample's ops in its own order) in two, the blur's two passes with grayscale,
  normalization and the cast in the second: 29 kernels (the rest are the draws' small ones),
  0.93 GB. ``compile=True`` hands the ops (not the random draws)
  to ``torch.compile`` instead, which fuses the elementwise chains; benchmarks/augment.py
  measures all three.
- Random numbers. A batch whose loader carried them (``TwoViewBatch.draws``: per seed, epoch,
  sample and view, so a sample is augmented the same on any rank or world size) is augmented
  with those; otherwise they come from ``torch.rand`` on the device (the given generator, or
  the device's default one, which a captured graph advances on every replay).
- CUDA graphs. No value is read on the host and every shape is static. The first call on a
  device builds small constant tensors there (mean, std, factor ranges) and checks the fused
  kernels once: make it before capture, as the warm-up that capture needs anyway. A
  non-default CUDA generator must be registered with the graph
  (``CUDAGraph.register_generator_state``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from fastsiam.augment import functional as AF
from fastsiam.augment import fused
from fastsiam.config import IMAGENET_MEAN, IMAGENET_STD, AugConfig, check_fields
from fastsiam.data.batch import TwoViewBatch
from fastsiam.runtime import memory_format

__all__ = ["DRAWS", "DRAW_COLUMNS", "AugParams", "SimSiamAugment", "to_normalized"]

# Column of each op in AugParams.factors / AugParams.order, as torchvision's ColorJitter fn_idx.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3


class AugParams(NamedTuple):
    """One draw for ``N`` samples: everything :meth:`SimSiamAugment.apply` needs.

    Attributes:
        flip: bool ``[N]``, mirror left-right.
        jitter: bool ``[N]``, apply ColorJitter.
        factors: float ``[N, 4]``: brightness, contrast, saturation factors and hue shift.
        order: int64 ``[N, 4]``: ``order[i, k]`` is the op (column of ``factors``) applied k-th.
        gray: bool ``[N]``, convert to grayscale (after ColorJitter).
        blur: bool ``[N]``, Gaussian blur with ``sigma``.
        sigma: float ``[N]``, blur sigma.
        solarize: bool ``[N]``, solarize (after blur).
    """

    flip: Tensor
    jitter: Tensor
    factors: Tensor
    order: Tensor
    gray: Tensor
    blur: Tensor
    sigma: Tensor
    solarize: Tensor


# The uniforms one sample draws, column by column: (AugParams field, columns). One table, so an
# op's draw is declared once (its row here, its field in AugParams, its mapping in params_from)
# and the columns never need counting by hand.
DRAWS: tuple[tuple[str, int], ...] = (
    ("flip", 1), ("jitter", 1), ("factors", 4), ("order", 4), ("gray", 1), ("blur", 1),
    ("sigma", 1), ("solarize", 1),
)
DRAW_COLUMNS = sum(n for _, n in DRAWS)


def split_draws(u: Tensor) -> dict[str, Tensor]:
    """``[N, DRAW_COLUMNS]`` uniforms as each field's ``[N]`` (one column) or ``[N, k]`` view."""
    out, start = {}, 0
    for name, n in DRAWS:
        out[name] = u[:, start] if n == 1 else u[:, start:start + n]
        start += n
    return out


class SimSiamAugment(nn.Module):
    """Batched SimSiam view augmentation: uint8 crops in, two normalized views out.

    Keyword names are the fields of :class:`fastsiam.config.AugConfig`; the defaults are the
    SimSiam recipe.

    Args:
        hflip_p: probability of a horizontal flip.
        color_jitter_p: probability of applying ColorJitter.
        brightness: brightness factor drawn from ``[max(0, 1 - b), 1 + b]`` (0 disables).
        contrast: contrast factor drawn from ``[max(0, 1 - c), 1 + c]`` (0 disables).
        saturation: saturation factor drawn from ``[max(0, 1 - s), 1 + s]`` (0 disables).
        hue: hue shift drawn from ``[-hue, hue]``, at most 0.5 (0 disables).
        grayscale_p: probability of converting to grayscale (after ColorJitter).
        blur_p: probability of a Gaussian blur.
        blur_sigma: ``(min, max)`` of the blur's sigma, in pixels.
        blur_kernel_size: odd side of the blur kernel.
        solarize_p: probability of solarizing (0 for SimSiam; BYOL uses 0.2 on one view).
        solarize_threshold: pixels at or above it (in [0, 1]) are inverted.
        mean: per-channel mean subtracted at the end (ImageNet's).
        std: per-channel std divided by at the end (ImageNet's).
        out_dtype: dtype of the returned views (float32, bfloat16 or float16).
        channels_last: return views in channels_last memory format.
        compute_dtype: the working dtype of uint8 input after the conversion. Default: float16
            on CUDA when ``out_dtype`` is 16-bit (half the bytes of every pass; its 11-bit
            mantissa keeps the result within a few 16-bit roundings of float32 - bfloat16's 8
            bits would not, through the hue's arithmetic), float32 otherwise (the CPU path).
        compile: run the ops (not the random draws, which keep the given generator) through
            ``torch.compile``, which fuses the elementwise chains into a few kernels. Eager
            mode makes one pass over the batch per op, and the colour ops are memory bound.
        fused_color: on CUDA, run the call as four runtime-compiled kernels from the uint8
            views to the output (:mod:`fastsiam.augment.fused`, ``torch.cuda._compile_kernel``)
            instead of a pass per op (with solarize on, the first two); checked against the
            plain ops at first use, which stay in use (with a warning) if the check fails.
            No effect on the CPU, on floating input, with ``compile`` or a bfloat16
            ``compute_dtype``.
    """

    # The recipe, as checked against AugConfig (set in __init__ by name).
    hflip_p: float
    color_jitter_p: float
    brightness: float
    contrast: float
    saturation: float
    hue: float
    grayscale_p: float
    blur_p: float
    blur_sigma: tuple[float, float]
    blur_kernel_size: int
    solarize_p: float
    solarize_threshold: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    fused_color: bool

    def __init__(
        self,
        *,
        hflip_p: float = 0.5,
        color_jitter_p: float = 0.8,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.4,
        hue: float = 0.1,
        grayscale_p: float = 0.2,
        blur_p: float = 0.5,
        blur_sigma: tuple[float, float] | list[float] = (0.1, 2.0),
        blur_kernel_size: int = 23,
        solarize_p: float = 0.0,
        solarize_threshold: float = 0.5,
        mean: tuple[float, ...] | list[float] = IMAGENET_MEAN,
        std: tuple[float, ...] | list[float] = IMAGENET_STD,
        out_dtype: torch.dtype = torch.float32,
        channels_last: bool = True,
        compute_dtype: torch.dtype | None = None,
        compile: bool = False,
        fused_color: bool = True,
    ):
        super().__init__()
        # Every recipe setting is an AugConfig field, checked against its bounds there (one
        # statement of each): a value out of them is the same one-line error a config file gets.
        given = locals()
        recipe = check_fields(AugConfig, {f.name: given[f.name] for f in dataclasses.fields(AugConfig)},
                              "aug", "SimSiamAugment")
        for name, dtype in (("out_dtype", out_dtype), ("compute_dtype", compute_dtype)):
            if dtype is not None and not dtype.is_floating_point:
                raise ValueError(f"SimSiamAugment: {name} must be a floating dtype, got {dtype}")
        for name, value in recipe.items():  # lists (blur_sigma, mean, std) kept as tuples
            setattr(self, name, tuple(value) if isinstance(value, list) else value)
        self.out_dtype = out_dtype
        self.compute_dtype = compute_dtype
        self.channels_last = channels_last

        # ColorJitter's factor ranges (torchvision's _check_input); a disabled op draws 1 (or
        # hue 0), which is its identity, and is left out of the schedule.
        ranges = [(max(0.0, 1.0 - v), 1.0 + v) for v in (self.brightness, self.contrast, self.saturation)]
        ranges.append((-self.hue, self.hue))
        self._factor_lo = [lo for lo, _ in ranges]
        self._factor_span = [hi - lo for lo, hi in ranges]
        self._generic = [op for op, v in ((BRIGHTNESS, self.brightness), (CONTRAST, self.contrast),
                                          (SATURATION, self.saturation)) if v > 0]
        self._hue_on = self.hue > 0
        self._jitter_on = self.color_jitter_p > 0 and (bool(self._generic) or self._hue_on)
        self._consts: dict[torch.device, dict[str, Tensor]] = {}
        self._typed_consts: dict[tuple[torch.device, torch.dtype], dict[str, Tensor]] = {}
        self._mean_weights: dict[tuple[torch.device, torch.dtype, int], Tensor] = {}
        # Shapes are static per run; dynamic=False keeps every kernel specialized to them.
        self._compiled = torch.compile(self._pipeline, dynamic=False) if compile else None

    @classmethod
    def from_config(cls, aug_cfg: Any, **kwargs: Any) -> SimSiamAugment:
        """Build from the config's ``aug`` section (:class:`fastsiam.config.AugConfig`)."""
        fields = {f.name: getattr(aug_cfg, f.name) for f in dataclasses.fields(aug_cfg)}
        return cls(**fields, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"hflip_p={self.hflip_p}, color_jitter_p={self.color_jitter_p}, "
            f"jitter=({self.brightness}, {self.contrast}, {self.saturation}, {self.hue}), "
            f"grayscale_p={self.grayscale_p}, blur_p={self.blur_p}, blur_sigma={self.blur_sigma}, "
            f"blur_kernel_size={self.blur_kernel_size}, solarize_p={self.solarize_p}, "
            f"out_dtype={self.out_dtype}, channels_last={self.channels_last}, "
            f"compile={self._compiled is not None}, fused_color={self.fused_color}"
        )

    def _constants(self, device: torch.device) -> dict[str, Tensor]:
        consts = self._consts.get(device)
        if consts is None:
            f32 = dict(dtype=torch.float32, device=device)
            consts = {
                "factor_lo": torch.tensor(self._factor_lo, **f32),
                "factor_span": torch.tensor(self._factor_span, **f32),
                # (x - mean) / std as one multiply-add: x * (1 / std) + (-mean / std)
                "scale": torch.tensor([1.0 / s for s in self.std], **f32).view(1, 3, 1, 1),
                "shift": torch.tensor([-m / s for m, s in zip(self.mean, self.std)], **f32).view(1, 3, 1, 1),
                # Column indices of the enabled ColorJitter ops, as device tensors: indexing a
                # CUDA tensor with a Python list builds the index on the host and copies it,
                # which a captured CUDA graph cannot do.
                "generic": torch.tensor(self._generic, dtype=torch.long, device=device),
                "jitter_ops": torch.tensor(self._generic + ([HUE] if self._hue_on else []),
                                           dtype=torch.long, device=device),
                "slots": torch.arange(6, device=device),
                "eye": torch.eye(3, **f32),
                # every output channel = the luma (ITU-R 601-2, as torchvision's grayscale)
                "luma": torch.tensor([list(AF.LUMA)] * 3, **f32),
                "luma_row": torch.tensor(AF.LUMA, **f32),
                "delta": torch.zeros(self.blur_kernel_size, **f32),  # the identity blur kernel
                "one": torch.ones(1, **f32),
            }
            consts["norm"] = torch.cat([consts["scale"].flatten(), consts["shift"].flatten()])  # the fused kernels' form
            consts["delta"][self.blur_kernel_size // 2] = 1.0
            self._consts[device] = consts
        return consts

    def _typed(self, device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
        """The colour-matrix and blur constants in the working dtype (cast once per dtype)."""
        key = (device, dtype)
        typed = self._typed_consts.get(key)
        if typed is None:
            c = self._constants(device)
            typed = {k: c[k].to(dtype) for k in ("eye", "luma", "delta")}
            self._typed_consts[key] = typed
        return typed

    def _mean_luma_weights(self, x: Tensor) -> Tensor:
        """``[3 * H * W]``: the luma weight of each value over the pixel count, so one GEMV of
        the planar batch gives every image's mean luma (a single read of the batch)."""
        key = (x.device, x.dtype, x.shape[2] * x.shape[3])
        w = self._mean_weights.get(key)
        if w is None:
            luma = self._constants(x.device)["luma_row"] / key[2]
            w = luma.repeat_interleave(key[2]).to(x.dtype)
            self._mean_weights[key] = w
        return w

    def sample_params(
        self, n: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> AugParams:
        """Draw the random parameters of ``n`` samples on ``device`` (one ``torch.rand`` call)."""
        return self.params_from(torch.rand(n, DRAW_COLUMNS, generator=generator, device=torch.device(device)))

    def params_from(self, uniforms: Tensor) -> AugParams:
        """The parameters of ``N`` samples from their uniforms in [0, 1), ``[N, DRAW_COLUMNS]``
        (columns as :data:`DRAWS`): drawn on the device, or carried by the batch
        (``TwoViewBatch.draws``, a function of each sample and view alone)."""
        if uniforms.dim() != 2 or uniforms.shape[1] != DRAW_COLUMNS:
            raise ValueError(f"SimSiamAugment: expected uniforms [N, {DRAW_COLUMNS}] (one row per view, "
                             f"columns as DRAWS), got {list(uniforms.shape)}")
        c = self._constants(uniforms.device)
        u = split_draws(uniforms)
        lo_s, hi_s = self.blur_sigma
        return AugParams(
            flip=u["flip"] < self.hflip_p,
            jitter=u["jitter"] < self.color_jitter_p,
            factors=torch.addcmul(c["factor_lo"], u["factors"], c["factor_span"]),
            # Sorting i.i.d. uniforms gives each of the 24 permutations with equal probability.
            order=u["order"].argsort(dim=1),
            gray=u["gray"] < self.grayscale_p,
            blur=u["blur"] < self.blur_p,
            sigma=u["sigma"] * (hi_s - lo_s) + lo_s,
            solarize=u["solarize"] < self.solarize_p,
        )

    def apply(self, img: Tensor, params: AugParams) -> Tensor:
        """Augment ``[N, 3, H, W]`` images with ``params``; planar (NCHW) images in [0, 1] out.

        ``img`` is uint8 (0-255, flipped while still 1 byte per value, then converted once to
        the working dtype, see ``compute_dtype``) or float in [0, 1] (kept in its dtype). No
        normalization. Every op runs on every sample with identity parameters where a sample
        skips it (factor 1, hue shift 0, a delta blur kernel, an identity colour matrix), so
        no op needs a select afterwards and every shape is static.
        """
        x = self._jitter_and_blur(img, params)
        if self.grayscale_p > 0:
            x = AF.color_matrix(x, self._gray_matrices(params, x), clamp=False)
        if self.solarize_p > 0:
            x = self._solarize(x, params)
        return x

    def _jitter_and_blur(self, img: Tensor, params: AugParams) -> Tensor:
        """Flip, ColorJitter, blur. Grayscale is a per-pixel colour map and the blur a per-plane
        filter with a kernel that sums to 1, so the two commute: grayscale comes after the blur,
        where it can join the normalization in one GEMM (:meth:`_pipeline`)."""
        if self._use_fused(img):
            x = self._fused_planar(img, params)
        else:
            x = self._to_planar(img, params)
            if self._jitter_on:
                x = self._color_jitter(x, params)
        if self.blur_p > 0:
            x = AF.separable_blur(x, self._blur_kernels(params, x.dtype))
        return x

    def _blur_kernels(self, params: AugParams, dtype: torch.dtype) -> Tensor:
        """``[N, blur_kernel_size]``: each sample's Gaussian, or the delta where it skips the blur."""
        return torch.where(params.blur.unsqueeze(1), AF.gaussian_kernels(params.sigma, self.blur_kernel_size, dtype),
                           self._typed(params.sigma.device, dtype)["delta"])

    def _gray_matrices(self, params: AugParams, x: Tensor) -> Tensor:
        """``[N, 3, 3]``: the luma on every channel where a sample turns grey, else identity."""
        t = self._typed(x.device, x.dtype)
        return torch.where(params.gray.view(-1, 1, 1), t["luma"], t["eye"])

    def _solarize(self, x: Tensor, params: AugParams) -> Tensor:
        # A threshold above 1 leaves a sample as it is: no select afterwards.
        threshold = torch.where(params.solarize, self.solarize_threshold, 2.0).to(x.dtype)
        return AF.solarize(x, threshold)

    def _working_dtype(self, device: torch.device) -> torch.dtype:
        if self.compute_dtype is not None:
            return self.compute_dtype
        reduced = self.out_dtype in (torch.float16, torch.bfloat16)
        return torch.float16 if reduced and device.type == "cuda" else torch.float32

    def _to_planar(self, img: Tensor, params: AugParams) -> Tensor:
        """Flip (on uint8 data: a quarter of the float traffic), then NCHW in [0, 1]."""
        x = AF.hflip(img, params.flip) if self.hflip_p > 0 else img
        if x.dtype != torch.uint8:
            return x.contiguous()
        planar = torch.empty(x.shape, dtype=self._working_dtype(x.device), device=x.device)
        return torch.mul(x, 1.0 / 255.0, out=planar)  # torchvision's to_dtype(scale=True)

    def _color_jitter(self, x: Tensor, params: AugParams) -> Tensor:
        """ColorJitter in each sample's own order, as the ``G.. H G..`` schedule (module doc).

        Each generic slot is one colour matrix per sample (brightness ``f I``, saturation
        ``f I + (1 - f) luma``, contrast ``f I`` plus ``(1 - f)`` times the image's mean luma,
        identity for a sample with no op in that slot) and one clamp: a GEMM over the batch.
        """
        c = self._constants(x.device)
        m = len(self._generic)
        rank = params.order.argsort(dim=1).index_select(1, c["jitter_ops"])  # when each enabled op comes, in 0..3
        pos = (rank.unsqueeze(1) < rank.unsqueeze(2)).sum(dim=2)  # ... among the enabled ops
        gpos = pos[:, :m]
        # Ops before the hue go to slots 0..m-1, ops after it to slots m..2m-1.
        slot = torch.where(gpos < pos[:, m:], gpos, gpos + (m - 1)) if self._hue_on else gpos
        slots = 2 * m if self._hue_on else m
        # [S, N, m]: which op (if any) each sample runs in each slot
        hits = (slot.unsqueeze(0) == c["slots"][:slots].view(-1, 1, 1)) & params.jitter.view(1, -1, 1)
        factors = params.factors.index_select(1, c["generic"]).to(x.dtype)
        factor = torch.where(hits.any(dim=2), (hits * factors).sum(dim=2), 1.0)          # [S, N]
        sat, con = (hits[..., self._generic.index(op)] if op in self._generic else None
                    for op in (SATURATION, CONTRAST))
        toward_luma = None if sat is None else (1.0 - factor) * sat  # [S, N]
        mean_weight = None if con is None else (1.0 - factor) * con  # [S, N]
        shift = torch.where(params.jitter, params.factors[:, HUE], 0.0).to(x.dtype) if self._hue_on else None
        t = self._typed(x.device, x.dtype)
        matrices = factor.view(*factor.shape, 1, 1) * t["eye"]                            # [S, N, 3, 3]
        if toward_luma is not None:
            matrices = torch.addcmul(matrices, toward_luma.view(*factor.shape, 1, 1), t["luma"])
        for step in range(slots):
            if shift is not None and step == m:
                x = AF.adjust_hue(x, shift)
            offset = None
            if mean_weight is not None:  # contrast: blend toward the image's mean luma
                offset = torch.mul(mean_weight[step], self._mean_luma(x)).unsqueeze(1)
            x = AF.color_matrix(x, matrices[step], offset)
        if shift is not None and slots == m:  # no generic op enabled: the hue alone
            x = AF.adjust_hue(x, shift)
        return x

    def _use_fused(self, img: Tensor) -> bool:
        """The fused kernels take uint8 views on CUDA, when switched on and not under ``compile``
        (which fuses the plain ops itself), once :func:`~fastsiam.augment.fused.fused_color_works`
        for the working dtype (float32 or float16; bfloat16 stays on the plain ops)."""
        if not (self.fused_color and self._compiled is None and img.device.type == "cuda"
                and img.dtype == torch.uint8):
            return False
        dtype = self._working_dtype(img.device)
        return dtype in fused.PLANAR_DTYPES and fused.fused_color_works(img.device, dtype)

    def _fused_planar(self, img: Tensor, params: AugParams) -> Tensor:
        """The flip, the conversion and ColorJitter of uint8 ``img`` in the fused kernels: planar
        in the working dtype (what :meth:`_to_planar` and :meth:`_color_jitter` give)."""
        return fused.color_pixels(img, fused.pixel_params(params.flip, params.jitter, params.order, params.factors),
                                  self._working_dtype(img.device), contrast=self.contrast > 0)

    def _mean_luma(self, x: Tensor) -> Tensor:
        """``[N]``: each image's mean luma, as one GEMV of the planar batch (one read)."""
        return x.reshape(x.shape[0], -1) @ self._mean_luma_weights(x)

    def forward(self, batch: TwoViewBatch, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Augment and normalize both views: ``(view1, view2)`` in ``out_dtype``.

        uint8 views are augmented (both views in one batch, each sample with its own draws);
        floating views (already augmented by the PIL reference loader) only change dtype and
        memory format.
        """
        views = batch.views  # [2B, 3, H, W]: both views, one tensor (no concatenation)
        n = views.shape[0] // 2
        if views.is_floating_point():
            out = self._finish(views)
            return out[:n], out[n:]
        if views.dtype != torch.uint8:
            raise ValueError(f"SimSiamAugment: expected uint8 (or already augmented float) views, got {views.dtype}")
        if views.shape[1] != 3:
            raise ValueError(f"SimSiamAugment: expected views [2B, 3, H, W], got {list(views.shape)}")
        # The batch's own draws when the loader carried them (the same for a sample on any rank
        # or world size), else fresh ones from the device's generator.
        params = (self.params_from(batch.draws) if batch.draws.shape[1]
                  else self.sample_params(2 * n, views.device, generator))
        pipeline = self._pipeline if self._compiled is None else self._compiled
        out = pipeline(views, params, self._constants(views.device))
        return out[:n], out[n:]

    def _pipeline(self, x: Tensor, params: AugParams, consts: dict[str, Tensor]) -> Tensor:
        if self.solarize_p > 0:  # solarize sits between grayscale and normalization
            return self._normalize(self.apply(x, params), consts)
        if self._use_fused(x):  # four kernels from the uint8 views to the output (module doc)
            planar = self._fused_planar(x, params)
            kernels = self._blur_kernels(params, torch.float32) if self.blur_p > 0 else consts["one"].expand(x.shape[0], 1)
            gray = params.gray if self.grayscale_p > 0 else consts["one"].new_zeros(x.shape[0])
            return fused.blur_normalize(planar, kernels, gray, consts["norm"], self.out_dtype, self.channels_last)
        x = self._jitter_and_blur(x, params)
        # Grayscale, normalization, the cast and the memory format in one GEMM:
        # out = diag(1 / std) @ G_i @ pixel - mean / std, written NHWC when channels_last.
        gray = self._gray_matrices(params, x) if self.grayscale_p > 0 else consts["eye"].unsqueeze(0)
        matrices = consts["scale"].view(1, 3, 1) * gray.to(consts["scale"].dtype)
        out = AF.color_matrix(x, matrices, consts["shift"].view(1, 3), clamp=False,
                              channels_last_out=self.channels_last)
        return out.to(self.out_dtype)

    def _normalize(self, x: Tensor, consts: dict[str, Tensor]) -> Tensor:
        """``(x - mean) / std`` written straight into the output dtype and memory format."""
        fmt = memory_format(self.channels_last)
        if torch.compiler.is_compiling():
            # Under torch.compile an out= tensor loses its memory format; the fused cast keeps it.
            return torch.addcmul(consts["shift"], x, consts["scale"]).to(self.out_dtype).contiguous(memory_format=fmt)
        out = torch.empty(x.shape, dtype=self.out_dtype, device=x.device, memory_format=fmt)
        return torch.addcmul(consts["shift"], x, consts["scale"], out=out)

    def _finish(self, x: Tensor) -> Tensor:
        return x.to(dtype=self.out_dtype, memory_format=memory_format(self.channels_last))


_NORMALIZE_CONSTANTS: dict[tuple[Any, ...], tuple[Tensor, Tensor]] = {}


def to_normalized(
    img_uint8: Tensor,
    mean: tuple[float, ...] | list[float] | Tensor,
    std: tuple[float, ...] | list[float] | Tensor,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """uint8 ``[B, 3, H, W]`` -> ``(img / 255 - mean) / std`` in ``dtype``, channels_last.

    Sequences ``mean``/``std`` become device tensors once per device and reused: a copy from
    the host in every evaluation batch would make the host wait for the device each time.
    """
    if img_uint8.dtype != torch.uint8 or img_uint8.dim() != 4 or img_uint8.shape[1] != 3:
        raise ValueError(f"to_normalized: expected uint8 images [B, 3, H, W], got {img_uint8.dtype} {list(img_uint8.shape)}")
    if not isinstance(mean, Tensor) and not isinstance(std, Tensor):
        key = (tuple(float(m) for m in mean), tuple(float(s) for s in std), img_uint8.device)
        if key not in _NORMALIZE_CONSTANTS:
            _NORMALIZE_CONSTANTS[key] = tuple(  # type: ignore[assignment]
                torch.tensor(v, dtype=torch.float32, device=img_uint8.device) for v in key[:2])
        mean, std = _NORMALIZE_CONSTANTS[key]
    x = img_uint8.to(torch.float32).mul_(1.0 / 255.0)
    return AF.normalize(x, mean, std).to(dtype=dtype, memory_format=torch.channels_last)
