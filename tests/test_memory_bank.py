"""Tests for memory_bank.py (TRELM Sec. 3.2, Eq. 4-8): each equation on a tiny case with a known
answer, checkpoint round trip, growth, storage at 1M keys, and DDP (torchrun, 2 ranks, gloo)."""
import ctypes
import io
import os
import socket
import subprocess
import sys

import pytest
import torch

from memory_bank import MemoryBank, bytes_for, lambda_at, mix

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def naive_window_mean(hidden, attention_mask, ent_batch, ent_start, ent_end, k):
    """Eq. (4) by a loop over mentions and positions ([CLS] and the last [SEP] left out)."""
    out = []
    for b, s, e in zip(ent_batch.tolist(), ent_start.tolist(), ent_end.tolist()):
        real = [t for t in range(hidden.shape[1]) if attention_mask[b, t]][1:-1]
        pos = [t for t in real if s - k <= t < e + k]
        out.append(torch.stack([hidden[b, t] for t in pos]).mean(0))
    return torch.stack(out)


# ---- Eq. (4) --------------------------------------------------------------------------------------

def test_window_mean_hand_computed_clipping_padding_and_length_one():
    b, t, h = 2, 10, 3
    hidden = torch.arange(t, dtype=torch.float32).view(1, t, 1).expand(b, t, h).clone()  # hidden[b,t] = t
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, 7:] = 0  # row 1: real tokens 0..6 ([CLS] = 0, [SEP] = 6), pads 7..9
    ent_batch = torch.tensor([0, 0, 1, 1])
    ent_start = torch.tensor([1, 7, 4, 1])
    ent_end = torch.tensor([2, 9, 5, 6])
    bank = MemoryBank(h, window_k=2)
    got = bank.window_mean(hidden, mask, ent_batch, ent_start, ent_end)
    # [1,2) k=2 -> [-1,4) clipped to 1..3 (0 is [CLS]): mean 2; a span of length 1 at the left end
    # [7,9) -> [5,11) clipped to 5..8 (9 is [SEP]): mean 6.5
    # row 1 [4,5) -> [2,7) clipped to 2..5 (6 is [SEP], 7.. pad): mean 3.5
    # row 1 [1,6) -> [-1,8) clipped to 1..5: mean 3
    want = torch.tensor([2.0, 6.5, 3.5, 3.0]).unsqueeze(1).expand(4, h)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    k0 = bank.window_mean(hidden, mask, ent_batch, ent_start, ent_end, k=0)
    torch.testing.assert_close(k0[:, 0], torch.tensor([1.0, 7.5, 4.0, 3.0]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("k", [0, 1, 3, 16])
def test_window_mean_matches_naive_loop(k):
    g = torch.Generator().manual_seed(k)
    b, t, h, m = 4, 24, 5, 30
    hidden = torch.randn(b, t, h, generator=g)
    lengths = torch.tensor([24, 9, 17, 5])
    mask = (torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)).long()
    ent_batch = torch.randint(0, b, (m,), generator=g)
    ent_start, ent_end = [], []
    for row in ent_batch.tolist():
        s = int(torch.randint(1, lengths[row] - 2, (1,), generator=g)) if lengths[row] > 3 else 1
        e = int(torch.randint(s + 1, lengths[row], (1,), generator=g))
        ent_start.append(s)
        ent_end.append(e)
    ent_start, ent_end = torch.tensor(ent_start), torch.tensor(ent_end)
    got = MemoryBank(h).window_mean(hidden, mask, ent_batch, ent_start, ent_end, k=k)
    want = naive_window_mean(hidden, mask, ent_batch, ent_start, ent_end, k)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_window_mean_rejects_bad_span():
    bank = MemoryBank(2)
    hidden, mask = torch.zeros(1, 6, 2), torch.ones(1, 6, dtype=torch.long)
    with pytest.raises(ValueError, match="mention 1"):
        bank.window_mean(hidden, mask, torch.tensor([0, 0]), torch.tensor([1, 3]), torch.tensor([2, 3]))
    with pytest.raises(ValueError, match="mention 0"):
        bank.window_mean(hidden, mask, torch.tensor([0]), torch.tensor([4]), torch.tensor([7]))


# ---- Eq. (5), (6) ---------------------------------------------------------------------------------

def test_local_ema_two_updates_hand_computed():
    bank = MemoryBank(2, gamma=0.1)
    bank.ensure(torch.tensor([7]), torch.tensor([[1.0, 1.0]]))
    bank.update(torch.tensor([7]), torch.tensor([[11.0, 1.0]]), torch.zeros(1, 2))  # -> [2, 1]
    bank.update(torch.tensor([7]), torch.tensor([[12.0, -9.0]]), torch.zeros(1, 2))  # -> [3, 0]
    local, _ = bank.read(torch.tensor([7]))
    torch.testing.assert_close(local, torch.tensor([[3.0, 0.0]]), rtol=0, atol=1e-6)
    # the same two observations in one batch are applied in the given order: same result
    one = MemoryBank(2, gamma=0.1)
    one.ensure(torch.tensor([7]), torch.tensor([[1.0, 1.0]]))
    one.update(torch.tensor([7, 7]), torch.tensor([[11.0, 1.0], [12.0, -9.0]]), torch.zeros(2, 2))
    torch.testing.assert_close(one.read(torch.tensor([7]))[0], torch.tensor([[3.0, 0.0]]), rtol=0, atol=1e-6)
    # the reversed order gives [0.9 * 2.1 + 1.1, 0.9 * -0.0 + 0.1] = [2.99, 0.1]: order is respected
    rev = MemoryBank(2, gamma=0.1)
    rev.ensure(torch.tensor([7]), torch.tensor([[1.0, 1.0]]))
    rev.update(torch.tensor([7, 7]), torch.tensor([[12.0, -9.0], [11.0, 1.0]]), torch.zeros(2, 2))
    torch.testing.assert_close(rev.read(torch.tensor([7]))[0], torch.tensor([[2.99, 0.1]]), rtol=0, atol=1e-6)


def test_global_is_plain_mean_of_cls_with_repeats():
    g = torch.Generator().manual_seed(0)
    h = 4
    bank = MemoryBank(h, gamma=0.2)
    init = {3: torch.randn(h, generator=g), 5: torch.randn(h, generator=g), 9: torch.randn(h, generator=g)}
    bank.ensure(torch.tensor([5, 3, 9]), torch.stack([init[5], init[3], init[9]]))
    seen = {3: [], 5: [], 9: []}
    local_ref = dict(init)
    for keys in ([3, 5, 3, 3], [5], [3, 5, 5, 3, 5]):
        loc_obs, cls_obs = torch.randn(len(keys), h, generator=g), torch.randn(len(keys), h, generator=g)
        bank.update(torch.tensor(keys), loc_obs, cls_obs)
        for i, key in enumerate(keys):
            seen[key].append(cls_obs[i])
            local_ref[key] = 0.8 * local_ref[key] + 0.2 * loc_obs[i]
    local, glob = bank.read(torch.tensor([3, 5, 9]))
    torch.testing.assert_close(glob[0], torch.stack(seen[3]).mean(0), rtol=0, atol=1e-6)
    torch.testing.assert_close(glob[1], torch.stack(seen[5]).mean(0), rtol=0, atol=1e-6)
    torch.testing.assert_close(glob[2], init[9])  # never in a context: global reads as local
    torch.testing.assert_close(local, torch.stack([local_ref[3], local_ref[5], local_ref[9]]), rtol=0, atol=1e-6)
    slots, _ = bank._find(torch.tensor([3, 5, 9]))
    assert bank.count[slots].tolist() == [5, 5, 0]


def test_update_equals_a_loop_over_mentions_bitwise():
    g = torch.Generator().manual_seed(6)
    h, gamma = 3, 0.3
    bank = MemoryBank(h, gamma=gamma)
    bank.ensure(torch.arange(5), torch.randn(5, h, generator=g))
    loc_ref = {k: bank.local[bank._find(torch.tensor([k]))[0]][0].clone() for k in range(5)}
    glo_ref, cnt_ref = {k: torch.zeros(h) for k in range(5)}, dict.fromkeys(range(5), 0)
    for _ in range(3):
        keys = torch.randint(0, 5, (17,), generator=g)  # many repeats of each key
        loc_obs, cls_obs = torch.randn(17, h, generator=g), torch.randn(17, h, generator=g)
        new = torch.rand(17, generator=g) < 0.7
        bank.update(keys, loc_obs, cls_obs, new)
        for i, key in enumerate(keys.tolist()):
            loc_ref[key] = (1.0 - gamma) * loc_ref[key] + gamma * loc_obs[i]
            if new[i]:
                cnt_ref[key] += 1
                glo_ref[key] = glo_ref[key] + (cls_obs[i] - glo_ref[key]) / float(cnt_ref[key])
    slots, _ = bank._find(torch.arange(5))
    assert torch.equal(bank.local[slots], torch.stack([loc_ref[k] for k in range(5)]))
    assert torch.equal(bank.global_[slots], torch.stack([glo_ref[k] for k in range(5)]))
    assert bank.count[slots].tolist() == [cnt_ref[k] for k in range(5)]


def test_new_context_false_updates_local_only():
    bank = MemoryBank(1, gamma=0.5)
    bank.ensure(torch.tensor([1]), torch.tensor([[0.0]]))
    bank.update(torch.tensor([1, 1]), torch.tensor([[4.0], [8.0]]), torch.tensor([[2.0], [100.0]]),
                new_context=torch.tensor([True, False]))
    local, glob = bank.read(torch.tensor([1]))
    assert local.item() == 5.0  # 0 -> 2 -> 5
    assert glob.item() == 2.0   # the second mention's context was already counted


def test_observe_counts_a_context_once_per_key():
    h = 2
    hidden = torch.zeros(2, 6, h)
    hidden[0, 0] = torch.tensor([1.0, 2.0])  # [CLS] of row 0
    hidden[1, 0] = torch.tensor([3.0, 6.0])  # [CLS] of row 1
    mask = torch.ones(2, 6, dtype=torch.long)
    bank = MemoryBank(h, window_k=0, gamma=1.0)
    keys = torch.tensor([4, 4, 4])
    bank.ensure(keys, torch.zeros(3, h))
    bank.observe(hidden, mask, torch.tensor([0, 0, 1]), torch.tensor([1, 3, 2]), torch.tensor([2, 4, 3]), keys)
    _, glob = bank.read(torch.tensor([4]))
    torch.testing.assert_close(glob, torch.tensor([[2.0, 4.0]]))  # mean of the two rows' [CLS], not (2,4,6)/3
    assert bank.count[bank._find(torch.tensor([4]))[0]].item() == 2


# ---- Eq. (7), (8) ---------------------------------------------------------------------------------

def test_mix_endpoints():
    g = torch.Generator().manual_seed(1)
    h_e, local, glob = (torch.randn(3, 5, generator=g) for _ in range(3))
    assert torch.equal(mix(h_e, local, glob, 0.0), h_e)
    raw = dict(match_norm=False)
    torch.testing.assert_close(mix(h_e, local, glob, 1.0, **raw), (local + glob) / 2, rtol=0, atol=1e-7)
    torch.testing.assert_close(mix(h_e, local, glob, 0.5, **raw), 0.5 * h_e + 0.25 * (local + glob), rtol=0, atol=1e-6)
    assert mix(h_e.bfloat16(), local, glob, 0.3).dtype == torch.bfloat16


def test_lambda_schedule_is_eq8_as_printed():
    """Eq. (8): lambda_q = lambda / beta^q; beta = 1 is no decay (Sec. 4.8)."""
    for q in (0, 1, 2, 5, 0.5):
        assert lambda_at(q, lambda0=0.5, beta=1.0) == 0.5
    assert lambda_at(0, 0.5, 2.0) == 0.5
    assert lambda_at(1, 0.5, 2.0) == 0.25
    assert lambda_at(2, 0.5, 2.0) == 0.125
    assert lambda_at(1, 0.4, 4.0) == pytest.approx(0.1)
    assert lambda_at(0.5, 0.5, 4.0) == pytest.approx(0.25)  # fractional q: 0.5 / sqrt(4)
    with pytest.raises(ValueError, match="q"):
        lambda_at(-0.1)
    with pytest.raises(ValueError, match="beta"):
        lambda_at(1, 0.5, 0.5)


def test_mix_rescales_memory_to_the_norm_of_h_e():
    """Eq. (7) with match_norm: each memory row is brought to |h_e| before mixing (hand values)."""
    h_e = torch.tensor([[3.0, 4.0]])            # |h_e| = 5
    local = torch.tensor([[0.0, 70.0]])         # -> (0, 5)
    glob = torch.tensor([[-20.0, 0.0]])         # -> (-5, 0)
    out = mix(h_e, local, glob, 0.5)
    torch.testing.assert_close(out, torch.tensor([[0.5 * 3 + 0.25 * (0 - 5), 0.5 * 4 + 0.25 * (5 + 0)]]))
    torch.testing.assert_close(mix(h_e, local, glob, 0.5, match_norm=False),
                               torch.tensor([[0.5 * 3 - 5.0, 0.5 * 4 + 17.5]]))
    g = torch.Generator().manual_seed(0)
    h = torch.randn(50, 8, generator=g)
    big = 7.0 * torch.randn(50, 8, generator=g)
    ratio = mix(h, big, big.flip(0), 0.5).norm(dim=1) / h.norm(dim=1)
    assert bool((ratio <= 1.0 + 1e-6).all()) and bool((ratio > 0.0).all())  # never above |h_e|


def test_window_mean_context_only_leaves_the_span_out():
    hidden = torch.arange(8, dtype=torch.float32).view(1, 8, 1).expand(1, 8, 2).clone()  # h_i = i
    mask = torch.ones(1, 8, dtype=torch.long)
    bank = MemoryBank(2, window_k=2, context_only=True)
    b, s, e = torch.tensor([0, 0]), torch.tensor([3, 1]), torch.tensor([5, 7])
    out = bank.window_mean(hidden, mask, b, s, e)
    # mention 0: window [1, 7) minus span [3, 5) -> positions 1, 2, 5, 6 -> mean 3.5
    # mention 1: window [0, 8) minus [CLS]/last -> 1..6, minus span 1..6 -> nothing left: the span, mean 3.5
    torch.testing.assert_close(out, torch.tensor([[3.5, 3.5], [3.5, 3.5]]))
    b, s, e = torch.tensor([0]), torch.tensor([2]), torch.tensor([3])
    torch.testing.assert_close(bank.window_mean(hidden, mask, b, s, e), torch.tensor([[(1 + 3 + 4) / 3] * 2]))
    torch.testing.assert_close(bank.window_mean(hidden, mask, b, s, e, context_only=False),
                               torch.tensor([[(1 + 2 + 3 + 4) / 4] * 2]))


# ---- storage, growth, checkpoint --------------------------------------------------------------------

def test_growth_keeps_values_and_lookup_matches_dict():
    g = torch.Generator().manual_seed(2)
    bank = MemoryBank(3, capacity=2)
    ref = {}
    for _ in range(12):
        keys = torch.randint(0, 200, (int(torch.randint(0, 9, (1,), generator=g)),), generator=g)
        init = torch.randn(keys.numel(), 3, generator=g)
        bank.ensure(keys, init)
        for i, key in enumerate(keys.tolist()):
            ref.setdefault(key, init[i])  # first occurrence wins, existing keys unchanged
    assert len(bank) == len(ref) and bank.capacity >= len(ref) and bank.capacity & (bank.capacity - 1) == 0
    assert bank.keys().tolist() == sorted(ref)
    local, glob = bank.read(torch.tensor(sorted(ref)))
    torch.testing.assert_close(local, torch.stack([ref[k] for k in sorted(ref)]), rtol=0, atol=0)
    torch.testing.assert_close(glob, local, rtol=0, atol=0)
    missing = next(k for k in range(300) if k not in ref)
    with pytest.raises(KeyError, match=str(missing)):
        bank.read(torch.tensor([missing]))


def test_nbytes_formula():
    for dtype, elem in ((torch.float32, 4), (torch.bfloat16, 2)):
        bank = MemoryBank(16, dtype=dtype, capacity=8)
        bank.ensure(torch.arange(11), torch.ones(11, 16))
        assert bank.capacity == 16
        assert bank.nbytes() == 16 * (2 * 16 * elem + 8) + 11 * 16
        exact = MemoryBank(16, dtype=dtype, capacity=11)
        exact.ensure(torch.arange(11), torch.ones(11, 16))
        assert exact.nbytes() == bytes_for(11, 16, dtype) == 11 * (2 * 16 * elem + 8 + 16)
    assert bytes_for(3_090_000, 768, torch.float32) / 1e9 == pytest.approx(19.06, abs=0.01)


def test_state_dict_round_trip_is_exact():
    h = 4
    a = MemoryBank(h, window_k=3, gamma=0.25, capacity=2)

    def step(bank, seed):
        gg = torch.Generator().manual_seed(seed)
        keys = torch.randint(0, 20, (6,), generator=gg)
        bank.ensure(keys, torch.randn(6, h, generator=gg))
        bank.update(keys, torch.randn(6, h, generator=gg), torch.randn(6, h, generator=gg))

    for s in range(4):
        step(a, s)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = MemoryBank(h)
    b.load_state_dict(torch.load(buf))
    assert (b.window_k, b.gamma) == (3, 0.25)
    for s in range(4, 8):
        step(a, s)
        step(b, s)
    sa, sb = a.state_dict(), b.state_dict()
    for name in ("sorted_keys", "sorted_slots", "local", "global", "count"):
        assert torch.equal(sa[name], sb[name]), name
    with pytest.raises(ValueError, match="hidden"):
        MemoryBank(h + 1).load_state_dict(sa)


def test_bfloat16_bank_reads_float32():
    bank = MemoryBank(4, dtype=torch.bfloat16)
    bank.ensure(torch.tensor([1, 2]), torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 0.25, -1.0, 8.0]]))
    bank.update(torch.tensor([1]), torch.full((1, 4), 2.0), torch.full((1, 4), 3.0))
    local, glob = bank.read(torch.tensor([1, 2]))
    assert local.dtype == glob.dtype == torch.float32 and bank.local.dtype == torch.bfloat16
    torch.testing.assert_close(local[0], torch.tensor([1.1, 2.0, 2.9, 3.8]), rtol=1e-2, atol=0)
    torch.testing.assert_close(glob[0], torch.full((4,), 3.0))
    torch.testing.assert_close(glob[1], local[1])


