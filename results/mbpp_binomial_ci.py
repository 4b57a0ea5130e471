"""95% Clopper-Pearson intervals for a reproduce_mbpp report: per method and temperature, passing
samples of all samples (as if independent: samples of one problem are not, so this understates the
spread) and problems solved at least once of all problems.

    python results/mbpp_binomial_ci.py results/mbpp-smollm2-chat.json
"""
import json
import sys

from scipy.stats import beta


def clopper_pearson(c: int, n: int, level: float = 0.95) -> tuple[float, float]:
    a = (1 - level) / 2
    lo = 0.0 if c == 0 else beta.ppf(a, c, n - c + 1)
    hi = 1.0 if c == n else beta.ppf(1 - a, c + 1, n - c)
    return float(lo), float(hi)


def main(path: str) -> None:
    doc = json.loads(open(path).read())
    print("| method | T | passing samples | 95% CI | problems solved at least once | 95% CI |\n|---|---|---|---|---|---|")
    for name, m in doc["methods"].items():
        for temp in m["temperatures"]:
            probs = [p[f"T={temp}"] for p in m["problems"].values()]
            c, n = sum(p["c"] for p in probs), sum(p["n"] for p in probs)
            s, k = sum(p["c"] > 0 for p in probs), len(probs)
            (lo, hi), (plo, phi) = clopper_pearson(c, n), clopper_pearson(s, k)
            print(f"| {name} | {temp} | {c}/{n} | {100 * lo:.1f}-{100 * hi:.1f}% | {s}/{k} "
                  f"| {100 * plo:.1f}-{100 * phi:.1f}% |")


if __name__ == "__main__":
    main(sys.argv[1])
