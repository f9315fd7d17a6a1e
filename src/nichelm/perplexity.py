"""Specialized perplexity: a model's token-level perplexity on held-out plain text.

The paper's metric ("Need a Small Specialized Language Model? Plan Early!"): the mean negative
log-likelihood per token of held-out specialist text, exponentiated, per domain and macro-averaged
(exp of the mean of the domains' mean NLLs), so a big domain does not drown the small ones.

The model was trained on task examples (prompt markers), so plain text is encoded plainly with
`encode_text` (a marker quoted in the text stays text) and the first token is predicted from the
end marker alone: the token every training example ends with, so it stands where a document
begins. Long texts are scored with sliding windows of the model's context (block_size) moving
half a context at a time: every token is scored once, with at least half a context before it
(after the first window).

Token perplexities of models with different tokenizers do not compare (each nichelm run trains its
own); `bits_per_byte` (total NLL in bits over the UTF-8 bytes of the text) does, and is reported too.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import torch

from nichelm.data.tokenizer import encode_texts


def windows(ids: list[int], block: int) -> list[tuple[list[int], list[int], int]]:
    """(input ids, target ids, how many of the last targets to score) covering ids[1:] once, with
    windows of `block` tokens moving by block // 2 (ids[0] is the context the first token is read after)."""
    stride = max(1, block // 2)
    n = len(ids) - 1                         # tokens to score
    out, done, begin = [], 0, 0
    while done < n:
        end = min(begin + block, n)
        out.append((ids[begin:end], ids[begin + 1:end + 1], end - done))
        done = end
        begin += stride
    return out


@torch.inference_mode()
def text_nll(model, tokenizer, texts: list[str], first_id: int, device: str = "cpu",
             batch_size: int = 16) -> list[tuple[float, int]]:
    """(summed NLL in nats, tokens scored) of each text under `model`."""
    model.eval()
    block = model.cfg.block_size
    rows = []                                # (text index, input, target, scored)
    for t, ids in enumerate(encode_texts(tokenizer, texts)):
        for inp, tgt, scored in windows([first_id, *ids], block):
            rows.append((t, inp, tgt, scored))
    nll, count = [0.0] * len(texts), [0] * len(texts)
    for i in range(0, len(rows), batch_size):
        part = rows[i:i + batch_size]
        width = max(len(r[1]) for r in part)
        inp = torch.zeros(len(part), width, dtype=torch.long)
        tgt = torch.zeros(len(part), width, dtype=torch.long)
        mask = torch.zeros(len(part), width, dtype=torch.bool)
        for j, (_, x, y, scored) in enumerate(part):
            inp[j, :len(x)] = torch.tensor(x)
            tgt[j, :len(y)] = torch.tensor(y)
            mask[j, len(y) - scored:len(y)] = True
        # logits over the real vocabulary only (the model pads it to a multiple of 128: no padded id is text)
        logits, _ = model(inp.to(device))
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, tgt.to(device)[..., None])[..., 0]
        loss = (-logp * mask.to(device)).double().cpu()
        for j, (t, _, _, scored) in enumerate(part):
            nll[t] += float(loss[j].sum())
            count[t] += scored
    return list(zip(nll, count))


def perplexity_report(model, tokenizer, groups: dict[str, list[str]], first_id: int, device: str = "cpu",
                      batch_size: int = 16) -> dict:
    """Per group (domain or source): documents, tokens, mean NLL, perplexity, bits per byte; then the
    macro average (exp of the mean of the groups' mean NLLs) and the micro one (all tokens pooled)."""
    per_group, total_nll, total_tokens, total_bytes = {}, 0.0, 0, 0
    for name, texts in sorted(groups.items()):
        scores = text_nll(model, tokenizer, texts, first_id, device, batch_size)
        nll = sum(s for s, _ in scores)
        tokens = sum(n for _, n in scores)
        n_bytes = sum(len(t.encode("utf-8", "replace")) for t in texts)
        if not tokens:
            continue
        per_group[name] = {"documents": len(texts), "tokens": tokens, "bytes": n_bytes, "nll": nll / tokens,
                           "perplexity": math.exp(nll / tokens), "bits_per_byte": nll / math.log(2) / n_bytes}
        total_nll, total_tokens, total_bytes = total_nll + nll, total_tokens + tokens, total_bytes + n_bytes
    if not per_group:
        return {"groups": {}, "documents": 0, "tokens": 0}
    mean_nll = sum(g["nll"] for g in per_group.values()) / len(per_group)
    return {
        "groups": per_group,
        "documents": sum(g["documents"] for g in per_group.values()),
        "tokens": total_tokens,
        "macro_perplexity": math.exp(mean_nll),
        "micro_perplexity": math.exp(total_nll / total_tokens),
        "bits_per_byte": total_nll / math.log(2) / total_bytes,
        "context": "sliding windows of block_size tokens, stride block_size // 2; first token read after the "
                   "end marker; text encoded plainly (markers in it stay text)",
    }


def group_texts(records: Iterable, max_docs: int = 0) -> dict[str, list[str]]:
    """Texts by the record's domain, else its source name (selection.records.Record)."""
    groups = defaultdict(list)
    for n, rec in enumerate(records, 1):
        groups[rec.domain or rec.source].append(rec.text)
        if max_docs and n >= max_docs:
            break
    return dict(groups)


def load_model(path: Path, device: str = "cpu"):
    """(model, tokenizer, end marker id) of a run directory, project file or hf export."""
    from nichelm.inference import load_corrector
    corrector = load_corrector(Path(path), device=device)
    return corrector.model, corrector.tokenizer, corrector.end_id
