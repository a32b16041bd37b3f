"""A constructed, near-invertible ``AutoencoderKL`` for the toy world (a trained tiny VAE lost colour through its
GroupNorms; this one keeps it exactly).

Encoder: ``conv_in`` writes the image's colour (offset so that white is 0) and its negation into 6 channels and
constants +-K into the other 10; the resnets are identities (``conv2`` = 0); each downsampler is an exact 2x2
average; the single-group GroupNorm then sees mean 0 and a variance fixed by the constants (content moves it by
<0.1%), so it is an affine map, pushed by its bias into the range where SiLU is the identity to 1e-4; ``conv_out``
maps the 8x8-averaged colour to 4 latent channels (a whitening fitted on renders, unit variance per channel) with
log-variance -30 (sampling = the mean). Decoder: the pseudo-inverse back to colour, nearest upsampling with a
[1 2 1] blur, and ``conv_out`` fitted by least squares on renders.
"""
from __future__ import annotations

import numpy as np
import torch

from .render import BASE_COLOURS, BASE_SHAPES, COLOURS, SHAPES, SIZE, render_set, to_tensor

CH = 16          # channels of every block: 6 carry colour, the rest constants
NC = (CH - 6) // 2
K = 50.0         # the constant channels' value
LIFT = 12.0      # GroupNorm bias: SiLU(x + 12) = x + 12 to 1e-4 on colour in [-2, 0]
LATENT_CH = 4


def _blank(**extra):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(CH,) * 4, layers_per_block=1,
        latent_channels=LATENT_CH, norm_num_groups=1, sample_size=SIZE, mid_block_add_attention=False, **extra)
    for p in vae.parameters():
        torch.nn.init.zeros_(p)
    return vae


def _lift_layout(conv: torch.nn.Conv2d, weight3: torch.Tensor, bias3: torch.Tensor) -> None:
    """``conv`` (center tap only): channels 0-2 = weight3 @ x + bias3, 3-5 their negation, then NC x +K, NC x -K."""
    c = conv.kernel_size[0] // 2
    conv.weight.data[0:3, :, c, c] = weight3
    conv.weight.data[3:6, :, c, c] = -weight3
    conv.bias.data[0:3], conv.bias.data[3:6] = bias3, -bias3
    conv.bias.data[6:6 + NC], conv.bias.data[6 + NC:] = K, -K


def _norm_as_affine(norm: torch.nn.GroupNorm) -> None:
    # variance over the channels is ~2 NC K^2 / CH whatever the content: dividing by it and multiplying back is a no-op
    sigma = K * (2 * NC / CH) ** 0.5
    norm.weight.data[:] = sigma
    norm.bias.data[:6] = LIFT


def _identities(module) -> None:
    from diffusers.models.resnet import ResnetBlock2D

    for m in module.modules():
        if isinstance(m, ResnetBlock2D):  # conv2 = 0 -> output = input
            m.norm1.weight.data[:] = 1.0
            m.norm2.weight.data[:] = 1.0


def _pooled_colour(images: np.ndarray) -> torch.Tensor:
    """[N, 3, 8, 8]: each 8x8 block's mean colour in [-1, 1] minus 1 (white = 0)."""
    x = to_tensor(images) - 1.0
    return torch.nn.functional.avg_pool2d(x, 8)


