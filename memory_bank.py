"""Knowledge-augmented Memory Bank (TRELM, Sec. 3.2, Eq. 4-8).

For every key (a KG entity index, or num_entities + token id for a long-tail word; any int64 id
works) the bank holds two vectors:
  local memory  = an exponential moving average of the mean last-layer output in a window of k
                  tokens around each mention of the key (Eq. 4-5), initialised from the row given
                  to ensure() (pretrain.py: the key's knowledge embedding h_e);
  global memory = the exact running mean of the last-layer [CLS] output over all contexts that
                  contain the key (Eq. 6).
Before the forward pass the input at a mention is mixed with both memories (Eq. 7), with a weight
lambda that decays over pre-training (Eq. 8). Memory values are detached (no gradient flows into
or through them) and updated after the forward pass.

One training step (what pretrain.py does for --method trelm):

    bank.ensure(ent_id, h_e)                       # (S,), (S,H): add the injected keys not yet seen
    local, glob = bank.read(ent_id)                # (S,H), (S,H) on ent_id's device
    x = span_input(E, rows, cols, mention, h_e, (local, glob), lambda_at(q, lambda0, beta))  # Eq. (7), (8)
    out = model(inputs_embeds=x, ...)              # forward/backward as usual
    seen = bank.contains(all_ent_id)               # every mention of a key, injected or not (Sec. 3.2)
    bank.observe(last_hidden, attention_mask, ent_batch[seen], ent_start[seen], ent_end[seen], all_ent_id[seen])

Paper symbols -> names here
| paper                 | here                          | default (pretrain.py flag) |
|-----------------------|-------------------------------|----------------------------|
| e                     | key (int64, e.g. KG index)    |                            |
| local / global memory | local, global_ (table rows)   |                            |
| k (window)            | window_k / k                  | 16 (--window-k)            |
| gamma (discount)      | gamma                         | 0.1 (--gamma)              |
| h_e                   | h_e                           |                            |
| I_p, Eq. 7            | mix(h_e, local, global_, lam) |                            |
| lambda, lambda_0      | lam, lambda0                  | 0.5 (--lambda0)            |
| beta                  | beta                          | 2.0 (--beta)               |
| q                     | q (pre-training epoch)        | integer (--lambda-q)       |

Decisions (the paper gives the mechanisms, not these details; reasons and measurements in
docs/departures.md):
- Eq. 4: the window [start - k, end + k) is clipped to the row's real tokens without [CLS]/<s> and
  the final [SEP]/</s> ([CLS] feeds the global memory); the mean divides by the positions summed.
- Eq. 4 without the span (context_only=True, pretrain.py --memory-window context): the local memory
  holds "its surrounding words" (Sec. 3.2), never the span outputs CKA trains to predict.
- Eq. 5: m_l <- (1 - gamma) m_l + gamma obs (Wu et al. 2020's note update); gamma = 0.1, no paper value.
- Eq. 6: an exact running mean (n <- n + 1; m_g <- m_g + (cls - m_g) / n); a row counts once per key.
- A key with no context yet reads its global memory as its local memory, so Eq. 7 is always defined.
- Eq. 7 rescales each memory vector to the norm of its h_e row (mix(match_norm=True); pretrain.py
  --memory-scale raw turns it off): the memories hold last-layer outputs, the slot holds embeddings.
- Eq. 8 as printed: lambda_q = lambda_0 / beta^q, q the integer epoch (--lambda-q fraction: the
  fractional epoch); beta >= 1 (1 = no decay, Sec. 4.8).
- The initial local memory is what ensure() is given; pretrain.py passes h_e = E(t) - E(r), not the
  embedding of the key's own tokens, which are CKA's targets (--memory-init).
- Several mentions of one key in a step (also across DDP ranks) apply one after the other in
  gathered order (rank 0's mentions, then rank 1's, ...): bitwise equal to a Python loop over them
  in float32 (rounded to `dtype` once per step), for any split of a global batch into ranks.
- DDP: ensure(), update() and observe() are collective when torch.distributed is initialised (every
  rank calls them at every step, with M = 0 if it has no mention); each gathers all ranks' arguments
  in rank order, so all ranks hold bitwise-identical memory (gloo on CPU, nccl on GPU). A key new to
  several ranks at once takes the init of its first occurrence in rank order.
- Long-tail words as keys (pretrain.py --long-tail-words, off by default; Sec. 3.4 "important
  entities and long-tail words", after Wu et al. 2020): key = num_entities + token id of a whole-word
  token (data.whole_words) outside mention spans, long-tail by data.word_counts; the local memory
  starts as the word's input embedding; every occurrence updates Eq. 4-6 as a one-token span; Eq. 7
  mixes where the input shows the word (h_e = its own E_p), never where MLM masks or replaces it.

Storage: only keys that occur. Tables local (C,H), global_ (C,H) in `dtype` (float32 or bfloat16)
and count (C,) int64 on `device`, C = capacity (doubles when full); a sorted key array (S,) and
the slot of each sorted key (S,), int64, looked up with searchsorted (S = number of keys). So

    nbytes() = C * (2 * H * elem + 8) + S * 16        elem = 4 (float32) or 2 (bfloat16)
    bytes(S) = S * (2 * H * elem + 8 + 16)             when C = S (pass capacity=S up front)

e.g. 19.1 GB in float32, 9.6 GB in bfloat16 if all 3.09M Wikidata5M entities were keys (H = 768).
All arithmetic is done in float32 and rounded to `dtype` once per step; bfloat16 keeps 8
significant bits, so a running mean over many contexts stops moving once (cls - m_g) / n falls
below its resolution.

Tests: python -m pytest -q tests/test_memory_bank.py
"""
import math

