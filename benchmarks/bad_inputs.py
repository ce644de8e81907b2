"""The table of bad inputs and what each gets, for benchmarks/RESULTS.md.

    python benchmarks/bad_inputs.py > /tmp/bad_inputs.md

Runs every case of fxsparse/testing/bad_inputs.py (the same cases tests/test_errors.py checks) and prints one Markdown
row per case: the input, the error or warning class, and its message.
"""
from __future__ import annotations

import os
import sys
import tempfile
import warnings

from fxsparse.testing.bad_inputs import BAD_INPUTS, small_model


def outcome(case) -> "tuple[str, str]":
    """(class name, message) of what the case raises or warns."""
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            case.run(small_model(), folder)
        except Exception as exc:  # the point is to show what the user sees, whatever it is
            return type(exc).__name__, str(exc).replace(folder, "<dir>")
        ours = [w for w in caught if issubclass(w.category, case.expect)]
    if ours:
        return ours[0].category.__name__, str(ours[0].message)
    return "(nothing)", ""


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def main() -> None:
    print("| bad input | gets | message |")
    print("|---|---|---|")
    for case in BAD_INPUTS:
        name, message = outcome(case)
        print(f"| {cell(case.what)} | `{name}` | {cell(message)} |")


if __name__ == "__main__":
    main()
