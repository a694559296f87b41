"""Training token-level reward heads from rollouts (sampled text + a reward per sequence).

1. `token_states`: one forward pass over each stored (prompt, completion) token sequence, stopped
   after the head's block, gives the hidden state h_t at every completion position: h_0 at the
   last prompt token, h_t after completion token t (t = 1..n).
2. A RAD head predicts the sequence's label from every prefix: pred_t = link(w . h_t + c). An ARM
   head predicts it from the prefix before each token and the token: pred_t = link(e_{y_t}^T W
   h_{t-1} + b . h_{t-1} + c). Both minimise RAD's "cumulative MSE": sum_t w_t (pred_t - y)^2
   averaged over sequences, with w_t = 2 t / (n (n + 1)) (later prefixes, which know more of the
   text, weigh more; the weights of a sequence sum to 1).
3. `distill_arm`: an ARM head fitted to a teacher's raw scores of prefix + next token (teacher
   forcing on the stored text, plain MSE in raw space, as Troshin et al. distil from RAD).

Positions are independent rows of a weighted regression once the states are computed, so
training shuffles positions in minibatches (Adam).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from qprobe.errors import QProbeError
from qprobe.head_config import HeadConfig
from qprobe.policy.heads import RewardHead


@dataclass
class TokenStates:
    """Per-token hidden states of N sequences, flattened.

    h: [T, D] float16, every sequence's states h_0..h_n in order (T = sum of (n_i + 1));
    tokens: [T] int64, the completion token at each state's *next* position (y_{t+1}; -1 after
        the last token); start: [N + 1] int64 offsets of each sequence's h_0 in h."""

    h: np.ndarray
    tokens: np.ndarray
    start: np.ndarray

    @property
    def lengths(self) -> np.ndarray:  # [N] completion tokens n_i
        return np.diff(self.start) - 1

    def rad_rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(state index [M], sequence [M], position weight [M]) of h_1..h_n of every sequence."""
        n = self.lengths
        seq = np.repeat(np.arange(len(n)), n)
        t = _positions(n)  # 1..n_i
        first = np.repeat(self.start[:-1], n)
        return first + t, seq, _cum_weights(n, t)

    def arm_rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(state index [M] of h_{t-1}, sequence [M], weight [M]); the token is tokens[index]."""
        idx, seq, w = self.rad_rows()
        return idx - 1, seq, w


def _positions(n: np.ndarray) -> np.ndarray:
    """1..n_i for each sequence, concatenated."""
    total = int(n.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    first = np.repeat(np.cumsum(n) - n, n)
    return np.arange(total) - first + 1


def _cum_weights(n: np.ndarray, t: np.ndarray) -> np.ndarray:
    nn = np.repeat(n, n).astype(np.float64)
    return 2.0 * t / (nn * (nn + 1.0))


@torch.no_grad()
def token_states(model, layer: int, prompt_ids: list[list[int]], completion_ids: list[list[int]],
                 max_batch_tokens: int = 8192, say=None) -> TokenStates:
    """Hidden states after block `layer` at the last prompt token and every completion token,
    from one forward pass per batch of whole sequences (stopped after `layer`). `say` gets a
    progress line about every tenth of the tokens."""
    from qprobe.backends.hf.generic import StopForward, decoder_blocks

    blocks = decoder_blocks(model)
    n = len(prompt_ids)
    seqs = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids)]
    lens = np.array([len(c) for c in completion_ids], dtype=np.int64)
    start = np.concatenate([[0], np.cumsum(lens + 1)]).astype(np.int64)
    dim = int(model.config.hidden_size)
    h_out = np.zeros((int(start[-1]), dim), dtype=np.float16)
    tokens = np.full(int(start[-1]), -1, dtype=np.int64)
    for i, c in enumerate(completion_ids):
        tokens[start[i] : start[i] + len(c)] = c
    order = sorted(range(n), key=lambda i: len(seqs[i]))
    dev = next(model.parameters()).device
    captured: list[torch.Tensor] = []

    def hook(_mod, _inp, output):
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise StopForward

    handle = blocks[layer].register_forward_hook(hook)
    total = sum(len(q) for q in seqs)
    done_tokens, next_say, t0 = 0, total / 10, time.perf_counter()
    try:
        i = 0
        while i < n:
            j = i + 1
            while j < n and len(seqs[order[j]]) * (j - i + 1) <= max(max_batch_tokens,
                                                                     len(seqs[order[i]])):
                j += 1
            idx = order[i:j]
            t = max(len(seqs[r]) for r in idx)
            ids = torch.zeros(len(idx), t, dtype=torch.long)
            mask = torch.zeros(len(idx), t, dtype=torch.long)
            for a, r in enumerate(idx):  # right padding: positions 0..len-1 are real
                ids[a, : len(seqs[r])] = torch.tensor(seqs[r])
                mask[a, : len(seqs[r])] = 1
            captured.clear()
            try:
                model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False)
            except StopForward:
                pass
            h = captured[0].float().cpu()  # [b, t, D]
            for a, r in enumerate(idx):
                lp = len(prompt_ids[r])
                if lp == 0:
                    raise QProbeError("head training: a sample has an empty prompt")
                h_out[start[r] : start[r + 1]] = h[a, lp - 1 : len(seqs[r])].numpy()
                done_tokens += len(seqs[r])
            i = j
            if say and (done_tokens >= next_say or i == n):
                say(f"token states: {done_tokens}/{total} tokens "
                    f"({time.perf_counter() - t0:.0f} s)")
                next_say += total / 10
    finally:
        handle.remove()
    return TokenStates(h_out, tokens, start)


