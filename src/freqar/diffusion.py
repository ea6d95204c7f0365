"""Gaussian diffusion shared by every family with a continuous per-token head (FAR, HART's residual head).

One module, IDDPM semantics (Nichol & Dhariwal 2021) as MAR/FAR/HART use them: cosine betas, ε prediction with
a learned-range variance, the MSE + VLB training loss, respaced ancestral sampling with a temperature on the
injected noise, classifier-free guidance on ε, and a deterministic DDIM option. Schedules are kept in float64;
each coefficient is gathered at the row's timestep in float64 and *then* cast to float32, because that is what
the reference code does and float32 schedules drift by ~1e-6 relative (visible after the 1/sqrt(alpha_bar)
amplification). The network always sees original (not respaced) timesteps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import InvalidOption

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``model(x_t (N, C), t (N,) original timesteps) -> (N, 2C)`` = [ε ‖ variance interpolation v]."""


def cosine_betas(num_steps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Improved-DDPM cosine schedule (float64): β_i = min(1 − ᾱ((i+1)/T)/ᾱ(i/T), max_beta)."""

    def abar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor(
        [min(1 - abar((i + 1) / num_steps) / abar(i / num_steps), max_beta) for i in range(num_steps)],
        dtype=torch.float64,
    )


def linear_betas(num_steps: int) -> torch.Tensor:
    """DDPM's linear schedule scaled to ``num_steps`` (float64)."""
    scale = 1000 / num_steps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=torch.float64)


def space_timesteps(num_steps: int, spec: str | int) -> list[int]:
    """Retained original timesteps (ascending) for a respacing string, as IDDPM's ``space_timesteps``.

    ``"ddimN"``: the smallest stride k with ``len(range(0, T, k)) == N``. Otherwise a comma list of counts per
    equal section of [0, T) (the first ``T mod n`` sections one step longer), each section strided evenly with
    Python rounding; a plain integer N is one section of N steps.
    """
    s = str(spec).strip()
    if s.startswith("ddim"):
        try:
            want = int(s[4:])
        except ValueError:
            raise InvalidOption(f"bad diffusion steps '{spec}' (ddimN, N, or a comma list)") from None
        if want < 1:
            raise InvalidOption(f"diffusion steps must be >= 1, got '{spec}'")
        for stride in range(1, num_steps + 1):
            if len(range(0, num_steps, stride)) == want:
                return list(range(0, num_steps, stride))
        raise InvalidOption(f"cannot take exactly {want} evenly strided steps out of {num_steps}")
    try:
        counts = [int(c) for c in s.split(",")]
    except ValueError:
        raise InvalidOption(f"bad diffusion steps '{spec}' (ddimN, N, or a comma list)") from None
    if any(c < 1 for c in counts):
        raise InvalidOption(f"diffusion steps must be >= 1, got '{spec}'")
    size, extra = divmod(num_steps, len(counts))
    out: list[int] = []
    start = 0
    for i, count in enumerate(counts):
        length = size + (1 if i < extra else 0)
        if length < count:
            raise InvalidOption(f"cannot take {count} steps from a section of {length} (steps '{spec}')")
        frac = 1.0 if count <= 1 else (length - 1) / (count - 1)
        acc = 0.0
        for _ in range(count):
            out.append(start + round(acc))
            acc += frac
        start += length
    return sorted(set(out))


