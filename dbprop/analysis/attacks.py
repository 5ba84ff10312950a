"""Measured robustness: the smallest L2 perturbation that changes the prediction, found by foolbox 3's attacks.

ρ(x) = min {‖δ‖₂ : F(x + δ) ≠ F(x), x + δ within ``bounds``} is bounded from above by any adversarial example, so
each attack gives an upper estimate of ρ; several attacks give their per-sample minimum (Etmann et al., 2019,
used the gradient line search, L2 basic iterative method and Carlini–Wagner L2). foolbox is optional
(``pip install 'dbprop[robustness]'``); the attacks are foolbox's, not re-implemented here.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

ATTACKS = ("gradient", "bim", "cw")


def _foolbox():
    try:
        import foolbox
    except ImportError as e:
        raise ImportError("empirical_robustness needs foolbox 3: pip install 'dbprop[robustness]' "
                          "(or pip install 'foolbox>=3.3')") from e
    return foolbox


def make_attack(name: str) -> Any:
    """The foolbox attack behind each name: ``"gradient"`` the L2 fast gradient method (one step along the
    normalised loss gradient, with the line search over ε done by :func:`empirical_robustness`), ``"bim"`` the
    L2 basic iterative method (10 steps, rel. step 0.2, foolbox's defaults), ``"cw"`` Carlini–Wagner L2
    (5 binary-search steps of 100 Adam steps, step 0.05, initial constant 0.1: lighter than foolbox's
    9 × 10000 steps, and tuned on inputs in [0, 1]; pass
    ``foolbox.attacks.L2CarliniWagnerAttack(...)`` for other settings)."""
    A = _foolbox().attacks
    factories = {"gradient": A.L2FastGradientAttack, "bim": A.L2BasicIterativeAttack,
                 "cw": lambda: A.L2CarliniWagnerAttack(binary_search_steps=5, steps=100, stepsize=0.05,
                                                       initial_const=0.1)}
    if name not in factories:
        raise ValueError(f"unknown attack {name!r}; expected one of {ATTACKS} or a foolbox L2 attack instance")
    return factories[name]()


def empirical_robustness(model: nn.Module, x: Tensor, attack: Union[str, Any, Sequence[Union[str, Any]]] = "gradient",
                         labels: Optional[Tensor] = None, bounds: Tuple[float, float] = (0.0, 1.0),
                         epsilons: Optional[Sequence[float]] = None) -> Tensor:
    """Per-sample measured robustness ``ρ(x) = ‖x_adv − x‖₂`` of the smallest adversarial example found.

    Args:
        model: any classifier ``nn.Module`` returning logits ``(B, C)``; it is evaluated in eval mode (its mode
            is restored afterwards).
        x: inputs ``(B, ...)`` within ``bounds``.
        attack: ``"gradient"``, ``"bim"``, ``"cw"`` (see :func:`make_attack`), a foolbox 3 L2 attack instance, or
            a sequence of these (the per-sample minimum over all of them).
        labels: the classes to move away from; the model's predictions by default (as in ρ̃ of
            :func:`dbprop.analysis.linearized_robustness`). Misclassified samples get ρ = 0.
        bounds: the box the adversarial examples must stay in (foolbox clips to it).
        epsilons: for fixed-ε attacks (``gradient``, ``bim``), the increasing L2 radii searched; ρ is the norm
            of the adversarial at the smallest successful radius, so the grid's ratio is its resolution.
            Default: 256 radii, ratio ≈ 1.037, from 10⁻⁴·D to D, D the diameter of the box.

    Returns:
        ``(B,)`` tensor of ρ in ``x``'s dtype, ``inf`` where no attack found an adversarial example.
    """
    fb = _foolbox()
    lo, hi = (float(b) for b in bounds)
    if not lo < hi:
        raise ValueError(f"bounds must be (low, high) with low < high, got {bounds}")
    if not torch.is_tensor(x) or x.dim() < 2 or not x.is_floating_point():
        raise ValueError("x must be a floating-point tensor of shape (B, ...)")
    if x.shape[0] == 0:
        raise ValueError("empty batch: x has batch size 0")
    if not torch.isfinite(x).all():
        raise ValueError("x contains non-finite values")
    if x.min().item() < lo or x.max().item() > hi:
        raise ValueError(f"x lies outside bounds {bounds} (min {x.min().item():.4g}, max {x.max().item():.4g})")
    attacks = [attack] if isinstance(attack, str) or not isinstance(attack, (list, tuple)) else list(attack)
    if not attacks:
        raise ValueError("attack must name at least one attack")
    attacks = [make_attack(a) if isinstance(a, str) else a for a in attacks]
    for a in attacks:
        if not isinstance(a, fb.attacks.base.Attack) or getattr(a, "distance", None) != fb.distances.l2:
            raise TypeError(f"{a!r} is not a foolbox L2 attack")
    if epsilons is None:
        diameter = (hi - lo) * math.sqrt(x[0].numel())
        epsilons = torch.logspace(-4, 0, 256, dtype=torch.float64).mul(diameter).tolist()
    epsilons = [float(e) for e in epsilons]
    if not epsilons or any(e <= 0 for e in epsilons) or epsilons != sorted(epsilons):
        raise ValueError("epsilons must be a non-empty increasing sequence of positive radii")

    was_training = model.training
    model.eval()
    try:
        fmodel = fb.PyTorchModel(model, bounds=(lo, hi), device=x.device)
        x = x.detach()
        with torch.no_grad():
            logits = model(x)
        if logits.dim() != 2 or logits.shape[0] != x.shape[0] or logits.shape[1] < 2:
            raise ValueError(f"the model must return logits of shape ({x.shape[0]}, C >= 2), got {tuple(logits.shape)}")
        predicted = logits.argmax(1)
        labels = predicted if labels is None else torch.as_tensor(labels, device=x.device)
        if labels.shape != (x.shape[0],) or labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"labels must be an integer tensor of shape ({x.shape[0]},)")
        if labels.min() < 0 or labels.max() >= logits.shape[1]:
            raise ValueError(f"labels must lie in [0, {logits.shape[1]})")
        rho = torch.where(predicted == labels, math.inf, 0.0).to(x.dtype)
        correct = torch.isinf(rho)                  # misclassified samples are at distance 0
        for a in attacks if correct.any() else ():
            found = _attack_distances(fb, fmodel, a, x[correct], labels[correct], epsilons)
            rho[correct] = torch.minimum(rho[correct], found)
    finally:
        model.train(was_training)
    return rho


def _attack_distances(fb, fmodel, attack, x: Tensor, labels: Tensor, epsilons: Sequence[float]) -> Tensor:
    """‖x_adv − x‖₂ of one attack, ``inf`` where it failed."""
    rho = torch.full((x.shape[0],), math.inf, dtype=x.dtype, device=x.device)
    if isinstance(attack, fb.attacks.base.MinimizationAttack):
        _, adv, success = attack(fmodel, x, fb.criteria.Misclassification(labels), epsilons=None)
        return torch.where(success, (adv - x).flatten(1).norm(dim=1), rho)
    # Line search over the grid, assuming success is monotone in ε: every `stride`-th radius first, then the
    # radii inside each sample's bracket, so each sample is attacked about len/stride + stride times.
    stride = max(1, math.isqrt(len(epsilons)))
    coarse = list(range(stride - 1, len(epsilons), stride))
    if coarse[-1] != len(epsilons) - 1:
        coarse.append(len(epsilons) - 1)
    first = _first_success(fb, fmodel, attack, x, labels, epsilons, coarse, rho)
    for k, hi in enumerate(coarse):
        group = (first == k).nonzero().flatten()
        lo = coarse[k - 1] + 1 if k else 0
        if group.numel() and hi > lo:
            found = torch.full_like(rho[group], math.inf)
            _first_success(fb, fmodel, attack, x[group], labels[group], epsilons, range(lo, hi), found)
            rho[group] = torch.minimum(rho[group], found)
    return rho


def _first_success(fb, fmodel, attack, x, labels, epsilons, indices, rho) -> Tensor:
    """Attacks at ``epsilons[i]`` for ``i`` in ``indices`` in order, each sample until its first success; writes
    ``‖x_adv − x‖`` into ``rho`` and returns the position in ``indices`` of that success (``len`` if none)."""
    indices = list(indices)
    first = torch.full((x.shape[0],), len(indices), dtype=torch.long, device=x.device)
    todo = torch.arange(x.shape[0], device=x.device)
    for position, i in enumerate(indices):
        if todo.numel() == 0:
            break
        _, adv, success = attack(fmodel, x[todo], fb.criteria.Misclassification(labels[todo]), epsilons=epsilons[i])
        done = todo[success]
        rho[done] = (adv[success] - x[done]).flatten(1).norm(dim=1)
        first[done] = position
        todo = todo[~success]
    return first
