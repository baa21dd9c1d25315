"""The cross-session interest Transformer (inputs from `core.encoding`, one user history per row).

Item + event-type + time-gap + recency-position embeddings feed pre-LN causal self-attention blocks. Sessions
enter twice, both *relative* to the attending position, so a causal model can be trained at every position
without leaking how many sessions follow:

* a learned attention bias per head on the session distance between query and key (0 = same session);
* an optional fusion: each position attends over mean-pooled summaries of the sessions *before its own*
  (long-term interest) and a gate mixes that into its current (short-term) state.

Events also carry a scenario (where they happened) and a query can ask about one (`target_emb`, on the query
side of the last block): the interest "as if the next event happened on tv" (docs/model.md). The readout's
attention over the history is returned too: the explanation of which sessions drove the vector.

The interest vector is the L2-normalized output at the last position. An all-padding row (cold start) returns
the learned, L2-normalized `cold` vector, trained as the predictor of every history's first item, so it
behaves like a popularity prior. Scores use the item embeddings (tied). Forward has no data-dependent Python
control flow (masks only), so it exports to ONNX with a dynamic batch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.encoding import N_EVENT_TYPES, OOV, PAD, EncoderConfig

_NEG = -1e9  # finite: a fully masked row stays a number


@dataclass
class ModelConfig:
    n_items: int  # vocabulary size including PAD and OOV
    n_categories: int = 0
    max_len: int = 200
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    dropout: float = 0.2
    n_event_types: int = N_EVENT_TYPES
    n_session_pos: int = 64  # EncoderConfig.n_session_pos
    n_time_gaps: int = 13  # EncoderConfig.n_time_gaps
    max_session_dist: int = 8  # session distances beyond share one attention bias
    use_session_pos: bool = True
    use_time_gaps: bool = True
    use_fusion: bool = False  # off: the ablation did not show it helping (docs/model-results.md)
    item_bias: bool = True  # a learned per-item logit bias (popularity prior)
    item_item_rank: int = 0  # columns of the in-graph item-item factors; 0 = no history scorer
    history_scorer: str = "knn"  # the in-graph item-item scorer: "knn" (cosine) or "ease" (Steck 2019)
    category_history: bool = True  # category logits also see the history's genre shares
    category_share_mix: float = 0.0  # with category_history: served score = (1 - mix) sigmoid(head) + mix share
    n_scenarios: int = 0  # len(EncoderConfig.scenarios): the interest can be asked per known scenario
    ease_neighbours: int = 0  # > 0: EASE's item-item weights as each item's top-N neighbours, not dense factors
    serve_len: int = 0  # inference reads the newest serve_len events (0 = all max_len); training always all

    def __post_init__(self) -> None:
        if self.history_scorer not in ("knn", "ease"):
            raise ValueError(f"history_scorer must be 'knn' or 'ease', not {self.history_scorer!r}")
        if self.ease_neighbours and self.history_scorer != "ease":
            raise ValueError("ease_neighbours needs history_scorer='ease'")

    @classmethod
    def for_encoder(cls, enc: EncoderConfig, n_items: int, **kw) -> ModelConfig:
        sizes = {"n_session_pos": enc.n_session_pos, "n_time_gaps": enc.n_time_gaps, "n_scenarios": len(enc.scenarios)}
        return cls(n_items, max_len=enc.max_len, **(sizes | kw))

    def to_dict(self) -> dict:
        return asdict(self)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, 4 * cfg.d_model), nn.GELU(), nn.Linear(4 * cfg.d_model, cfg.d_model)
        )
        self.drop = nn.Dropout(cfg.dropout)
        self.dropout = cfg.dropout

    def _heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, L, D = x.shape
        qkv = self.qkv(self.ln1(x)).view(B, L, 3, self.n_heads, D // self.n_heads)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, L, D/H]

    def forward(self, x: Tensor, mask: Tensor, query_add: Tensor | None = None) -> Tensor:
        """Every position. `mask`: additive [B, H|1, L, L] (bias; _NEG where not allowed). `query_add` [B, L, d] is
        added to each position's query side only (the asked-for scenario), never to what others attend to."""
        B, L, D = x.shape
        q, k, v = self._heads(x)
        if query_add is not None:
            x = x + query_add
            q = self._heads(x)[0]
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(B, L, D)))
        return x + self.drop(self.mlp(self.ln2(x)))

    def keys_values(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """K and V [B, H, L, D/H] of every position, for `readout` (without the queries it does not need)."""
        B, L, D = x.shape
        d = self.qkv.out_features // 3
        kv = F.linear(self.ln1(x), self.qkv.weight[d:], self.qkv.bias[d:])
        k, v = kv.view(B, L, 2, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4).unbind(0)
        return k, v

    def readout(
        self, x: Tensor, kv: tuple[Tensor, Tensor], mask: Tensor, query_add: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Inference at the last position only: its output [B, 1, d] and its attention over the positions [B, L]
        (softmax weights, mean over heads; computed explicitly because SDPA does not return them). `kv`: from
        `keys_values(x)`, shared by every readout of one history; `mask`: the last query's row [B, H|1, 1, L]."""
        B, D = x.shape[0], x.shape[2]
        k, v = kv
        x = x[:, -1:] if query_add is None else x[:, -1:] + query_add
        d = self.qkv.out_features // 3
        q = F.linear(self.ln1(x), self.qkv.weight[:d], self.qkv.bias[:d]).view(B, 1, self.n_heads, -1).transpose(1, 2)
        att = (q @ k.transpose(-2, -1) * (D // self.n_heads) ** -0.5 + mask).softmax(-1)  # [B, H, 1, L]
        x = x + self.proj((att @ v).transpose(1, 2).reshape(B, 1, D))
        return x + self.mlp(self.ln2(x)), att.mean(1)[:, 0]


class Fusion(nn.Module):
    """Long-term interest: each query attends over summaries of the sessions before its own, gated in.

    Summaries are per-session means of `ctx` (the input of the last block, known at every position), so serving
    can run the last block and the fusion for the last position only.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, self.n_pos = cfg.d_model, cfg.n_session_pos
        self.ln = nn.LayerNorm(d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.null = nn.Parameter(torch.zeros(d))  # always attendable: "no earlier session"
        self.gate = nn.Linear(2 * d, d)
        nn.init.constant_(self.gate.bias, -2.0)  # start close to the plain Transformer

    def forward(self, h: Tensor, ctx: Tensor, session_pos: Tensor, valid: Tensor) -> Tensor:
        """h: [B, Lq, d] queries (the last Lq positions); ctx, session_pos, valid: all L positions."""
        pos = torch.arange(self.n_pos, device=h.device)
        m = ((session_pos.unsqueeze(-1) == pos) & valid.unsqueeze(-1)).to(h.dtype)  # [B,L,P]
        count = m.sum(1)  # [B,P]
        summaries = (m.transpose(1, 2) @ self.ln(ctx)) / count.clamp(min=1.0).unsqueeze(-1)  # [B,P,d]
        keys = torch.cat([self.null.expand(h.shape[0], 1, -1), summaries], 1)  # [B,1+P,d]
        q_pos = session_pos[:, -h.shape[1] :].unsqueeze(-1)
        earlier = (pos > q_pos) & (count > 0).unsqueeze(1)  # [B,Lq,P]
        ok = torch.cat([torch.ones_like(earlier[..., :1]), earlier], -1)
        att = self.q(h) @ self.k(keys).transpose(1, 2) * h.shape[-1] ** -0.5
        long_term = att.masked_fill(~ok, _NEG).softmax(-1) @ self.v(keys)
        return h + torch.sigmoid(self.gate(torch.cat([h, long_term], -1))) * long_term


class InterestTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.item_emb = nn.Embedding(cfg.n_items, d, padding_idx=PAD)
        self.type_emb = nn.Embedding(cfg.n_event_types, d, padding_idx=0)
        self.gap_emb = nn.Embedding(cfg.n_time_gaps, d, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, d)
        self.session_bias = nn.Embedding(cfg.max_session_dist + 1, cfg.n_heads)
        nn.init.zeros_(self.session_bias.weight)
        # Scenarios: 0 pad, 1 none/unknown, 2.. known. `scenario_emb` tells where each event happened; `target_emb`
        # is what a query asks about (0 = any scenario: the general interest). Both start at zero, so a model
        # trained on data without scenarios is exactly the model without them.
        self.scenario_emb = nn.Embedding(2 + cfg.n_scenarios, d, padding_idx=0)
        self.target_emb = nn.Embedding(2 + cfg.n_scenarios, d)
        nn.init.zeros_(self.scenario_emb.weight)
        nn.init.zeros_(self.target_emb.weight)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.fusion = Fusion(cfg) if cfg.use_fusion else None
        self.cold = nn.Parameter(torch.randn(d) * 0.02)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.category_head = nn.Linear(d, cfg.n_categories)
        self.item_bias = nn.Parameter(torch.zeros(cfg.n_items)) if cfg.item_bias else None
        # Genre shares of the history: each category logit gets w_c * (share of history items with genre c).
        self.category_hist_weight = nn.Parameter(torch.zeros(cfg.n_categories)) if cfg.category_history else None
        self.register_buffer("item_categories", torch.zeros(cfg.n_items, cfg.n_categories))  # set by training
        # In-graph item-item scorer, set after training (tuned on validation, see models.train). kNN: the cosine
        # similarity in factored form S = F F^T (F [n_items, rank] = the transposed column-normalized training user
        # x item matrix, exact; or a truncated SVD of it). EASE (the default since it beat kNN on validation,
        # docs/model.md): three buffers. Both: a recency decay and a mixing weight.
        self.register_buffer("item_item_factors", torch.zeros(cfg.n_items, cfg.item_item_rank))
        self.register_buffer("item_item_decay", torch.tensor(0.8))
        self.register_buffer("item_item_weight", torch.tensor(0.0))
        # Short histories lean more on the item-item evidence: weight item_item_weight + item_item_short_weight / n
        # (n = events read), picked on validation histories cut to a few events (models.coldstart; 0 = one weight
        # for every length).
        self.register_buffer("item_item_short_weight", torch.tensor(0.0))
        if cfg.history_scorer == "ease":  # item_item_factors holds X^T, these the rest (models.baselines.ease_factors)
            self.register_buffer("ease_out", torch.zeros(cfg.n_items, cfg.item_item_rank))
            self.register_buffer("ease_self", torch.zeros(cfg.n_items))
        if cfg.ease_neighbours:  # sparse EASE (models.baselines.ease_neighbours): served instead of the factors
            self.register_buffer("neighbour_items", torch.zeros(cfg.n_items, cfg.ease_neighbours, dtype=torch.int32))
            self.register_buffer("neighbour_weights", torch.zeros(cfg.n_items, cfg.ease_neighbours))
        nn.init.normal_(self.item_emb.weight, std=d**-0.5)  # unit-norm rows: logits start at +-scale
        for emb in (self.type_emb, self.gap_emb, self.pos_emb):
            nn.init.normal_(emb.weight, std=0.02)  # small next to the items (default N(0, 1) drowns them)
        with torch.no_grad():
            self.item_emb.weight[PAD].zero_()
            self.type_emb.weight[0].zero_()
            self.gap_emb.weight[0].zero_()
        mask = torch.zeros(cfg.n_items)
        mask[[PAD, OOV]] = float("-inf")
        self.register_buffer("item_mask", mask, persistent=False)
        self.register_buffer("causal", torch.tril(torch.ones(cfg.max_len, cfg.max_len, dtype=torch.bool)), False)
        self.register_buffer("eye", torch.eye(cfg.max_len, dtype=torch.bool), persistent=False)

    def context(
        self, item_ids: Tensor, event_types: Tensor, session_pos: Tensor, time_gaps: Tensor, scenarios: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The history through every block but the last: (ctx [B, L, d], attention mask, valid [B, L])."""
        cfg = self.cfg
        L = item_ids.shape[1]
        valid = item_ids != PAD
        x = self.item_emb(item_ids) + self.type_emb(event_types) + self.pos_emb.weight[-L:]
        x = x + self.scenario_emb(scenarios)
        if cfg.use_time_gaps:
            x = x + self.gap_emb(time_gaps)
        x = self.drop(x * valid.unsqueeze(-1).to(x.dtype))
        # query i may attend key j <= i that is not padding; always itself (no empty rows, no NaN)
        allowed = ((self.causal[:L, :L] & valid.unsqueeze(1)) | self.eye[:L, :L]).unsqueeze(1)  # [B,1,L,L]
        mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(~allowed, _NEG)
        if cfg.use_session_pos:  # one [B, H, L, L] bias per sequence, shared by every block (and the readout's row)
            dist = (session_pos.unsqueeze(1) - session_pos.unsqueeze(2)).clamp(0, cfg.max_session_dist)  # [B,Lq,Lk]
            mask = mask + self.session_bias(dist).permute(0, 3, 1, 2)  # [B,H,L,L]
        for block in self.blocks[:-1]:
            x = block(x, mask)
        return x, mask, valid

    def sequence_interests(
        self,
        item_ids: Tensor,
        event_types: Tensor,
        session_pos: Tensor,
        time_gaps: Tensor,
        scenarios: Tensor,
        target_scenarios: Tensor | None = None,
    ) -> Tensor:
        """[B, L, d] L2-normalized interest after every position (training). `target_scenarios` [B, L]: the
        scenario each position is asked about (0 = any)."""
        ctx, mask, valid = self.context(item_ids, event_types, session_pos, time_gaps, scenarios)
        ask = None if target_scenarios is None else self.target_emb(target_scenarios)
        h = self.ln_f(self.blocks[-1](ctx, mask, ask))
        if self.fusion is not None:
            h = self.fusion(h, ctx, session_pos, valid)
        return F.normalize(h, dim=-1)

    def readout(
        self,
        ctx: Tensor,
        mask: Tensor,
        session_pos: Tensor,
        valid: Tensor,
        target: Tensor | None = None,
        kv: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Inference: the interest [B, d] at the last position (the cold vector for an empty history), asked about
        scenario `target` [B] (None = any), and the readout's attention over the positions [B, L] (0 on padding).
        `kv`: the last block's keys and values of `ctx`, when several readouts share them."""
        ask = None if target is None else self.target_emb(target).unsqueeze(1)
        last = self.blocks[-1]
        h, att = last.readout(ctx, kv or last.keys_values(ctx), mask[..., -1:, :], ask)
        h = self.ln_f(h)
        if self.fusion is not None:
            h = self.fusion(h, ctx, session_pos, valid)
        h = F.normalize(h[:, -1], dim=-1)
        empty = ~valid[:, -1:]
        return torch.where(empty, self.cold_interest().expand_as(h), h), att * valid.to(att.dtype)

    def cold_interest(self) -> Tensor:
        return F.normalize(self.cold, dim=-1)

    def forward(
        self,
        item_ids: Tensor,
        event_types: Tensor,
        session_pos: Tensor,
        time_gaps: Tensor,
        scenarios: Tensor,
        target_scenario: Tensor | None = None,
    ) -> Tensor:
        """Interest [B, d], L2-normalized; the cold vector where the history is empty (last position is PAD)."""
        ctx, mask, valid = self.context(*self.window(item_ids, event_types, session_pos, time_gaps, scenarios))
        return self.readout(ctx, mask, session_pos[:, -ctx.shape[1] :], valid, target_scenario)[0]

    def serve(
        self, item_ids: Tensor, event_types: Tensor, session_pos: Tensor, time_gaps: Tensor, scenarios: Tensor
    ) -> tuple[Tensor, Tensor, list[Tensor]]:
        """What serving needs in one pass: the interest, its attention per position (the explanation, 0 on events
        beyond `serve_len`), and the interest asked about each known scenario (the blocks before the last and the
        last block's keys and values computed once)."""
        ctx, mask, valid = self.context(*self.window(item_ids, event_types, session_pos, time_gaps, scenarios))
        pos, kv = session_pos[:, -ctx.shape[1] :], self.blocks[-1].keys_values(ctx)
        interest, weights = self.readout(ctx, mask, pos, valid, kv=kv)
        per_scenario = [
            self.readout(ctx, mask, pos, valid, torch.full_like(item_ids[:, 0], 2 + s), kv)[0]
            for s in range(self.cfg.n_scenarios)
        ]
        if n := self.cfg.serve_len:  # zeros for the events not read (a slice of the input: static in ONNX)
            weights = torch.cat([torch.zeros_like(item_ids[:, :-n], dtype=weights.dtype), weights], 1)
        return interest, weights, per_scenario

    def window(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        """The newest `serve_len` events of each input (inference only): attention costs grow with the square of
        the length, and the recency positions count back from the newest event, so a shorter window is in-domain."""
        n = self.cfg.serve_len
        return tuple(t[:, -n:] for t in inputs) if n else inputs

    def scale(self) -> Tensor:
        return self.logit_scale.clamp(max=math.log(100.0)).exp()

    def item_logits(self, interest: Tensor) -> Tensor:
        """Scaled dot products with the (tied) item embeddings plus the item bias, all items: the Transformer alone."""
        logits = self.scale() * interest @ self.item_emb.weight.T
        return logits if self.item_bias is None else logits + self.item_bias

    def item_item_scores(self, item_ids: Tensor) -> Tensor:
        """[B, n_items] item-item evidence from the history h (decay^(events back) per event), divided by the row
        maximum (0 when empty). kNN: h S with S = F F^T, an item's similarity to itself left out. EASE: h B, computed
        as (h X^T) ease_out^T + h * ease_self (models.baselines.ease_factors), the same scores as the Ease baseline;
        with `ease_neighbours`, as the sum of the history items' top-N rows of B. h: the newest `serve_len` events.

        Written so the exported graph holds F once: rows are gathered and F multiplies from the left (a constant
        F^T or F * F would be folded into extra copies of the largest initializer)."""
        item_ids = self.window(item_ids)[0]  # decay^k: the newest events carry the evidence
        L = item_ids.shape[1]
        f = self.item_item_factors
        back = torch.arange(L - 1, -1, -1, device=item_ids.device, dtype=f.dtype)
        w = self.item_item_decay.pow(back) * (item_ids != PAD).to(f.dtype)  # [B, L]
        if self.cfg.ease_neighbours:  # the sum of the history items' neighbour rows, decay-weighted
            cols = self.neighbour_items[item_ids].flatten(1).long()  # [B, L * N]
            vals = (self.neighbour_weights[item_ids] * w.unsqueeze(-1)).flatten(1)
            out = torch.zeros(item_ids.shape[0], f.shape[0], dtype=f.dtype, device=f.device).scatter_add(1, cols, vals)
            return out / out.amax(1, keepdim=True).clamp(min=1e-6)
        rows = f[item_ids]  # [B, L, rank]
        user = (rows * w.unsqueeze(-1)).sum(1)  # [B, rank]: the history in factor space
        if self.cfg.history_scorer == "ease":
            h = torch.zeros(item_ids.shape[0], f.shape[0], dtype=f.dtype, device=f.device).scatter_add(1, item_ids, w)
            out = (self.ease_out @ user.T).T + h * self.ease_self
        else:
            self_sim = (rows * rows).sum(-1) * w  # [B, L]: the diagonal of S, per history event
            out = (f @ user.T).T.scatter_add(1, item_ids, -self_sim)
        return out / out.amax(1, keepdim=True).clamp(min=1e-6)

    def item_scores(self, interest: Tensor, item_ids: Tensor) -> Tensor:
        """[B, n_items] next-item scores for the histories `item_ids`: Transformer logits + item_item_weight * the
        item-item (EASE or kNN) evidence; PAD and OOV are -inf."""
        return self.item_logits(interest) + self.history_scores(item_ids)

    def history_scores(self, item_ids: Tensor) -> Tensor:
        """The part of `item_scores` that depends on the history alone (item_item_weight * item-item evidence, PAD and
        OOV -inf): computed once when several interests of one history are scored."""
        if self.cfg.item_item_rank > 0:
            n = (self.window(item_ids)[0] != PAD).sum(1, keepdim=True).clamp(min=1).to(self.item_item_weight.dtype)
            weight = self.item_item_weight + self.item_item_short_weight / n
            return self.item_mask + weight * self.item_item_scores(item_ids)
        return self.item_mask.expand(item_ids.shape[0], -1)

    def history_genre_shares(self, item_ids: Tensor) -> Tensor:
        """[B, L, C] share of the items up to and including each position that carry each genre (causal)."""
        valid = (item_ids != PAD).to(self.item_categories.dtype)
        counts = (self.item_categories[item_ids] * valid.unsqueeze(-1)).cumsum(1)
        return counts / valid.cumsum(1).clamp(min=1.0).unsqueeze(-1)

    def category_logits(self, interest: Tensor, shares: Tensor) -> Tensor:
        """interest [..., d], shares [..., C] (the history's genre shares) -> category logits [..., C]."""
        logits = self.category_head(interest)
        return logits if self.category_hist_weight is None else logits + self.category_hist_weight * shares

    def category_scores(self, interest: Tensor, item_ids: Tensor) -> Tensor:
        """[B, n_categories] in [0, 1]: the estimated share of the coming items that carry each genre (multi-label:
        a movie has several genres). The head, trained on that share, is mixed with the history's own shares: alone
        it ranks genres less accurately and less personally than the history does (docs/model.md)."""
        valid = (item_ids != PAD).to(self.item_categories.dtype)  # the shares at the last position only
        counts = (self.item_categories[item_ids] * valid.unsqueeze(-1)).sum(1)
        shares = counts / valid.sum(1, keepdim=True).clamp(min=1.0)
        head = torch.sigmoid(self.category_logits(interest, shares))
        mix = self.cfg.category_share_mix if self.cfg.category_history else 0.0
        return head if mix == 0 else (1.0 - mix) * head + mix * shares