def _fit_whitening(images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [4, 3], a [4]) with latent = A @ colour + a of zero mean and unit variance per channel on ``images``."""
    c = _pooled_colour(images).permute(0, 2, 3, 1).reshape(-1, 3).double()
    mu = c.mean(0)
    cov = torch.cov((c - mu).T)
    evals, evecs = torch.linalg.eigh(cov)
    white = evecs @ torch.diag(evals.clamp_min(1e-8).rsqrt()) @ evecs.T  # 3 -> 3, unit covariance
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(LATENT_CH, 3, generator=g, dtype=torch.float64))  # 4x3, orthonormal cols
    A = q * (LATENT_CH / 3) ** 0.5 @ white  # [4, 3] float64
    return A.float(), (-(A @ mu)).float()


def build_vae(fit_images: int = 2, seed: int = 0):
    """The constructed AutoencoderKL (scaling_factor 1: its latents already have unit variance)."""
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    images, _ = render_set(pairs, fit_images, seed)
    vae = _blank(scaling_factor=1.0)
    A, a = _fit_whitening(images)
    enc, dec = vae.encoder, vae.decoder
    with torch.no_grad():
        _lift_layout(enc.conv_in, torch.eye(3), torch.full((3,), -1.0))  # colour - 1: white is 0
        for block in enc.down_blocks:
            if block.downsamplers:
                conv = block.downsamplers[0].conv  # pads (0, 1, 0, 1), stride 2: taps 0-1 are one 2x2 window
                for ch in range(CH):
                    conv.weight.data[ch, ch, 0:2, 0:2] = 0.25
        _identities(vae)
        _norm_as_affine(enc.conv_norm_out)
        enc.conv_out.weight.data[:LATENT_CH, 0:3, 1, 1] = A
        enc.conv_out.bias.data[:LATENT_CH] = a - A.sum(1) * LIFT
        enc.conv_out.bias.data[LATENT_CH:] = -30.0  # log-variance: sampling returns the mean
        eye = torch.eye(2 * LATENT_CH)
        vae.quant_conv.weight.data[:, :, 0, 0] = eye
        vae.post_quant_conv.weight.data[:, :, 0, 0] = eye[:LATENT_CH, :LATENT_CH]
        pinv = torch.linalg.pinv(A.double()).float()  # [3, 4]
        _lift_layout(dec.conv_in, pinv, -(pinv @ a))
        blur = torch.tensor([1.0, 2.0, 1.0])
        blur = torch.outer(blur, blur) / 16
        for block in dec.up_blocks:
            if block.upsamplers:
                conv = block.upsamplers[0].conv
                for ch in range(CH):
                    if ch < 6:
                        conv.weight.data[ch, ch] = blur   # colour: zero padding = white, so borders stay right
                    else:
                        conv.weight.data[ch, ch, 1, 1] = 1.0
        _norm_as_affine(dec.conv_norm_out)
        _fit_decoder_out(vae, images)
    return vae.eval()


def _fit_decoder_out(vae, images: np.ndarray) -> None:
    """Least squares: the 3x3 taps of the 6 colour channels before ``conv_out`` -> the rendered pixels."""
    dec = vae.decoder
    captured = {}
    hook = dec.conv_out.register_forward_hook(lambda m, inp, out: captured.__setitem__("h", inp[0]))
    x = to_tensor(images)
    vae.decode(vae.encode(x).latent_dist.mode())
    hook.remove()
    h = captured["h"][:, :6]  # [N, 6, 64, 64]
    cols = torch.nn.functional.unfold(h, 3, padding=1)  # [N, 54, 4096]
    X = torch.cat([cols.permute(0, 2, 1).reshape(-1, 54), torch.ones(cols.shape[0] * cols.shape[2], 1)], 1)
    Y = x.permute(0, 2, 3, 1).reshape(-1, 3)
    sol = torch.linalg.lstsq(X.double(), Y.double()).solution.float()  # [55, 3]
    dec.conv_out.weight.data.zero_()
    dec.conv_out.weight.data[:, :6] = sol[:54].T.reshape(3, 6, 3, 3)
    dec.conv_out.bias.data[:] = sol[54]


def encode(vae, images: np.ndarray) -> torch.Tensor:
    """uint8 images [N, 64, 64, 3] -> latents [N, 4, 8, 8] (times the scaling factor, as the trainer sees them)."""
    with torch.no_grad():
        return vae.encode(to_tensor(images)).latent_dist.mode() * vae.config.scaling_factor


__all__ = ["build_vae", "encode", "BASE_COLOURS", "BASE_SHAPES"]