import torch
import torch.distributed as dist


def lambda_at(q, lambda0=0.5, beta=2.0):
    """Eq. (8): lambda_q = lambda0 / beta^q at pre-training epoch q >= 0 (integer or fractional)."""
    if q < 0:
        raise ValueError(f"memory_bank.lambda_at: q (pre-training epoch) must be >= 0, got {q}")
    if beta < 1:
        raise ValueError(f"memory_bank.lambda_at: beta (--beta) must be >= 1 (1 = no decay), got {beta}")
    return lambda0 / beta ** q  # Eq. (8)


def lambda_for(mem, step, max_steps, epochs_seen):
    """Eq. (8) at optimizer step `step` of a run under config.Memory `mem`: lambda0 / beta^q with q the
    pre-training epoch: the real epochs seen (epochs_seen), or with --lambda-epochs E the run counted as E
    epochs (E * step / max_steps); its integer part (--lambda-q epoch, the paper's) or the fraction
    itself. 0 without a memory bank (nothing is mixed)."""
    if not mem.memory_bank:
        return 0.0
    epoch = mem.lambda_epochs * step / max_steps if mem.lambda_epochs else epochs_seen
    return lambda_at(math.floor(epoch) if mem.lambda_q == "epoch" else epoch, mem.lambda0, mem.beta)


def mix(h_e, local, global_, lam, match_norm=True):
    """Eq. (7): I_p = (1 - lam) * h_e + lam / 2 * (local + global_), all (M,H); result in h_e's dtype.
    match_norm: first rescale each memory row to the norm of its h_e row (see the module docstring)."""
    h = h_e.float()  # (M,H)
    local, global_ = local.float(), global_.float()
    if match_norm:
        target = h.norm(dim=1, keepdim=True)  # (M,1)
        local = local * (target / local.norm(dim=1, keepdim=True).clamp(min=1e-12))
        global_ = global_ * (target / global_.norm(dim=1, keepdim=True).clamp(min=1e-12))
    out = (1.0 - lam) * h + (lam / 2.0) * (local + global_)  # Eq. (7), (M,H)
    return out.to(h_e.dtype)


def span_input(embeds, rows, cols, mention, h_e, mem=None, lam=0.0, match_norm=True):
    """The encoder input of Sec. 3.2: I_p = Eq. (7) at the P injected positions (rows, cols) of
    mention[p], I_p = E_p elsewhere (embeds (B,T,H), bitwise). h_e (S,H), mem = (local, global_)
    (S,H) each or None (no memory: I_p = h_e). -> new (B,T,H), differentiable w.r.t. embeds, h_e."""
    h = h_e if mem is None else mix(h_e, mem[0], mem[1], lam, match_norm)  # (S,H) Eq. (7)
    return embeds.index_put((rows, cols), h[mention].to(embeds.dtype))  # (B,T,H)


