"""The fused top-k block selection (`routing/_triton_select.py`, Triton's CPU interpreter) against
`select_blocks`' PyTorch path: causal and not, sinks / local, rows without queries (cross attention),
fewer candidates than k, k larger than the row, row lengths that are and are not powers of two, negative
and positive scores, and exact ties broken by lowest column (k winners exactly)."""
import pytest
import torch

from attnzoo.routing.base import select_blocks

triton = pytest.importorskip("triton", reason="the Triton kernels need the 'triton' package (extra 'gpu')")
from attnzoo.backends.triton import ops  # noqa: E402
from attnzoo.routing._triton_select import select_topk  # noqa: E402

if not ops.interpreting() and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 or a GPU", allow_module_level=True)
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("nb", [1, 5, 16, 21])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("sinks,local,top_k", [(1, 1, 2), (0, 0, 3), (2, 3, 1), (0, 1, 64)])
def test_matches_pytorch_path(nb, causal, sinks, local, top_k):
    gen = torch.Generator().manual_seed(nb * 31 + sinks * 7 + local + top_k + causal)
    scores = (torch.randn(1, 2, nb, nb, generator=gen) * 3).to(DEV)
    has_q = (torch.arange(nb) >= nb // 3).to(DEV)                # cross attention: first rows without queries
    ref = select_blocks(scores, has_q, causal=causal, sinks=sinks, local=local, top_k=top_k)
    got = select_topk(scores, has_q, causal=causal, sinks=sinks, local=local, top_k=top_k)
    assert got.dtype == torch.bool and got.shape == ref.shape
    assert torch.equal(got, ref)


def test_ties_keep_exactly_k_lowest_columns():
    nb = 12
    scores = torch.zeros(1, 1, nb, nb, device=DEV)                # every candidate ties
    has_q = torch.ones(nb, dtype=torch.bool, device=DEV)
    got = select_topk(scores, has_q, causal=True, sinks=0, local=0, top_k=3)[0, 0].cpu()
    for r in range(nb):
        assert got[r].nonzero().flatten().tolist() == list(range(min(3, r + 1)))


def test_float16_scores_and_wide_values():
    gen = torch.Generator().manual_seed(5)
    scores = (torch.randn(1, 2, 20, 20, generator=gen) * 1e4).to(torch.float16).to(DEV)
    has_q = torch.ones(20, dtype=torch.bool, device=DEV)
    ref = select_blocks(scores.float(), has_q, causal=True, sinks=1, local=1, top_k=4)
    got = select_topk(scores, has_q, causal=True, sinks=1, local=1, top_k=4)
    # float16 ties are possible (either tied column may win): compare the kept count per row
    assert torch.equal(got.sum(-1), ref.sum(-1))
