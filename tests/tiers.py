"""The `full` tier of parametrized cases (tests/conftest.py): `make test` runs every kernel path and option at least
once; a case marked `full` (by its id in `tiered`, off the diagonal in `crossed`) is a further combination of options
already covered and runs with `make test-full` (ATTNZOO_TESTS=full) or on a GPU."""
import pytest


def tiered(cases, full_ids, ids=None):
    """pytest.param for each case with its id, marked `full` where its id is in full_ids (every one must be). ids:
    by default a case's values joined by "-"."""
    rows = [c if isinstance(c, tuple) else (c,) for c in cases]
    ids = ids or ["-".join(map(str, r)) for r in rows]
    assert len(rows) == len(ids), "one id per case"
    unknown = set(full_ids) - set(ids)
    assert not unknown, f"full_ids not among the cases: {sorted(unknown)}"
    return [pytest.param(*r, id=i, marks=[pytest.mark.full] if i in full_ids else []) for r, i in zip(rows, ids)]


def crossed(names: str, firsts, seconds):
    """(names, params) for pytest.mark.parametrize over firsts x seconds where only a diagonal runs in `make test`:
    the pair (i, j) with j == i mod len(seconds) or i == j mod len(firsts), so that every first and every second
    runs at least once; the other pairs are marked `full`. Ids: "first-second", a dict second by its name and index."""
    second = names.split(",")[1].strip()
    sid = [f"{second}{j}" if isinstance(s, dict) else str(s) for j, s in enumerate(seconds)]
    params = []
    for i, f in enumerate(firsts):
        for j, s in enumerate(seconds):
            core = j == i % len(seconds) or i == j % len(firsts)
            params.append(pytest.param(f, s, id=f"{f}-{sid[j]}", marks=[] if core else [pytest.mark.full]))
    return names, params
