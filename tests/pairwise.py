"""A pairwise-covering set of test cases: every value of every factor meets every value of every other factor in
at least one case (far fewer cases than the full product). Greedy and deterministic."""
from __future__ import annotations

from itertools import combinations


def all_pairs(factors: dict[str, list]) -> set[tuple]:
    """Every ((factor a, value), (factor b, value)) pair that a covering set must hold, a before b in order."""
    names = list(factors)
    return {((a, va), (b, vb)) for a, b in combinations(names, 2) for va in factors[a] for vb in factors[b]}


def pairs_of(case: dict, names: list[str]) -> set[tuple]:
    return {((a, case[a]), (b, case[b])) for a, b in combinations(names, 2)}


def pairwise(factors: dict[str, list]) -> list[dict]:
    """Cases (dicts factor -> value) covering every pair of ``all_pairs(factors)``. Each case starts from the
    first pair still uncovered and fills the other factors, in order, with the value that covers the most
    uncovered pairs with the factors already set (ties: the value listed first)."""
    names = list(factors)
    index = {n: i for i, n in enumerate(names)}
    uncovered = all_pairs(factors)
    order = sorted(uncovered, key=lambda p: (index[p[0][0]], factors[p[0][0]].index(p[0][1]),
                                             index[p[1][0]], factors[p[1][0]].index(p[1][1])))
    cases: list[dict] = []
    while uncovered:
        (a, va), (b, vb) = next(p for p in order if p in uncovered)
        case = {a: va, b: vb}
        for n in names:
            if n in case:
                continue

            def gain(v, n=n):
                return sum(1 for m, w in case.items()
                           if (((m, w), (n, v)) if index[m] < index[n] else ((n, v), (m, w))) in uncovered)

            case[n] = max(factors[n], key=gain)  # max keeps the first of equal gains
        case = {n: case[n] for n in names}
        uncovered -= pairs_of(case, names)
        cases.append(case)
    return cases