def _rss_bytes():
    """Resident bytes of this process after glibc hands freed heap memory back to the OS."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm, glibc malloc_trim")
def test_one_million_keys_storage():
    h, n, chunk = 64, 1_000_000, 250_000
    g = torch.Generator().manual_seed(4)
    perm = torch.randperm(4 * n, generator=g)[:n] * 3 + 11  # 1M distinct, unsorted keys
    warm = MemoryBank(h, dtype=torch.bfloat16)  # load the code of every op before measuring RSS
    warm.ensure(perm[:10], torch.zeros(10, h))
    warm.read(perm[:10])
    rss0 = _rss_bytes()
    bank = MemoryBank(h, dtype=torch.bfloat16)
    for i in range(0, n, chunk):
        keys = perm[i:i + chunk]
        bank.ensure(keys, (keys % 256).float().unsqueeze(1).expand(-1, h))  # integers < 256: exact in bf16
    assert len(bank) == n and bank.capacity == 2 ** 20
    tables = (bank.local, bank.global_, bank.count, bank.sorted_keys, bank.sorted_slots)
    storage = sum(t.untyped_storage().nbytes() for t in tables)
    assert bank.nbytes() == storage == 2 ** 20 * (2 * h * 2 + 8) + n * 16
    growth = _rss_bytes() - rss0
    assert 0.95 * storage < growth < 1.1 * storage, (growth, storage)
    probe = perm[torch.randint(0, n, (1000,), generator=g)]
    local, _ = bank.read(probe)
    assert torch.equal(local[:, 0], (probe % 256).float())


# ---- DDP ------------------------------------------------------------------------------------------

H_DDP = 6


def ddp_batches(steps=5):
    """Per step, one (keys, init, local_obs, cls_obs, new_context) tuple per rank (2 ranks): keys
    shared across ranks, repeated within a rank, new on both ranks at once with different inits,
    and a rank with no mentions."""
    g = torch.Generator().manual_seed(5)
    sizes = [(4, 0), (3, 5), (6, 6), (0, 2), (5, 1)][:steps]
    out = []
    for m0, m1 in sizes:
        per_rank = []
        for m in (m0, m1):
            keys = torch.randint(0, 12, (m,), generator=g)
            per_rank.append((keys, torch.randn(m, H_DDP, generator=g), torch.randn(m, H_DDP, generator=g),
                             torch.randn(m, H_DDP, generator=g), torch.rand(m, generator=g) < 0.8))
        out.append(per_rank)
    return out


WORKER = """
import sys
import torch
import torch.distributed as dist
sys.path.insert(0, {repo!r})
sys.path.insert(0, {tests!r})
from memory_bank import MemoryBank
from test_memory_bank import H_DDP, ddp_batches
dist.init_process_group("gloo")
rank = dist.get_rank()
bank = MemoryBank(H_DDP, gamma=0.3, capacity=2)
for per_rank in ddp_batches():
    keys, init, loc, cls, new = per_rank[rank]
    bank.ensure(keys, init)
    bank.read(keys)
    bank.update(keys, loc, cls, new)
torch.save(bank.state_dict(), sys.argv[1] + f"/rank{{rank}}.pt")
dist.destroy_process_group()
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_ranks_identical_and_equal_to_single_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(repo=REPO, tests=os.path.join(REPO, "tests")))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(script), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    ref = MemoryBank(H_DDP, gamma=0.3)
    for per_rank in ddp_batches():
        keys, init, loc, cls, new = (torch.cat(parts) for parts in zip(*per_rank))  # rank order
        ref.ensure(keys, init)
        ref.update(keys, loc, cls, new)
    ref = ref.state_dict()
    for name in ("sorted_keys", "sorted_slots", "local", "global", "count"):
        assert torch.equal(r0[name], r1[name]), name
        assert torch.equal(r0[name], ref[name]), name
    assert r0["count"].sum() > 0 and len(r0["sorted_keys"]) > 6
