"""Per-layer mixed precision from a sensitivity measure under a bits budget.

In the spirit of MixLLM (Zheng et al., 2024) and FlexQ: quantization error is not spread
evenly over layers, so a few layers kept at 8 bits buy most of the accuracy of a full
8-bit model at close to 4-bit size. Given, for every layer ``l``, its weight count
``n_l`` and its error ``e_l(f)`` at each candidate format ``f`` (here the layer's output
error ``||X dW||^2`` per calibration token, measured by :func:`jaxeff.quant.model.mixed_precision_rules`),
:func:`allocate_bits` starts every layer at the cheapest format and greedily applies the
upgrade with the largest error reduction per extra bit, ``(e_l(f) - e_l(f')) / ((b_f' - b_f) n_l)``,
while the weight-averaged bits stay within the budget (a knapsack heuristic). Bits count
the codes only (scales add ``32 / group_size`` bits per weight to every format alike).
"""

from __future__ import annotations

from collections.abc import Mapping


def allocate_bits(sizes: Mapping[str, int], errors: Mapping[str, Mapping[str, float]],
                  bits: Mapping[str, int], budget_bits: float) -> dict[str, str]:
  """Chooses a format per layer (module docstring).

  Args:
    sizes: ``{layer: weight count}``.
    errors: ``{layer: {fmt: error}}`` for every fmt in ``bits``.
    bits: ``{fmt: code bits}``; the cheapest is every layer's starting point.
    budget_bits: the weight-averaged bits per weight allowed.

  Returns:
    ``{layer: fmt}`` with average bits <= ``budget_bits``.
  """
  if not sizes:
    raise ValueError("sizes: expected at least one layer")
  order = sorted(bits, key=bits.get)
  lo = order[0]
  if budget_bits < bits[lo]:
    raise ValueError(f"budget_bits: {budget_bits} is below the cheapest format's {bits[lo]} bits")
  missing = [l for l in sizes if set(errors.get(l, {})) < set(bits)]
  if missing:
    raise ValueError(f"errors: layers {missing[:3]} lack an error for every format {order}")
  total = sum(sizes.values())
  choice = {l: lo for l in sizes}
  spent = bits[lo] * total
  while True:
    best, best_gain = None, 0.0
    for l, cur in choice.items():
      for f in order:
        extra = (bits[f] - bits[cur]) * sizes[l]
        if extra <= 0 or spent + extra > budget_bits * total + 1e-9:
          continue
        gain = (errors[l][cur] - errors[l][f]) / extra
        if gain > best_gain:
          best, best_gain = (l, f, extra), gain
    if best is None:
      return choice
    l, f, extra = best
    choice[l] = f
    spent += extra


__all__ = ["allocate_bits"]
