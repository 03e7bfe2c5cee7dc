"""The benchmarks behind docs/benchmarks/: ``python -m benchmarks NAME [args]`` (no name: the list).

Not part of the installed package; every benchmark runs the product's own code and shares ``harness``.
"""

#: name on the command line -> module of this package (docs/benchmarks/<page>.md where it writes one)
BENCHMARKS = {
    "accuracy": "accuracy", "batch": "batch", "coreset": "coreset", "gate": "gate", "growth": "growth",
    "growth-aug": "growth_aug", "growth-product": "growth_product", "mtd-study": "mtd_study",
    "review-loop": "review_loop", "review-session": "review_session", "runtime": "runtime", "serving": "serving",
    "tune": "tune",
}
