"""An adversarial term for autoencoder training: a PatchGAN discriminator with the hinge loss.

Pixel and feature losses regress to the mean of what a code could stand for, so a decoder trained on them
alone paints soft edges and flat texture; a discriminator that judges local patches pushes the decoder
toward sharp, plausible detail instead (the VQGAN recipe that upstream VAR's tokenizer was trained with).
Used in a decoder-only fine-tune it changes no code and no latent, so a transformer trained on the frozen
tokenizer stays valid and simply decodes to sharper pictures.

The discriminator and its optimizer belong to the task, not to the loop's module: the loop's optimizer,
EMA and clipping see only the autoencoder. Their state is saved in the task state, so a resumed run is exact,
and under DDP their gradients are averaged by hand, so the replicas stay identical.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidOption, WeightsNotFound
from .dist import DistContext, all_reduce_sum


class PatchDiscriminator(nn.Module):
    """pix2pix-style N-layer patch discriminator (GroupNorm instead of BatchNorm: no cross-process state).

    ``layers`` stride-2 convolutions then two stride-1 ones; a 128 px image gives a grid of patch logits.
    """

    def __init__(self, channels: int = 32, layers: int = 3, in_channels: int = 3) -> None:
        super().__init__()
        if channels < 8 or channels % 4 or layers < 1:  # GroupNorm(8) on 2·channels and wider
            raise InvalidOption(
                "loss.disc_channels must be a multiple of 4 >= 8 and loss.disc_layers >= 1, "
                f"got {channels}, {layers}"
            )
        mods: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = channels
        for i in range(1, layers + 1):
            c_next = channels * min(2**i, 8)
            stride = 2 if i < layers else 1
            mods += [nn.Conv2d(c, c_next, 4, stride, 1), nn.GroupNorm(8, c_next), nn.LeakyReLU(0.2)]
            c = c_next
        mods.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())


class Adversary:
    """Discriminator, its optimizer, and the generator's adaptively weighted term.

    ``weight`` scales the term after VQGAN's adaptive balance: the ratio of the reconstruction loss's gradient
    norm to the adversarial loss's at the decoder's last layer, so one weight works across decoders. The
    discriminator trains from step 0; the generator sees the term from ``start`` on (a warmed-up critic).
    """

    def __init__(
        self,
        weight: float,
        start: int,
        lr: float,
        channels: int,
        layers: int,
        seed: int,
        ctx: DistContext,
    ) -> None:
        if weight < 0 or start < 0 or lr <= 0:
            raise ValueError(
                f"gan_weight/gan_start must be >= 0 and disc_lr > 0, got {weight}, {start}, {lr}"
            )
        self.weight, self.start, self.ctx = weight, start, ctx
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 4242)
            self.disc = PatchDiscriminator(channels, layers).to(ctx.device)
        self.opt = torch.optim.AdamW(self.disc.parameters(), lr=lr, betas=(0.5, 0.9), weight_decay=0.0)

    def disc_step(self, real: torch.Tensor, fake: torch.Tensor) -> dict[str, float]:
        """One discriminator update on real images and (detached) reconstructions."""
        self.disc.requires_grad_(True)
        self.opt.zero_grad(set_to_none=True)
        lr_, lf = self.disc(real), self.disc(fake.detach())
        loss = hinge_d_loss(lr_, lf)
        loss.backward()
        if self.ctx.distributed:
            for p in self.disc.parameters():
                if p.grad is not None:
                    all_reduce_sum(p.grad, self.ctx).div_(self.ctx.world)
        self.opt.step()
        return {"d_loss": loss.item(), "d_real": lr_.mean().item(), "d_fake": lf.mean().item()}

    def generator_term(
        self, rec: torch.Tensor, recon_loss: torch.Tensor, last: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """``weight·λ·(−D(rec))`` with λ = ‖∇_last recon‖ / ‖∇_last adv‖ (0 before ``start``)."""
        if step < self.start or self.weight == 0:
            return rec.new_zeros(()), {}
        self.disc.requires_grad_(False)  # the generator's backward must not touch the critic
        g = -self.disc(rec).mean()
        gr = torch.autograd.grad(recon_loss, last, retain_graph=True)[0]
        ga = torch.autograd.grad(g, last, retain_graph=True)[0]
        lam = (gr.norm() / (ga.norm() + 1e-4)).clamp(0.0, 1e4).detach()
        return self.weight * lam * g, {"g_adv": g.item(), "lam": lam.item()}

    def step(
        self,
        x: torch.Tensor,
        rec: torch.Tensor,
        recon_loss: torch.Tensor,
        last: torch.Tensor,
        step: int,
        logs: dict[str, float],
    ) -> torch.Tensor:
        """One training step's share: update the critic on (x, rec), then return the generator's term
        (add it to the loss); the critic's and the term's numbers go into ``logs``."""
        logs.update(self.disc_step(x, rec))
        term, more = self.generator_term(rec, recon_loss, last, step)
        logs.update(more)
        return term

    def state_dict(self) -> dict[str, Any]:
        return {"disc": self.disc.state_dict(), "disc_opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "disc" in state:
            self.disc.load_state_dict(state["disc"])
            self.opt.load_state_dict(state["disc_opt"])


def make_adversary(loss: Any, seed: int, ctx: DistContext, image_size: int) -> Adversary | None:
    """The adversary a loss config asks for (``gan_weight > 0``), or None; images too small for
    ``disc_layers`` halvings (the critic needs a patch grid of at least 1×1) are a config error."""
    if loss.gan_weight <= 0:
        return None
    need = 3 * 2**loss.disc_layers
    if image_size < need:
        raise InvalidOption(
            f"loss.disc_layers={loss.disc_layers} needs images of at least {need} px, got {image_size}; "
            "lower loss.disc_layers"
        )
    adv = Adversary(
        loss.gan_weight, loss.gan_start, loss.disc_lr, loss.disc_channels, loss.disc_layers, seed, ctx
    )
    if loss.disc_init:
        adv.load_state_dict(load_critic(loss.disc_init, adv, ctx))
    return adv


def load_critic(path: str, adv: Adversary, ctx: DistContext) -> dict[str, Any]:
    """The critic state held in a training checkpoint (``loss.disc_init``), checked against ``adv``'s shapes;
    read with ``weights_only=True`` like every checkpoint."""
    p = Path(path)
    if not p.is_file():
        raise InvalidOption(f"loss.disc_init: checkpoint not found: '{p}'")
    try:
        ck = torch.load(p, map_location=ctx.device, weights_only=True)
    except Exception as e:
        raise InvalidOption(f"loss.disc_init: cannot read '{p}': {e}") from None
    state = ck.get("task_state", {}) if isinstance(ck, dict) else {}
    if not isinstance(state, dict) or "disc" not in state or "disc_opt" not in state:
        raise InvalidOption(f"loss.disc_init: '{p}' holds no critic (a run trained with loss.gan_weight > 0)")
    mine = adv.disc.state_dict()
    theirs = state["disc"]
    bad = [k for k in mine if k not in theirs or theirs[k].shape != mine[k].shape]
    if bad or set(theirs) - set(mine):
        raise InvalidOption(
            f"loss.disc_init: the critic in '{p}' does not fit loss.disc_channels / loss.disc_layers "
            f"(first mismatch: {(bad or sorted(set(theirs) - set(mine)))[0]})"
        )
    return {"disc": theirs, "disc_opt": state["disc_opt"]}


def load_latent_bank(
    loss: Any, decoder_only: bool, has_critic: bool, key: str, shape: tuple[int, ...], what: str
) -> torch.Tensor:
    """The ``loss.gen_latents`` bank (scripts/sample_latents.py): ``key`` holds (N, *shape) latents of the
    model's own samples, as the decoder takes them. Tuning the decoder against the critic on them fits it to
    what the generator produces, not only to the encoder's latents of real images."""
    from ..io import load_safetensors

    path = loss.gen_latents
    if not decoder_only or not has_critic:
        raise InvalidOption("loss.gen_latents needs init.decoder_only=true and loss.gan_weight > 0")
    try:
        bank = load_safetensors(path)
    except WeightsNotFound as e:  # missing or unreadable: name the key as well as the file
        raise InvalidOption(f"loss.gen_latents: {e}") from None
    if key not in bank:
        raise InvalidOption(f"loss.gen_latents '{path}' has no '{key}' tensor (scripts/sample_latents.py)")
    lat = bank[key].float()
    if lat.dim() != 1 + len(shape) or tuple(lat.shape[1:]) != shape or lat.shape[0] == 0:
        raise InvalidOption(
            f"loss.gen_latents '{path}' holds {key} {tuple(lat.shape)}; this {what} needs "
            f"(N, {', '.join(str(n) for n in shape)})"
        )
    return lat
