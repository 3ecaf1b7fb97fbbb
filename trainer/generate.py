"""Captions from a CoCa model without ``transformers``.

open_clip's ``CoCa.generate`` imports Hugging Face ``transformers`` for its logits processors, so a
captioner trained here (``loss.kind: coca``) could not caption anything on a machine without it.
This is the small part of it a captioner needs: greedy decoding and beam search over the model's
own forward (``image_latent`` / ``image_embs`` computed once), with a minimum length (no end token
before it) and a length penalty; and nucleus (top-p) sampling, each image drawing from its own
seeded ``torch.Generator`` so a caption never depends on the batch it is in. Token ids follow open_clip's SimpleTokenizer: start 49406, end
49407, pad 0.

    tokens = generate(model, images, num_beams=3)          # [B, L] ids, start first
    texts = decode(tokens)                                  # plain strings
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    tokens = generate(model, images, top_p=0.9, generators=gens)  # sampled (MobileCLIP's captions)
"""
from __future__ import annotations

import open_clip
import torch
import torch.nn.functional as F

SOT, EOT, PAD = 49406, 49407, 0


def _next_logprobs(model, seqs, latent, embs, min_len: int) -> torch.Tensor:
    # The image's latent and token embeddings are given, so CoCa's forward never reads the image.
    logits = model(None, seqs, image_latent=latent, image_embs=embs, output_labels=False)["logits"][:, -1]
    logp = F.log_softmax(logits.float(), dim=-1)
    if seqs.shape[1] < min_len:  # the start token counts, as in open_clip's MinLengthLogitsProcessor
        logp[:, EOT] = float("-inf")
    return logp