def _approx_std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def _discretized_gaussian_log_likelihood(
    x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """Log-likelihood of data in [-1, 1] discretised to 8-bit bins (the VLB's t = 0 term)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor):
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def guide_eps(out: torch.Tensor, batch: int, scale: float, eps_channels: int) -> torch.Tensor:
    """CFG on ε only: rows [0:B] cond, [B:2B] uncond -> (B, 2C) with ε = ε_u + g(ε_c − ε_u), v from the cond
    rows.
    """
    eps_c, eps_u = out[:batch, :eps_channels], out[batch:, :eps_channels]
    eps = eps_u + scale * (eps_c - eps_u)
    return torch.cat((eps, out[:batch, eps_channels:]), dim=1)


@dataclass(frozen=True)
class DiffusionConfig:
    """The diffusion process: schedule, number of training steps, variance parameterisation."""

    noise_schedule: str = "cosine"
    diffusion_steps: int = 1000
    learn_sigma: bool = True

    def __post_init__(self) -> None:
        if self.noise_schedule not in ("cosine", "linear"):
            raise InvalidOption(f"unknown noise schedule '{self.noise_schedule}' (cosine, linear)")
        if self.diffusion_steps < 1:
            raise InvalidOption(f"diffusion_steps must be >= 1, got {self.diffusion_steps}")


class GaussianDiffusion:
    """A (possibly respaced) diffusion process; all tensors float64, gathered per row then cast to float32.

    ``timesteps`` are the retained original timesteps (None = all of them). Respaced betas are β'_j = 1 −
    ᾱ_{s_j}/ᾱ_{s_{j−1}}, so the respaced process has the same marginals at the kept steps.
    """

    def __init__(self, cfg: DiffusionConfig = DiffusionConfig(), timesteps: list[int] | None = None) -> None:
        self.cfg = cfg
        T = cfg.diffusion_steps
        base = cosine_betas(T) if cfg.noise_schedule == "cosine" else linear_betas(T)
        if timesteps is None:
            timesteps = list(range(T))
        if not timesteps or any(not 0 <= s < T for s in timesteps) or sorted(set(timesteps)) != timesteps:
            raise InvalidOption(f"timesteps must be increasing values in [0, {T})")
        self.timestep_map = torch.tensor(timesteps, dtype=torch.long)
        abar_base = torch.cumprod(1.0 - base, dim=0)
        if len(timesteps) == T:
            betas = base
        else:
            prev = torch.cat((torch.ones(1, dtype=torch.float64), abar_base[self.timestep_map[:-1]]))
            betas = 1.0 - abar_base[self.timestep_map] / prev
        self.betas = betas
        self.num_timesteps = len(betas)
        abar = torch.cumprod(1.0 - betas, dim=0)
        abar_prev = torch.cat((torch.ones(1, dtype=torch.float64), abar[:-1]))
        self.alphas_cumprod, self.alphas_cumprod_prev = abar, abar_prev
        self.sqrt_alphas_cumprod = abar.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - abar).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / abar).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / abar - 1.0).sqrt()
        post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
        self.posterior_log_variance_clipped = torch.log(
            torch.cat((post_var[1:2], post_var[1:])) if len(post_var) > 1 else post_var.clamp(min=1e-20)
        )
        self.log_betas = torch.log(betas)
        self.posterior_mean_coef1 = betas * abar_prev.sqrt() / (1.0 - abar)
        self.posterior_mean_coef2 = (1.0 - abar_prev) * (1.0 - betas).sqrt() / (1.0 - abar)

    @classmethod
    def respaced(cls, cfg: DiffusionConfig, steps: str | int) -> GaussianDiffusion:
        """The sampling process for a respacing string such as ``"100"``, ``"ddim25"`` or ``"10,5"``."""
        return cls(cfg, space_timesteps(cfg.diffusion_steps, steps))

    @staticmethod
    def _at(arr: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Gather in float64 at the rows' indices, then cast (reference precision), shaped to broadcast."""
        v = arr.to(t.device)[t].to(like.dtype)
        return v.view(-1, *([1] * (like.dim() - 1)))

    # ----- model mean and variance -------------------------------------------------------------------
    def p_mean_variance(
        self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean, log-variance, x̂0) of p(x_{t−1} | x_t) from the network output (learned-range variance)."""
        C = x.shape[1]
        eps = out[:, :C]
        if self.cfg.learn_sigma:
            frac = (out[:, C:] + 1) / 2
            max_log = self._at(self.log_betas, t, x)
            min_log = self._at(self.posterior_log_variance_clipped, t, x)
            logvar = frac * max_log + (1 - frac) * min_log
        else:
            logvar = self._at(self.posterior_log_variance_clipped, t, x).expand_as(x)
        x0 = (
            self._at(self.sqrt_recip_alphas_cumprod, t, x) * x
            - self._at(self.sqrt_recipm1_alphas_cumprod, t, x) * eps
        )
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        mean = self._at(self.posterior_mean_coef1, t, x) * x0 + self._at(self.posterior_mean_coef2, t, x) * x
        return mean, logvar, x0

    # ----- training ----------------------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return (
            self._at(self.sqrt_alphas_cumprod, t, x0) * x0
            + self._at(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def training_losses(
        self, model: ModelFn, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Per-row ``mse`` (ε), ``vb`` (bits, ε detached so it only trains the variance) and ``loss`` = mse +
        vb.
        """
        x_t = self.q_sample(x0, t, noise)
        out = model(x_t, self.timestep_map.to(t.device)[t])
        C = x0.shape[1]
        mse = ((noise - out[:, :C]) ** 2).mean(dim=1)
        if not self.cfg.learn_sigma:
            return {"mse": mse, "vb": torch.zeros_like(mse), "loss": mse}
        frozen = torch.cat((out[:, :C].detach(), out[:, C:]), dim=1)
        true_mean = (
            self._at(self.posterior_mean_coef1, t, x0) * x0 + self._at(self.posterior_mean_coef2, t, x0) * x_t
        )
        true_logvar = self._at(self.posterior_log_variance_clipped, t, x0)
        mean, logvar, _ = self.p_mean_variance(frozen, x_t, t)
        kl = _normal_kl(true_mean, true_logvar, mean, logvar).mean(dim=1) / math.log(2.0)
        nll = -_discretized_gaussian_log_likelihood(x0, mean, 0.5 * logvar).mean(dim=1) / math.log(2.0)
        vb = torch.where(t == 0, nll, kl)
        return {"mse": mse, "vb": vb, "loss": mse + vb}

    # ----- sampling ----------------------------------------------------------------------------------
    def sample(
        self,
        model: ModelFn,
        noise: torch.Tensor,
        *,
        temperature: float = 1.0,
        clip_denoised: bool = False,
        ddim: bool = False,
        eta: float = 0.0,
        draw: Callable[[torch.Tensor], torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
        on_step: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        """Run steps j = S−1..0 from ``noise`` = x_T.

        Ancestral (IDDPM ``p_sample``): x ← mean + [j≠0]·exp(½ logvar)·n·temperature, n drawn after each
        network call (also at j = 0). DDIM: x ← √ᾱ_prev·x̂0 + √(1−ᾱ_prev−σ²)·ε + σ·n with σ from ``eta`` (0
        draws nothing: deterministic). ``draw(x)`` returns n (default: ``randn_like`` from ``generator``); a
        caller that must replay another implementation's RNG stream (e.g. noise drawn for doubled CFG rows)
        passes its own.
        """
        if temperature < 0:
            raise InvalidOption(f"temperature must be >= 0, got {temperature}")
        if draw is None:

            def draw(x: torch.Tensor) -> torch.Tensor:
                return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)

        x = noise
        S = self.num_timesteps
        tmap = self.timestep_map.to(x.device)
        for j in reversed(range(S)):
            t = torch.full((x.shape[0],), j, dtype=torch.long, device=x.device)
            out = model(x, tmap[t])
            mean, logvar, x0 = self.p_mean_variance(out, x, t, clip_denoised)
            if ddim:
                x = self._ddim_step(out, x, x0, t, j, eta, draw)
            else:
                n = draw(x)
                nonzero = float(j != 0)
                x = mean + nonzero * torch.exp(0.5 * logvar) * n * temperature
            if on_step is not None:
                on_step(S - 1 - j, S)
        return x

    def _ddim_step(self, out, x, x0, t, j, eta, draw) -> torch.Tensor:
        C = x.shape[1]
        eps = (self._at(self.sqrt_recip_alphas_cumprod, t, x) * x - x0) / self._at(
            self.sqrt_recipm1_alphas_cumprod, t, x
        )
        if not torch.isfinite(eps).all():  # x0 clipped at t with ᾱ = 1: fall back to the network's ε
            eps = out[:, :C]
        ab = self._at(self.alphas_cumprod, t, x)
        ab_prev = self._at(self.alphas_cumprod_prev, t, x)
        sigma = eta * torch.sqrt((1 - ab_prev) / (1 - ab)) * torch.sqrt(1 - ab / ab_prev)
        x = x0 * torch.sqrt(ab_prev) + torch.sqrt((1 - ab_prev - sigma**2).clamp(min=0)) * eps
        if eta > 0 and j != 0:
            x = x + sigma * draw(x)
        return x
