"""∂L/∂τ of a threshold gate at r/τ = 1, 10, 100, 10⁴: the logistic-only surrogate (before) and the package's.

    python bench/threshold_gradient.py            # τ = 0.05 and 0.5, T = 0.05 (the default temperature)

One token whose ratio `r = ‖Δy‖ / ‖W0 x‖` is set exactly, loss `L = S` (so ∂L/∂S = 1): the printed value is the
slope that one kept token hands to τ. "before" is the straight-through estimator with `σ((r − τ)/T)` alone (the
formula the package used until the leak was added, computed here in fp32 as its backward did); "now" is
`gatera_plugin.gates.ThresholdGate` through autograd.
"""

from __future__ import annotations

import torch

from gatera_plugin.gates import ThresholdGate

RATIOS = (1.0, 10.0, 100.0, 1e4)


def logistic_only(ratio: float, threshold: float, temperature: float) -> float:
    """∂S/∂τ of the logistic surrogate, in fp32: `−σ'((r − τ)/T) / T`."""
    soft = torch.sigmoid((torch.tensor(ratio) - torch.tensor(threshold)) / temperature)
    return float(-(soft * (1 - soft)) / temperature)


def package(ratio: float, threshold: float, temperature: float) -> float:
    gate = ThresholdGate(threshold_init=threshold, temperature=temperature)
    base = torch.zeros(1, 4)
    base[0, 0] = 1.0  # ‖W0 x‖ = 1
    update = torch.zeros(1, 4)
    update[0, 1] = ratio  # ‖Δy‖ = r
    gate(update, base).sum().backward()
    return float(gate.threshold.grad)


def main() -> None:
    temperature = 0.05
    print(f"T = {temperature}; dL/dS = 1 (one kept token)")
    print("| τ | r/τ | ∂L/∂τ before (logistic only) | ∂L/∂τ now |")
    print("|---|---|---|---|")
    for threshold in (0.05, 0.5):
        for ratio in RATIOS:
            r = ratio * threshold
            print(f"| {threshold} | {ratio:g} | {logistic_only(r, threshold, temperature):.3g} | "
                  f"{package(r, threshold, temperature):.3g} |")


if __name__ == "__main__":
    main()