@torch.no_grad()
def generate(model, images: torch.Tensor, *, max_len: int = 30, min_len: int = 5, num_beams: int = 1,
             length_penalty: float = 1.0, top_p: float | None = None, temperature: float = 1.0,
             generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """Token ids [B, L] (start token first; after the end token, pad) for each image.
    ``num_beams`` 1 is greedy decoding. Beam search ranks finished captions by their summed log
    probability divided by ``length ** length_penalty`` (0: raw sums, which favour short ones).
    ``max_len`` counts the start and end tokens and must fit the model's text context.
    ``top_p`` samples instead: each step draws from the smallest set of tokens whose probability
    (at ``temperature``) reaches ``top_p``, image i with ``generators[i]`` (CPU generators)."""
    model = getattr(model, "module", model)
    if not hasattr(model, "text_decoder"):
        raise ValueError(f"{type(model).__name__} has no text decoder: captions need a CoCa model")
    if not 1 < min_len < max_len:
        raise ValueError(f"need 1 < min_len < max_len, got {min_len}, {max_len}")
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if top_p is not None and not (0 < top_p <= 1 and temperature > 0 and generators is not None
                                  and len(generators) == images.shape[0]):
        raise ValueError("top_p sampling needs 0 < top_p <= 1, temperature > 0 and one generator per image")
    was_training = model.training
    model.eval()
    # Only the last position's logits are read: cut the decoder's output to it before the vocabulary
    # projection, which would otherwise cost [rows, length, vocab] every step.
    last_only = model.text_decoder.ln_final.register_forward_hook(lambda mod, args, out: out[:, -1:])
    try:
        latent, embs = model._encode_image(images)
        if top_p is not None:
            return _sample(model, latent, embs, max_len, min_len, top_p, temperature, generators)
        if num_beams == 1:
            return _greedy(model, latent, embs, max_len, min_len)
        return _beam(model, latent, embs, max_len, min_len, num_beams, length_penalty)
    finally:
        last_only.remove()
        model.train(was_training)


def _greedy(model, latent, embs, max_len, min_len) -> torch.Tensor:
    seqs = torch.full((latent.shape[0], 1), SOT, dtype=torch.long, device=latent.device)
    done = torch.zeros(latent.shape[0], dtype=torch.bool, device=latent.device)
    while seqs.shape[1] < max_len and not done.all():
        logp = _next_logprobs(model, seqs, latent, embs, min_len)
        nxt = logp.argmax(-1)
        if seqs.shape[1] == max_len - 1:
            nxt = torch.full_like(nxt, EOT)  # out of room: end here
        nxt = torch.where(done, torch.full_like(nxt, PAD), nxt)
        seqs = torch.cat([seqs, nxt[:, None]], 1)
        done |= nxt == EOT
    return seqs


def _sample(model, latent, embs, max_len, min_len, top_p, temperature, generators) -> torch.Tensor:
    seqs = torch.full((latent.shape[0], 1), SOT, dtype=torch.long, device=latent.device)
    done = torch.zeros(latent.shape[0], dtype=torch.bool, device=latent.device)
    while seqs.shape[1] < max_len and not done.all():
        logp = _next_logprobs(model, seqs, latent, embs, min_len)
        probs = torch.softmax(logp / temperature, dim=-1).cpu()
        # one uniform draw per image from its own generator: the batch never changes a caption
        u = torch.cat([torch.rand(1, generator=g) for g in generators])
        nxt = _nucleus(probs, u, top_p).to(latent.device)
        if seqs.shape[1] == max_len - 1:
            nxt = torch.full_like(nxt, EOT)
        nxt = torch.where(done, torch.full_like(nxt, PAD), nxt)
        seqs = torch.cat([seqs, nxt[:, None]], 1)
        done |= nxt == EOT
    return seqs


_NUCLEUS_FIRST = 256  # tokens looked at before sorting the whole vocabulary


def _nucleus(probs: torch.Tensor, u: torch.Tensor, top_p: float) -> torch.Tensor:
    """The token at quantile ``u`` of each row's nucleus (the smallest set of most likely tokens
    whose probability reaches ``top_p``). The nucleus is a prefix of the sorted row, so a row whose
    top 256 tokens already reach ``top_p`` needs no full sort; the answer is the same."""
    out = torch.empty(probs.shape[0], dtype=torch.long)
    vals, idx = probs.topk(min(_NUCLEUS_FIRST, probs.shape[1]), dim=-1)
    short = vals.sum(-1) >= top_p
    if short.any():
        out[short] = _pick(vals[short], idx[short], u[short], top_p)
    if not short.all():
        rest = ~short
        vals, idx = probs[rest].sort(dim=-1, descending=True)
        out[rest] = _pick(vals, idx, u[rest], top_p)
    return out


def _pick(sorted_p: torch.Tensor, order: torch.Tensor, u: torch.Tensor, top_p: float) -> torch.Tensor:
    cum = sorted_p.cumsum(-1)
    kept = torch.where(cum - sorted_p < top_p, sorted_p, torch.zeros_like(sorted_p))
    cum = kept.cumsum(-1)
    pick = torch.searchsorted(cum, (u * cum[:, -1])[:, None]).clamp(max=cum.shape[1] - 1)
    return order.gather(1, pick)[:, 0]


def _beam(model, latent, embs, max_len, min_len, k, length_penalty) -> torch.Tensor:
    b, dev = latent.shape[0], latent.device
    # beams of one image are adjacent rows
    latent_k, embs_k = latent.repeat_interleave(k, 0), embs.repeat_interleave(k, 0)
    seqs = torch.full((b * k, 1), SOT, dtype=torch.long, device=dev)
    scores = torch.full((b, k), float("-inf"), device=dev)
    scores[:, 0] = 0.0  # all beams start equal: expand only the first
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(b)]
    while seqs.shape[1] < max_len:
        logp = _next_logprobs(model, seqs, latent_k, embs_k, min_len)
        if seqs.shape[1] == max_len - 1:  # out of room: every beam ends here
            logp = torch.where(torch.arange(logp.shape[1], device=dev) == EOT, logp, torch.full_like(logp, float("-inf")))
        vocab = logp.shape[1]
        cand = (scores.reshape(-1, 1) + logp).reshape(b, k * vocab)
        top_scores, top_idx = cand.topk(2 * k, dim=1)
        keep_rows, keep_tok, keep_score = [], [], []
        for i in range(b):
            live = 0
            for s, idx in zip(top_scores[i].tolist(), top_idx[i].tolist()):
                if s == float("-inf"):
                    break
                beam, tok = divmod(idx, vocab)
                row = i * k + beam
                if tok == EOT:
                    length = seqs.shape[1]  # tokens after the start, the end token included
                    finished[i].append((s / length ** length_penalty, seqs[row, 1:].tolist() + [EOT]))
                    continue
                if live < k:
                    keep_rows.append(row)
                    keep_tok.append(tok)
                    keep_score.append(s)
                    live += 1
            for _ in range(k - live):  # fewer live candidates than beams: dead beams
                keep_rows.append(i * k)
                keep_tok.append(PAD)
                keep_score.append(float("-inf"))
        seqs = torch.cat([seqs[keep_rows], torch.tensor(keep_tok, device=dev)[:, None]], 1)
        scores = torch.tensor(keep_score, device=dev).reshape(b, k)
        if all(len(f) >= k and max(sc for sc, _ in f) >= scores[i].max().item() / seqs.shape[1] ** length_penalty
               for i, f in enumerate(finished)):
            break
    best = [max(f, key=lambda x: x[0])[1] for f in finished]
    width = 1 + max(len(t) for t in best)
    out = torch.full((b, width), PAD, dtype=torch.long, device=dev)
    out[:, 0] = SOT
    for i, toks in enumerate(best):
        out[i, 1:1 + len(toks)] = torch.tensor(toks, device=dev)
    return out


def decode(tokens: torch.Tensor) -> list[str]:
    """Strings from ``generate``'s ids: the text between the start and the first end token."""
    out = []
    for row in tokens.tolist():
        row = row[1:] if row and row[0] == SOT else row
        row = row[:row.index(EOT)] if EOT in row else row
        out.append(open_clip.decode(torch.tensor([t for t in row if t != PAD])).strip())
    return out
