"""Quantum noise for simulated X-rays: Poisson photon counts at a given dose.

A detector pixel behind line integral ``L`` receives on average ``N0 exp(-L)`` photons, where
``N0`` is the unattenuated count per pixel. The noisy image is read back as a line integral:

    L_noisy = -log(max(n, 1) / N0),   n ~ Poisson(N0 exp(-L)),

so that it stays on the scale of the noiseless DRR (a pixel that counts no photon is clipped to
one, the detector's floor). Fewer photons, more noise; ``N0 = None`` means no noise.
"""

from __future__ import annotations

import torch

from prostlab.errors import ProstlabError


def poisson_noise(line_integral: torch.Tensor, photons: float | None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """``line_integral`` (any shape) with Poisson quantum noise at ``photons`` per pixel."""
    if photons is None:
        return line_integral
    if not photons > 0:
        raise ProstlabError(f"photons: expected a positive photon count per pixel, got {photons}")
    expected = photons * torch.exp(-line_integral.detach().double().cpu())
    counts = torch.poisson(expected, generator=generator).clamp(min=1.0)
    noisy = -torch.log(counts / photons)
    return noisy.to(line_integral.dtype).to(line_integral.device)
