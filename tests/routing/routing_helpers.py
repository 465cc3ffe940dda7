"""Plain, loop-free twins of the routers, written differently from the library (one-hot pooling matrices,
scatter reductions, ranks instead of top-k), and a dense masked attention in float64."""
import torch


def rand(*shape, seed=0, dtype=torch.float64, grad=False):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    return t.requires_grad_(grad)


def qkv(b, hq, hkv, lq, lk, d, seed=0, dtype=torch.float64, grad=False):
    return (rand(b, hq, lq, d, seed=seed, dtype=dtype, grad=grad), rand(b, hkv, lk, d, seed=seed + 1, dtype=dtype,
            grad=grad), rand(b, hkv, lk, d, seed=seed + 2, dtype=dtype, grad=grad))


def block_ids(length, bs, offset=0):
    return (torch.arange(length) + offset) // bs


def onehot(length, bs, nb, offset=0):
    """(nb, length) float64: row r has 1 at the tokens of block r."""
    return (block_ids(length, bs, offset)[None, :] == torch.arange(nb)[:, None]).double()


def pool_mean(x, bs, nb, offset=0):
    p = onehot(x.shape[2], bs, nb, offset)
    return (p @ x.double()) / p.sum(1, keepdim=True).clamp(min=1)


def pool_maxmin(x, bs, nb):
    b, h, n, d = x.shape
    idx = block_ids(n, bs)[None, None, :, None].expand(b, h, n, d)
    mx = torch.full((b, h, nb, d), float("-inf"), dtype=torch.float64).scatter_reduce(2, idx, x.double(), "amax")
    mn = torch.full((b, h, nb, d), float("inf"), dtype=torch.float64).scatter_reduce(2, idx, x.double(), "amin")
    return mx, mn


def expand_heads(x, hq):
    return x.repeat_interleave(hq // x.shape[1], dim=1)


def longheads_repr(k, bs, nb):
    km = pool_mean(k, bs, nb)                                       # (B, H, nb, D)
    ids = block_ids(k.shape[2], bs)
    own = km[:, :, ids]                                             # each key's chunk mean
    w = torch.exp((k.double() * own).sum(-1) * k.shape[-1] ** -0.5)  # (B, H, L)
    p = onehot(k.shape[2], bs, nb)
    return ((w[..., None] * k.double()).transpose(-1, -2) @ p.T).transpose(-1, -2) / (w @ p.T)[..., None]


def landmark_repr(k, bs, nb):
    n = k.shape[2]
    norms = k.double().norm(dim=-1)                                 # (B, H, L)
    ids = block_ids(n, bs)
    best = torch.full(norms.shape[:2] + (nb,), -1.0, dtype=torch.float64).scatter_reduce(
        2, ids.expand_as(norms), norms, "amax")
    is_best = (norms == best[:, :, ids]).double()                   # one key per block (no ties)
    p = onehot(n, bs, nb)
    return ((is_best[..., None] * k.double()).transpose(-1, -2) @ p.T).transpose(-1, -2)


def allowed_forced(nb, has_q, causal, sinks, local):
    r, c = torch.arange(nb)[:, None], torch.arange(nb)[None, :]
    allowed = has_q[:, None] & ((c <= r) if causal else torch.ones(nb, nb, dtype=torch.bool))
    near = ((r - c >= 0) & (r - c < local)) if causal else ((r - c).abs() < local)
    return allowed, allowed & ((c < sinks) | near)


def select(scores, has_q, causal, sinks, local, top_k=None, threshold=None):
    nb = scores.shape[-1]
    allowed, forced = allowed_forced(nb, has_q, causal, sinks, local)
    cand = allowed & ~forced
    if top_k is not None:
        s = torch.where(cand, scores, float("-inf"))
        rank = (-s).argsort(-1).argsort(-1)                        # 0 = best
        return forced | (cand & (rank < top_k))
    p = torch.softmax(torch.where(allowed, scores, float("-inf")), -1).nan_to_num(0.0)
    base = (p * forced).sum(-1, keepdim=True)
    pc = torch.where(cand, p, 0.0)
    higher = (pc[..., None, :] > pc[..., :, None]) & cand[..., None, :]   # [.., j, i]: i beats j
    before = base + (pc[..., None, :] * higher).sum(-1)
    return forced | (cand & (before < threshold))


def ref_mask(q, k, bs, key_repr, causal=True, sinks=1, local=1, top_k=None, threshold=None, score=None):
    """The router's mask from scratch: mean-pooled queries (placed bottom-right), a key representation,
    scores scaled by 1/sqrt(D), then the selection."""
    lq, lk, d = q.shape[2], k.shape[2], q.shape[-1]
    nb = -(-lk // bs)
    qm = pool_mean(q, bs, nb, lk - lq)
    if score is None:
        s = qm @ expand_heads(key_repr(k, bs, nb), q.shape[1]).transpose(-1, -2)
    else:
        s = score(qm, k, bs, nb)
    has_q = onehot(lq, bs, nb, lk - lq).sum(1) > 0
    return select(s * d ** -0.5, has_q, causal, sinks, local, top_k, threshold)


def maxmin_score(qm, k, bs, nb):
    mx, mn = (expand_heads(t, qm.shape[1]) for t in pool_maxmin(k, bs, nb))
    a = qm[:, :, :, None, :] * mx[:, :, None, :, :]
    b = qm[:, :, :, None, :] * mn[:, :, None, :, :]
    return torch.maximum(a, b).sum(-1)


def token_mask(mask, lq, lk, bs, causal):
    """(B, Hq, Lq, Lk) bool from a block mask (queries at positions i + Lk - Lq)."""
    pos = torch.arange(lq) + (lk - lq)
    kk = torch.arange(lk)
    m = mask[:, :, pos // bs][:, :, :, kk // bs]
    if causal:
        m = m & (kk[None, :] <= pos[:, None])
    return m


def dense_attention(q, k, v, m, scale=None):
    """Dense masked softmax attention with repeated K/V; rows that see nothing give 0."""
    hq = q.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k, v = expand_heads(k, hq), expand_heads(v, hq)
    s = (q @ k.transpose(-1, -2)) * scale
    s = torch.where(m, s, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v