@dataclass
class FitConfig:
    """Optimisation of a head (full passes over the positions, Adam)."""

    epochs: int = 30
    lr: float = 3e-3
    batch: int = 4096
    weight_decay: float = 0.0
    seed: int = 0


def _scale(h: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Per-dimension root mean square of the training states times sqrt(D), so scaled states
    have about unit norm and one Adam step moves the output by about lr whatever the width (no
    centring: an ARM head stays exactly bilinear in h); floored so a dead dimension does not
    blow up."""
    x = h[rows[:: max(1, len(rows) // 200_000)]].astype(np.float32)
    rms = np.sqrt((x * x).mean(0))
    return np.maximum(rms, 1e-3 * max(float(rms.max()), 1e-12)) * np.sqrt(h.shape[1])


def _fit(head: RewardHead, pred, rows: np.ndarray, target: np.ndarray, weight: np.ndarray,
         n_seq: int, cfg: FitConfig, say=None) -> float:
    """Minimise sum_i weight_i (pred(rows_i) - target_i)^2 / n_seq by Adam over minibatches."""
    g = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    tgt = torch.as_tensor(target, dtype=torch.float32)
    wts = torch.as_tensor(weight, dtype=torch.float32)
    m = len(rows)
    loss_val = float("nan")
    head.train()
    for epoch in range(cfg.epochs):
        perm = torch.randperm(m, generator=g)
        total = 0.0
        for b in range(0, m, cfg.batch):
            sel = perm[b : b + cfg.batch]
            err = pred(sel) - tgt[sel]
            # Scaled so that a pass over all positions sums to the full objective.
            loss = (wts[sel] * err * err).sum() / n_seq
            opt.zero_grad()
            (loss * (m / len(sel))).backward()
            opt.step()
            total += float(loss.detach())
        loss_val = total
        if say and (epoch == cfg.epochs - 1 or epoch % 10 == 0):
            say(f"train-head: epoch {epoch + 1}/{cfg.epochs} loss {total:.5f}")
    head.eval()
    return loss_val


def fit_rad(states: TokenStates, labels: np.ndarray, head: RewardHead, cfg: FitConfig,
            say=None) -> float:
    """Train a rad head on sequence labels [N] with the cumulative MSE; returns the final loss."""
    idx, seq, w = states.rad_rows()
    return _fit_labels(states, labels, head, cfg, idx, seq, w, say)


def fit_arm(states: TokenStates, labels: np.ndarray, head: RewardHead, cfg: FitConfig,
            emb: torch.Tensor, say=None) -> float:
    """Train an arm head on sequence labels [N] with the cumulative MSE (teacher forcing on the
    stored tokens); emb: the trunk's output embeddings [V, D]."""
    idx, seq, w = states.arm_rows()
    return _fit_labels(states, labels, head, cfg, idx, seq, w, say, emb)


def _fit_labels(states, labels, head, cfg, idx, seq, w, say, emb=None) -> float:
    if len(idx) == 0:
        raise QProbeError("head training: no completion tokens to train on")
    labels = np.asarray(labels, dtype=np.float64)
    if head.link == "sigmoid" and ((labels < 0) | (labels > 1)).any():
        raise QProbeError("head training: a sigmoid head needs labels in [0, 1] (use "
                          "--label-threshold or --link identity)")
    head.std.copy_(torch.as_tensor(_scale(states.h, idx)))
    pred = _predictor(states, head, idx, emb)
    n_seq = int((states.lengths > 0).sum())
    return _fit(head, lambda sel: head.reward(pred(sel)), idx, labels[seq], w, n_seq, cfg, say)


def _predictor(states: TokenStates, head: RewardHead, idx: np.ndarray, emb=None):
    """raw(sel) over the training rows idx (states read lazily, as float32)."""
    h_all = torch.from_numpy(states.h)  # float16, shared
    tok = torch.from_numpy(states.tokens)
    ridx = torch.from_numpy(idx)

    def raw(sel: torch.Tensor) -> torch.Tensor:
        r = ridx[sel]
        h = h_all[r].float()
        if head.kind == "rad":
            return head.rad_raw(h)
        return head.arm_raw(h, tok[r][:, None], emb)[:, 0]

    return raw


def sequence_scores(states: TokenStates, head: RewardHead, emb: torch.Tensor | None = None,
                    batch: int = 65536) -> np.ndarray:
    """[N] float64: each sequence's sum of the arm head's raw outputs over its tokens (the
    autoregressive reward; 0 for an empty completion)."""
    idx, seq, _ = states.arm_rows()
    pred = _predictor(states, head, idx, emb)
    out = torch.zeros(len(states.lengths), dtype=torch.float64)
    with torch.no_grad():
        for b in range(0, len(idx), batch):
            sel = torch.arange(b, min(b + batch, len(idx)))
            out.index_add_(0, torch.from_numpy(seq[b : b + batch]), pred(sel).double())
    return out.numpy()


def fit_arm_pairs(states: TokenStates, chosen: np.ndarray, rejected: np.ndarray,
                  head: RewardHead, cfg: FitConfig, emb: torch.Tensor, say=None,
                  pairs_per_step: int = 64) -> float:
    """Train an arm head on preference pairs: chosen / rejected [P] are sequence indices into
    states; minimises the mean of -log sigmoid(S(chosen) - S(rejected)), S = the sum of the
    head's raw outputs over a sequence's tokens. Returns the final epoch's mean loss."""
    if head.kind != "arm" or head.link != "identity":
        raise QProbeError("head training: pairs train an arm head with link identity")
    idx, seq, _ = states.arm_rows()
    if len(idx) == 0 or len(chosen) == 0:
        raise QProbeError("head training: no pairs with completion tokens to train on")
    head.std.copy_(torch.as_tensor(_scale(states.h, idx)))
    pred = _predictor(states, head, idx, emb)
    # rows of each sequence: arm_rows is ordered by sequence, so sequence i owns
    # rows first[i] .. first[i] + n_i - 1
    n = states.lengths
    first = np.concatenate([[0], np.cumsum(n)[:-1]])
    g = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    pairs = np.stack([np.asarray(chosen), np.asarray(rejected)], 1)  # [P, 2]
    loss_val = float("nan")
    head.train()
    for epoch in range(cfg.epochs):
        perm = torch.randperm(len(pairs), generator=g).numpy()
        total = 0.0
        for b in range(0, len(pairs), pairs_per_step):
            pp = pairs[perm[b : b + pairs_per_step]]  # [B, 2]
            seqs = pp.reshape(-1)  # [2B] chosen, rejected, chosen, ...
            rows = np.concatenate([np.arange(first[i], first[i] + n[i]) for i in seqs])
            owner = np.repeat(np.arange(len(seqs)), n[seqs])  # [M] which of the 2B
            score = torch.zeros(len(seqs)).index_add(0, torch.from_numpy(owner),
                                                     pred(torch.from_numpy(rows)))
            margin = score[0::2] - score[1::2]  # [B]
            loss = torch.nn.functional.softplus(-margin).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(pp)
        loss_val = total / len(pairs)
        if say and (epoch == cfg.epochs - 1 or epoch % 5 == 0):
            say(f"train-head: epoch {epoch + 1}/{cfg.epochs} pair loss {loss_val:.4f}")
    head.eval()
    return loss_val


def pair_indices(prompt_ids: list[str], roles: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(chosen [P], rejected [P]) row indices: one pair per prompt that has exactly one row of
    each role (rows of other roles, e.g. sampled answers, are ignored)."""
    by: dict[str, dict[str, list[int]]] = {}
    for i, (p, role) in enumerate(zip(prompt_ids, roles)):
        by.setdefault(p, {}).setdefault(role, []).append(i)
    c, r = [], []
    for roles_of in by.values():
        if len(roles_of.get("chosen", [])) == 1 and len(roles_of.get("rejected", [])) == 1:
            c.append(roles_of["chosen"][0])
            r.append(roles_of["rejected"][0])
    return np.asarray(c, dtype=np.int64), np.asarray(r, dtype=np.int64)


def teacher_rad_raw(states: TokenStates, teacher: RewardHead) -> np.ndarray:
    """A rad head's raw score at every prefix + next token h_1..h_n, aligned with arm_rows()."""
    idx, _, _ = states.rad_rows()
    out = np.empty(len(idx), dtype=np.float32)
    with torch.no_grad():
        for b in range(0, len(idx), 65536):
            out[b : b + 65536] = teacher.rad_raw(torch.from_numpy(
                states.h[idx[b : b + 65536]]).float()).numpy()
    return out


def distill_arm(states: TokenStates, teacher_raw: np.ndarray, head: RewardHead, cfg: FitConfig,
                emb: torch.Tensor, say=None) -> float:
    """Fit an arm head to a teacher's raw scores of prefix + next token: teacher_raw [M] aligned
    with states.arm_rows() (plain MSE in raw space; the head's link should be the teacher's)."""
    idx, _, _ = states.arm_rows()
    if len(teacher_raw) != len(idx):
        raise QProbeError(f"distill: {len(teacher_raw)} teacher scores for {len(idx)} positions")
    head.std.copy_(torch.as_tensor(_scale(states.h, idx)))
    pred = _predictor(states, head, idx, emb)
    w = np.ones(len(idx))
    return _fit(head, pred, idx, np.asarray(teacher_raw), w, len(idx), cfg, say)


def train_head(rollouts: list[str], cfg: HeadConfig, model_bundle: tuple | None = None,
               say=print) -> RewardHead:
    """Train a head on the stored samples and rewards of rollouts folders (token ids as sampled).

    model_bundle = (transformers model, tokenizer, identity) skips loading (tests)."""
    from qprobe.backends.hf.generic import decoder_blocks
    from qprobe.backends.hf.model import load_hf, resolve_layer
    from qprobe.backends.hf.tokenizer import PromptTokenizer
    from qprobe.embed import EmbedConfig, model_for
    from qprobe.features import FeatureSpec, chat_identity
    from qprobe.policy.heads import tokenizer_identity
    from qprobe.rollouts import Rollouts

    if not rollouts:
        raise QProbeError("train-head: give at least one rollouts folder")
    rs = [Rollouts(p) for p in rollouts]
    chats = {bool(r.meta.get("chat", False)) for r in rs}
    if len(chats) > 1:
        raise QProbeError("train-head: the rollouts folders mix chat and plain prompts")
    chat = chats.pop()
    trunk_name = cfg.model or model_for(EmbedConfig(rollouts=str(rs[0].path)))
    if model_bundle is None:
        say(f"train-head: loading {trunk_name}")
        model_bundle = load_hf(trunk_name, device=cfg.device)
    hf, tokenizer, identity = model_bundle
    tok = PromptTokenizer(tokenizer, chat)
    n_layers = len(decoder_blocks(hf))
    own = rs[0].feature_spec
    if cfg.layer is not None:
        layer = resolve_layer(cfg.layer, n_layers)
    elif own is not None and own.model == chat_identity(identity, chat):
        layer = own.layer
    else:
        layer = resolve_layer(None, n_layers)
    if cfg.pairs and (cfg.kind != "arm" or cfg.distill_from):
        raise QProbeError("train-head: --pairs trains an arm head from pairs (--kind arm, no "
                          "--distill-from)")
    prompts, comps, rewards, keys, roles = [], [], [], [], []
    for j, r in enumerate(rs):
        if "token_ids" not in r.table.column_names:
            raise QProbeError(f"{r.path}: no token_ids column (collect with a local model)")
        if cfg.pairs and "role" not in r.table.column_names:
            raise QProbeError(f"{r.path}: no role column (collect the task's preference pairs)")
        rw = r.rewards
        role = r.column("role") if cfg.pairs else [""] * len(rw)
        for p, pid, ids, y, ro in zip(r.column("prompt"), r.column("prompt_id"),
                                      r.column("token_ids"), rw, role):
            if (ro in ("chosen", "rejected") if cfg.pairs else np.isfinite(y)) and ids:
                prompts.append(p)
                comps.append(list(ids))
                rewards.append(float(y))
                keys.append(f"{j}/{pid}")
                roles.append(ro)
    if not prompts:
        raise QProbeError("train-head: no " + ("preference pairs" if cfg.pairs else "scored "
                          "samples") + " with tokens in the rollouts")
    cache: dict[str, list[int]] = {}
    for p in prompts:
        if p not in cache:
            cache[p] = tok.prompt_ids(p)
    p_ids = [cache[p] for p in prompts]
    say(f"train-head: {len(prompts)} samples, {sum(map(len, comps))} tokens; reading block {layer}")
    states = token_states(hf, layer, p_ids, comps, say=say)
    y = np.asarray(rewards)
    labels = (y > cfg.label_threshold).astype(np.float64) if cfg.label_threshold is not None else y
    if cfg.pairs:
        chosen, rejected = pair_indices(keys, roles)
        labels = np.zeros(len(y))
        labels[chosen] = 1.0  # reported as label_mean: the share of rows that are chosen
    dim = int(hf.config.hidden_size)
    spec = FeatureSpec(model=chat_identity(identity, chat), layer=layer, position="last",
                       dim=dim, dtype="float32")
    torch.manual_seed(cfg.seed)
    fit = FitConfig(epochs=cfg.epochs, lr=cfg.lr, batch=cfg.batch, weight_decay=cfg.weight_decay,
                    seed=cfg.seed)
    emb = hf.get_output_embeddings().weight.detach()
    link = "identity" if cfg.pairs else cfg.link
    teacher = None
    if cfg.distill_from:
        if cfg.kind != "arm":
            raise QProbeError("train-head: --distill-from trains an arm head (--kind arm)")
        teacher = RewardHead.load(cfg.distill_from)
        if teacher.kind != "rad":
            raise QProbeError(f"{cfg.distill_from}: distillation needs a rad head as the teacher")
        ts = teacher.feature_spec
        if ts is None or ts.model != spec.model or int(ts.dim) != dim:
            raise QProbeError(f"{cfg.distill_from}: the teacher reads {ts}; distillation here "
                              f"needs a teacher on the student's model {spec.model!r}")
        teacher.check_model(tokenizer, dim, str(cfg.distill_from))
        link = teacher.link
    head = RewardHead(cfg.kind, dim, rank=min(cfg.rank, dim), link=link, feature_spec=spec,
                      tokenizer=tokenizer_identity(tokenizer), trunk=trunk_name)
    t0 = time.perf_counter()
    if teacher is not None:
        t_states = states if teacher.feature_spec.layer == layer else token_states(
            hf, teacher.feature_spec.layer, p_ids, comps)  # the teacher's block, same positions
        loss = distill_arm(states, teacher_rad_raw(t_states, teacher), head, fit, emb, say)
    elif cfg.pairs:
        loss = fit_arm_pairs(states, chosen, rejected, head, fit, emb, say)
    elif cfg.kind == "rad":
        loss = fit_rad(states, labels, head, fit, say)
    else:
        loss = fit_arm(states, labels, head, fit, emb, say)
    head.info = {"training": {**asdict(cfg), "link": link, "rollouts": [str(r.path) for r in rs],
                              "samples": len(prompts), "tokens": int(states.lengths.sum()),
                              **({"n_pairs": int(len(chosen))} if cfg.pairs else {}),
                              "label_mean": float(labels.mean()), "final_loss": float(loss),
                              "seconds": round(time.perf_counter() - t0, 1)}}
    return head