def bytes_for(num_keys, hidden, dtype=torch.float32):
    """Bytes a bank with num_keys keys at capacity num_keys holds: S * (2*H*elem + 8 + 16)."""
    elem = torch.empty((), dtype=dtype).element_size()
    return num_keys * (2 * hidden * elem + 8 + 16)


def _gather_rank_order(tensors, group):
    """all_gather tensors of equal leading size M_r per rank (M_r may differ between ranks) and
    concatenate them in rank order. Returns the tensors on their original device."""
    backend = dist.get_backend(group)
    comm_device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    world = dist.get_world_size(group)
    m = torch.tensor([tensors[0].shape[0]], dtype=torch.int64, device=comm_device)
    sizes = [torch.zeros_like(m) for _ in range(world)]
    dist.all_gather(sizes, m, group=group)
    sizes = [int(s.item()) for s in sizes]
    m_max = max(sizes)
    out = []
    for t in tensors:
        padded = torch.zeros((m_max,) + tuple(t.shape[1:]), dtype=t.dtype, device=comm_device)
        padded[: t.shape[0]] = t.to(comm_device)
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded, group=group)
        out.append(torch.cat([p[:s] for p, s in zip(parts, sizes)]).to(t.device))
    return out


def _distributed():
    return dist.is_available() and dist.is_initialized()


class MemoryBank:
    """Local and global memory of the keys that occur (see the module docstring). hidden = H;
    capacity = rows allocated up front (pass the expected number of keys to avoid regrowth)."""

    def __init__(self, hidden, window_k=16, gamma=0.1, dtype=torch.float32, device="cpu", capacity=1024,
                 context_only=False):
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"memory_bank.MemoryBank: dtype must be torch.float32 or torch.bfloat16, got {dtype}")
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"memory_bank.MemoryBank: gamma (--gamma) must be in (0, 1], got {gamma}")
        if window_k < 0:
            raise ValueError(f"memory_bank.MemoryBank: window_k (--window-k) must be >= 0, got {window_k}")
        self.hidden, self.window_k, self.gamma = hidden, window_k, gamma
        self.context_only = context_only  # Eq. (4) without the span itself (see window_mean)
        self.dtype, self.device = dtype, torch.device(device)
        capacity = max(1, capacity)
        self.local = torch.zeros(capacity, hidden, dtype=dtype, device=self.device)    # (C,H)
        self.global_ = torch.zeros(capacity, hidden, dtype=dtype, device=self.device)  # (C,H)
        self.count = torch.zeros(capacity, dtype=torch.int64, device=self.device)      # (C,)
        self.sorted_keys = torch.zeros(0, dtype=torch.int64, device=self.device)       # (S,)
        self.sorted_slots = torch.zeros(0, dtype=torch.int64, device=self.device)      # (S,)

    lambda_at = staticmethod(lambda_at)

    def __len__(self):
        return self.sorted_keys.numel()

    @property
    def capacity(self):
        return self.local.shape[0]

    def nbytes(self):
        """Bytes held by all tables: capacity * (2*H*elem + 8) + len(self) * 16."""
        return sum(t.numel() * t.element_size()
                   for t in (self.local, self.global_, self.count, self.sorted_keys, self.sorted_slots))

    def keys(self):
        """All keys, sorted, (S,) int64 on the bank's device."""
        return self.sorted_keys

    # ---- key -> slot ---------------------------------------------------------------------------
    def _find(self, keys):
        """keys (N,) int64 on the bank's device -> (slots (N,), present (N,) bool)."""
        s = self.sorted_keys.numel()
        pos = torch.searchsorted(self.sorted_keys, keys)  # (N,)
        pos_c = pos.clamp(max=max(s - 1, 0))
        present = (pos < s) & (self.sorted_keys[pos_c] == keys) if s else torch.zeros_like(keys, dtype=torch.bool)
        slots = self.sorted_slots[pos_c] if s else torch.zeros_like(keys)
        return slots, present

    def _slots(self, keys, caller):
        slots, present = self._find(keys)
        if not bool(present.all()):
            missing = keys[~present][:5].tolist()
            raise KeyError(f"memory_bank.MemoryBank.{caller}: keys {missing} (first 5) are not in the bank; "
                           f"call ensure(keys, init) before the forward pass")
        return slots

    def _grow(self, needed):
        cap = self.capacity
        if needed <= cap:
            return
        while cap < needed:
            cap *= 2
        s = len(self)
        for name in ("local", "global_", "count"):
            old = getattr(self, name)
            new = torch.zeros((cap,) + tuple(old.shape[1:]), dtype=old.dtype, device=self.device)
            new[:s] = old[:s]
            setattr(self, name, new)

    def _check_keys(self, keys, caller):
        if keys.dim() != 1 or keys.dtype != torch.int64:
            raise ValueError(f"memory_bank.MemoryBank.{caller}: keys must be a 1-D int64 tensor, "
                             f"got shape {tuple(keys.shape)} dtype {keys.dtype}")

    def _check_rows(self, x, m, name, caller):
        if x.shape != (m, self.hidden):
            raise ValueError(f"memory_bank.MemoryBank.{caller}: {name} must have shape ({m}, {self.hidden}), "
                             f"got {tuple(x.shape)}")

    # ---- public API ----------------------------------------------------------------------------
    def contains(self, keys):
        """(N,) bool: which keys (N,) int64 are in the bank (on keys' device)."""
        self._check_keys(keys, "contains")
        return self._find(keys.to(self.device))[1].to(keys.device)

    def ensure(self, keys, init, process_group=None):
        """Add the keys not yet in the bank: local memory = init row (pretrain.py: the key's h_e,
        see the module docstring), global count 0. keys (M,) int64, init (M,H). Existing keys are
        left unchanged. A key repeated in `keys` takes its first row. Collective under DDP."""
        self._check_keys(keys, "ensure")
        self._check_rows(init, keys.shape[0], "init", "ensure")
        keys = keys.detach()
        init = init.detach().float()
        if _distributed():
            keys, init = _gather_rank_order([keys, init], process_group)
        keys, init = keys.to(self.device), init.to(self.device)
        if keys.numel() == 0:
            return
        _, present = self._find(keys)
        keys, init = keys[~present], init[~present]
        if keys.numel() == 0:
            return
        new_keys, inverse = torch.unique(keys, sorted=True, return_inverse=True)  # (n,), (N,)
        n = new_keys.numel()
        idx = torch.arange(inverse.numel(), device=self.device)
        first = torch.full((n,), inverse.numel(), dtype=torch.int64, device=self.device)
        first = first.scatter_reduce(0, inverse, idx, reduce="amin")  # first occurrence of each new key
        s = len(self)
        self._grow(s + n)
        new_slots = torch.arange(s, s + n, device=self.device)  # new keys get slots in sorted key order
        self.local[new_slots] = init[first].to(self.dtype)
        self.global_[new_slots] = 0
        self.count[new_slots] = 0
        # merge the sorted key arrays in O(S + n log S)
        pos_new = torch.searchsorted(self.sorted_keys, new_keys) + torch.arange(n, device=self.device)
        pos_old = torch.arange(s, device=self.device) + torch.searchsorted(new_keys, self.sorted_keys)
        merged_keys = torch.empty(s + n, dtype=torch.int64, device=self.device)
        merged_slots = torch.empty(s + n, dtype=torch.int64, device=self.device)
        merged_keys[pos_old], merged_slots[pos_old] = self.sorted_keys, self.sorted_slots
        merged_keys[pos_new], merged_slots[pos_new] = new_keys, new_slots
        self.sorted_keys, self.sorted_slots = merged_keys, merged_slots

    def read(self, keys):
        """-> (local (M,H), global (M,H)) float32 on keys' device. A key with no context yet reads
        its global memory as its local memory."""
        self._check_keys(keys, "read")
        slots = self._slots(keys.to(self.device), "read")
        local = self.local[slots].float()  # (M,H)
        glob = torch.where((self.count[slots] > 0).unsqueeze(1), self.global_[slots].float(), local)  # (M,H)
        return local.to(keys.device), glob.to(keys.device)

    def window_mean(self, hidden, attention_mask, ent_batch, ent_start, ent_end, k=None, context_only=None):
        """Eq. (4): mean of hidden (B,T,H) over the window [start - k, end + k) of each mention,
        clipped to the real tokens of its row (attention_mask (B,T) == 1) without the first and the
        last real token ([CLS]/<s> and the final [SEP]/</s>). context_only (default self.context_only): leave
        the span [start, end) out; a mention whose window has no other real token then falls back
        to its span. -> (M,H) float32. k defaults to window_k."""
        k = self.window_k if k is None else k
        context_only = self.context_only if context_only is None else context_only
        b, t, _ = hidden.shape
        if attention_mask.shape != (b, t):
            raise ValueError(f"memory_bank.window_mean: attention_mask must have shape {(b, t)}, "
                             f"got {tuple(attention_mask.shape)}")
        real = attention_mask.bool()  # (B,T)
        pos = torch.arange(t, device=hidden.device).expand(b, t)  # (B,T)
        first = torch.where(real, pos, t).amin(dim=1, keepdim=True)  # (B,1)
        last = torch.where(real, pos, -1).amax(dim=1, keepdim=True)  # (B,1)
        ctx = real & (pos != first) & (pos != last)  # (B,T) real tokens without [CLS] and the last [SEP]
        w = ctx.to(torch.float32)  # (B,T)
        csum = torch.zeros(b, t + 1, hidden.shape[2], dtype=torch.float32, device=hidden.device)
        torch.cumsum(torch.where(ctx.unsqueeze(2), hidden.detach().float(), 0.0), dim=1, out=csum[:, 1:])  # (B,T+1,H)
        ccount = torch.zeros(b, t + 1, dtype=torch.float32, device=hidden.device)
        torch.cumsum(w, dim=1, out=ccount[:, 1:])  # (B,T+1)
        lo = (ent_start - k).clamp(min=0, max=t)  # (M,)
        hi = (ent_end + k).clamp(min=0, max=t)    # (M,)
        total = csum[ent_batch, hi] - csum[ent_batch, lo]  # (M,H)
        n = ccount[ent_batch, hi] - ccount[ent_batch, lo]  # (M,)
        if context_only:  # Eq. (4) over the surrounding words only
            s0, e0 = ent_start.clamp(min=0, max=t), ent_end.clamp(min=0, max=t)
            around = n - (ccount[ent_batch, e0] - ccount[ent_batch, s0])  # (M,)
            keep = (around >= 1).unsqueeze(1)  # (M,1)
            total = torch.where(keep, total - (csum[ent_batch, e0] - csum[ent_batch, s0]), total)
            n = torch.where(keep[:, 0], around, n)
        bad = (ent_start < 0) | (ent_end > t) | (ent_start >= ent_end) | (n < 1)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(f"memory_bank.window_mean: mention {i} (row {int(ent_batch[i])}, span "
                             f"[{int(ent_start[i])}, {int(ent_end[i])})) must satisfy 0 <= start < end <= {t} "
                             f"and have a real token in its window")
        return total / n.unsqueeze(1)

    def update(self, keys, local_obs, cls_obs, new_context=None, process_group=None):
        """Eq. (5), (6) for each mention, one after the other in gathered order (see the module
        docstring): m_l <- (1-gamma) m_l + gamma local_obs; if new_context (default all True):
        n <- n + 1, m_g <- m_g + (cls_obs - m_g) / n. keys (M,), local_obs (M,H), cls_obs (M,H),
        new_context (M,) bool. Detached. Collective under DDP."""
        self._check_keys(keys, "update")
        m = keys.shape[0]
        self._check_rows(local_obs, m, "local_obs", "update")
        self._check_rows(cls_obs, m, "cls_obs", "update")
        if new_context is None:
            new_context = torch.ones(m, dtype=torch.bool, device=keys.device)
        ids = torch.stack([keys.detach(), new_context.detach().to(torch.int64)], dim=1)  # (M,2)
        obs = torch.cat([local_obs.detach().float(), cls_obs.detach().float()], dim=1)  # (M,2H)
        if _distributed():
            ids, obs = _gather_rank_order([ids, obs], process_group)
        ids, obs = ids.to(self.device), obs.to(self.device)
        if ids.shape[0] == 0:
            return
        keys, flag = ids[:, 0], ids[:, 1].bool()
        local_obs, cls_obs = obs[:, : self.hidden], obs[:, self.hidden:]
        uniq, inverse = torch.unique(keys, sorted=True, return_inverse=True)  # (U,), (N,)
        slots = self._slots(uniq, "update")
        loc = self.local[slots].float()     # (U,H) work copies in float32
        glo = self.global_[slots].float()   # (U,H)
        cnt = self.count[slots].clone()     # (U,)
        # occurrence number of each mention among the mentions of its key, in gathered order
        order = torch.argsort(inverse, stable=True)
        grouped = inverse[order]
        occ = torch.empty_like(order)
        occ[order] = torch.arange(order.numel(), device=self.device) - torch.searchsorted(grouped, grouped)
        g = self.gamma
        for r in range(int(occ.max()) + 1):  # round r applies every key's r-th mention (distinct keys)
            sel = (occ == r).nonzero().squeeze(1)
            u = inverse[sel]
            loc[u] = (1.0 - g) * loc[u] + g * local_obs[sel]  # Eq. (5)
            f = flag[sel]
            sel, u = sel[f], u[f]
            cnt[u] += 1
            glo[u] = glo[u] + (cls_obs[sel] - glo[u]) / cnt[u].unsqueeze(1).float()  # Eq. (6)
        self.local[slots] = loc.to(self.dtype)
        self.global_[slots] = glo.to(self.dtype)
        self.count[slots] = cnt

    def observe(self, hidden, attention_mask, ent_batch, ent_start, ent_end, keys, process_group=None):
        """After the forward pass: Eq. (4) local observations, the row's [CLS] (position 0) as the
        global observation counted once per (row, key), then update(). hidden = last layer (B,T,H)."""
        local_obs = self.window_mean(hidden, attention_mask, ent_batch, ent_start, ent_end)  # (M,H)
        cls_obs = hidden.detach()[ent_batch, 0].float()  # (M,H)
        new_context = torch.zeros(keys.numel(), dtype=torch.bool, device=keys.device)  # (M,)
        if keys.numel():
            pairs = torch.stack([ent_batch.to(torch.int64), keys], dim=1)  # (M,2) (row, key)
            _, inverse = torch.unique(pairs, dim=0, return_inverse=True)
            first = torch.full((int(inverse.max()) + 1,), keys.numel(), dtype=torch.int64, device=keys.device)
            first = first.scatter_reduce(0, inverse, torch.arange(keys.numel(), device=keys.device), reduce="amin")
            new_context[first] = True
        self.update(keys, local_obs, cls_obs, new_context, process_group)

    # ---- checkpoint ----------------------------------------------------------------------------
    def state_dict(self):
        """Everything needed for an exact resume (tables cut to the used slots, on CPU)."""
        s = len(self)
        return {"hidden": self.hidden, "window_k": self.window_k, "gamma": self.gamma,
                "dtype": str(self.dtype).replace("torch.", ""),
                "sorted_keys": self.sorted_keys.cpu().clone(), "sorted_slots": self.sorted_slots.cpu().clone(),
                "local": self.local[:s].cpu().clone(), "global": self.global_[:s].cpu().clone(),
                "count": self.count[:s].cpu().clone()}

    def load_state_dict(self, state):
        """Restore a state_dict(); the checkpoint's window_k and gamma replace the current ones.
        Tables are stored in this bank's dtype and device."""
        expected = {"hidden", "window_k", "gamma", "dtype", "sorted_keys", "sorted_slots", "local", "global", "count"}
        if set(state) != expected:
            raise ValueError(f"memory_bank.MemoryBank.load_state_dict: expected keys {sorted(expected)}, "
                             f"got {sorted(state)}")
        if state["hidden"] != self.hidden:
            raise ValueError(f"memory_bank.MemoryBank.load_state_dict: checkpoint hidden {state['hidden']} "
                             f"!= bank hidden {self.hidden}")
        s = state["sorted_keys"].numel()
        if state["local"].shape != (s, self.hidden) or state["count"].shape != (s,):
            raise ValueError(f"memory_bank.MemoryBank.load_state_dict: tables do not match {s} keys")
        self.window_k, self.gamma = state["window_k"], state["gamma"]
        cap = max(self.capacity, s)
        self.local = torch.zeros(cap, self.hidden, dtype=self.dtype, device=self.device)
        self.global_ = torch.zeros(cap, self.hidden, dtype=self.dtype, device=self.device)
        self.count = torch.zeros(cap, dtype=torch.int64, device=self.device)
        self.local[:s] = state["local"].to(self.device, self.dtype)
        self.global_[:s] = state["global"].to(self.device, self.dtype)
        self.count[:s] = state["count"].to(self.device)
        self.sorted_keys = state["sorted_keys"].to(self.device).clone()
        self.sorted_slots = state["sorted_slots"].to(self.device).clone()
