"""Decoding engines behind a Corrector, all with one interface:

    backend.generate(prompts: list[list[int]], max_new: list[int], sources=None, score=False) -> list[Generation]

Prompts are token ids of the model's own tokenizer; max_new[i] bounds row i's output in tokens,
end marker included (as in nichelm.generate); sources[i], when given, are the tokens row i's output
mostly copies (the input window), which the torch engine drafts from and the others ignore. A
Generation's tokens stop before the end marker; hit_limit is True when no end marker came within
the row's budget. With score=True an engine may also fill each Generation's logprob and
source_logprob (the torch engine does, from the decoding itself: nichelm.generate); the guard
scores by backend.score whatever an engine leaves None.

  torch  nichelm's own engine (nichelm.generate): batched greedy decoding, beam search when beams > 1
  ct2    CTranslate2's Generator (CPU, or CUDA with device cuda) on a conversion of the hf export,
         or on a folder made by `nichelm export --format ct2`; beams map to its beam_size
  vllm   vLLM (GPU only) on the hf export; greedy only

Each engine also scores (the do-no-harm guard, nichelm.inference):

    backend.score(prompts: list[list[int]], continuations: list[list[int]]) -> list[float]

the mean log-probability per token of each continuation (teacher-forced) after its prompt; every
prompt + continuation fits the model's context.

The Corrector around a backend (windows, budgets, guard) is the same for all three, so their
outputs differ only where the engines' arithmetic does.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from nichelm.errors import UserError
from nichelm.generate import SCORE_LOGITS, Generation, beam_search, generate

BACKENDS = ("torch", "ct2", "vllm")
NEEDS_CT2 = "--backend ct2 needs CTranslate2: pip install ctranslate2 (or 'nichelm[export]')"
NEEDS_VLLM = "--backend vllm needs vLLM (GPU only): pip install vllm, on a machine with a GPU"
NEEDS_TRANSFORMERS = ("--backend ct2/vllm exports the model for the engine, which needs transformers: "
                      "pip install transformers (or 'nichelm[export]'), or give a ready export folder")


def finish(tokens, budget: int, end_id: int) -> Generation:
    """A Generation from an engine's raw output: cut to the row's budget, stopped at the end marker."""
    tokens = list(tokens)[:budget]
    if end_id in tokens:
        return Generation(tokens=tokens[:tokens.index(end_id)], hit_limit=False)
    return Generation(tokens=tokens, hit_limit=True)


def length_batches(prompts: list[list[int]], batch_size: int) -> list[list[int]]:
    """Row indices in batches of similar prompt length, as nichelm.generate makes them."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    return [order[i:i + batch_size] for i in range(0, len(order), max(1, batch_size))]




@torch.no_grad()
def score_torch(model, prompts: list[list[int]], continuations: list[list[int]], device,
                batch_size: int) -> list[float]:
    """Mean log-prob per continuation token, from plain causal forwards over prompt + continuation.

    Rows of similar length share a forward, right-padded: attention is causal, so padding after a row's
    last token never changes its scores. Batches are also bounded by SCORE_LOGITS."""
    seqs = [list(p) + list(c) for p, c in zip(prompts, continuations)]
    scores = [0.0] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    vocab, k = model.cfg.vocab_size, 0
    while k < len(order):
        end = k + 1
        while (end < len(order) and end - k < batch_size
               and (end - k + 1) * len(seqs[order[end]]) * vocab <= SCORE_LOGITS):
            end += 1
        rows = order[k:end]
        k = end
        width = len(seqs[rows[-1]])
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width - 1, dtype=torch.bool)        # which targets are continuation
        for r, i in enumerate(rows):
            ids[r, :len(seqs[i])] = torch.tensor(seqs[i])
            mask[r, len(prompts[i]) - 1:len(seqs[i]) - 1] = True
        ids = ids.to(device)
        logits, _ = model(ids[:, :-1])                                     # position t predicts token t + 1
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1).cpu()
        totals = (logp * mask).sum(-1) / mask.sum(-1)
        for r, i in enumerate(rows):
            scores[i] = float(totals[r])
    return scores


class TorchBackend:
    """nichelm's engine on the Corrector's own model. Reads the Corrector's model, step, device,
    batch_size and beams at every call, so changing them on the Corrector takes effect."""
    name = "torch"

    def __init__(self, corrector):
        self.corrector = corrector

    def generate(self, prompts: list[list[int]], max_new: list[int], sources=None,
                 score: bool = False) -> list[Generation]:
        c = self.corrector
        if not prompts:
            return []
        if c.beams > 1:
            return [beam_search(c.model, p, b, c.end_id, c.device, beams=c.beams) for p, b in zip(prompts, max_new)]
        return generate(c.model, prompts, max_new, c.end_id, c.device, c.batch_size, step=c.step,
                        draft_tokens=c.draft_tokens, sources=sources,
                        token_chars=c.token_chars() if c.draft_tokens else None, score=score)

    def score(self, prompts: list[list[int]], continuations: list[list[int]]) -> list[float]:
        c = self.corrector
        return score_torch(c.model, prompts, continuations, c.device, c.batch_size)


class CT2Backend:
    """CTranslate2's Generator, fed token strings (its vocabulary is the tokenizer's), one length-sorted
    batch at a time with max_length = the batch's largest budget; each row is then cut to its own."""
    name = "ct2"

    def __init__(self, ct2_dir: Path, tokenizer, end_id: int, device: str = "cpu", batch_size: int = 64,
                 beams: int = 1):
        ctranslate2 = _require("ctranslate2", NEEDS_CT2)
        dev = torch.device(device)
        if dev.type not in ("cpu", "cuda"):
            raise UserError(f"--device {device}: --backend ct2 runs on cpu or cuda")
        self.generator = ctranslate2.Generator(str(ct2_dir), device=dev.type, device_index=dev.index or 0,
                                               intra_threads=torch.get_num_threads() if dev.type == "cpu" else 0)
        self.vocab = [tokenizer.id_to_token(i) for i in range(tokenizer.get_vocab_size())]
        self.end_id, self.batch_size, self.beams = end_id, batch_size, beams

    def generate(self, prompts: list[list[int]], max_new: list[int], sources=None,
                 score: bool = False) -> list[Generation]:
        results: list[Generation | None] = [None] * len(prompts)
        for idx in length_batches(prompts, self.batch_size):
            out = self.generator.generate_batch(
                [[self.vocab[t] for t in prompts[i]] for i in idx], max_length=max(max_new[i] for i in idx),
                beam_size=self.beams, sampling_topk=1, end_token=self.vocab[self.end_id], return_end_token=True,
                include_prompt_in_result=False)
            for r, i in zip(out, idx):
                results[i] = finish(r.sequences_ids[0], max_new[i], self.end_id)
        return results

    def score(self, prompts: list[list[int]], continuations: list[list[int]]) -> list[float]:
        """score_batch gives the log-prob of every token after the first; the continuation's are the
        last len(continuation) of them."""
        seqs = [[self.vocab[t] for t in list(p) + list(c)] for p, c in zip(prompts, continuations)]
        if not seqs:
            return []
        out = self.generator.score_batch(seqs, max_batch_size=self.batch_size, max_input_length=0)
        return [sum(r.log_probs[-len(c):]) / len(c) for r, c in zip(out, continuations)]


class VLLMBackend:
    """vLLM's LLM on an hf export: token-id prompts, greedy, a SamplingParams per row for its budget."""
    name = "vllm"

    def __init__(self, hf_dir: Path, end_id: int, beams: int = 1, keep=None, **llm_kwargs):
        vllm = _require("vllm", NEEDS_VLLM)
        _greedy_only(beams)
        self.sampling_params = vllm.SamplingParams
        self.llm = vllm.LLM(model=str(hf_dir), tokenizer=str(hf_dir), **llm_kwargs)
        self.end_id = end_id
        self.keep = keep                  # a TemporaryDirectory holding hf_dir: removed with the backend

    def generate(self, prompts: list[list[int]], max_new: list[int], sources=None,
                 score: bool = False) -> list[Generation]:
        if not prompts:
            return []
        params = [self.sampling_params(temperature=0.0, max_tokens=b, stop_token_ids=[self.end_id]) for b in max_new]
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        results = []
        for out, budget in zip(outputs, max_new):
            c = out.outputs[0]
            tokens = list(c.token_ids)
            if c.finish_reason == "stop" and self.end_id not in tokens:
                tokens.append(self.end_id)        # stopped by the end marker but left it out of token_ids
            results.append(finish(tokens, budget, self.end_id))
        return results

    def score(self, prompts: list[list[int]], continuations: list[list[int]]) -> list[float]:
        """prompt_logprobs of prompt + continuation fed as one prompt (one token generated, unused):
        entry t holds the log-prob of token t (with prompt_logprobs=0, the token itself only)."""
        if not prompts:
            return []
        seqs = [list(p) + list(c) for p, c in zip(prompts, continuations)]
        params = self.sampling_params(temperature=0.0, max_tokens=1, prompt_logprobs=0)
        outputs = self.llm.generate([{"prompt_token_ids": s} for s in seqs], params, use_tqdm=False)
        scores = []
        for out, seq, c in zip(outputs, seqs, continuations):
            lps = out.prompt_logprobs
            scores.append(sum(lps[t][seq[t]].logprob for t in range(len(seq) - len(c), len(seq))) / len(c))
        return scores


def _greedy_only(beams: int) -> None:
    if beams > 1:
        raise UserError(f"beams = {beams}: --backend vllm decodes greedily only; use beams = 1, or "
                        "--backend torch or ct2 for beam search")


def _require(module: str, message: str):
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(message) from None


def open_backend(name: str, model, corrector, device: str = "cpu"):
    """The engine `name` for a model (an artifacts.Source, or the path of a run, project file, hf export
    or, for ct2, a ct2 export).

    torch decodes the Corrector's own model. ct2 and vllm load their own copy of the weights: from the
    folder itself when it is an export they read, else from an hf export (and, for ct2, its conversion)
    made in a temporary folder, removed once CTranslate2 has loaded it, or with the vLLM backend."""
    if name not in BACKENDS:
        raise UserError(f"--backend {name!r}: use one of {', '.join(BACKENDS)}")
    if name == "torch":
        return TorchBackend(corrector)
    if name == "ct2":
        _require("ctranslate2", NEEDS_CT2)
        source = _source(model)
        if source.kind == "ct2":
            return CT2Backend(source.path, corrector.tokenizer, corrector.end_id, device, corrector.batch_size,
                              corrector.beams)
        _require("transformers", NEEDS_TRANSFORMERS)          # CTranslate2's converter reads the hf export
        from nichelm.export import hf_to_ct2
        with tempfile.TemporaryDirectory(prefix="nichelm-ct2-") as tmp:
            ct2_dir = hf_to_ct2(_hf_folder(source, Path(tmp) / "hf"), Path(tmp) / "ct2")
            return CT2Backend(ct2_dir, corrector.tokenizer, corrector.end_id, device, corrector.batch_size,
                              corrector.beams)
    _require("vllm", NEEDS_VLLM)
    _greedy_only(corrector.beams)                            # before any export work
    source = _source(model)
    if source.kind == "hf":
        return VLLMBackend(source.path, corrector.end_id, corrector.beams)
    tmp = tempfile.TemporaryDirectory(prefix="nichelm-vllm-")
    return VLLMBackend(_hf_folder(source, Path(tmp.name) / "hf"), corrector.end_id, corrector.beams, keep=tmp)


def _source(model):
    from nichelm.artifacts import Source, open_model
    return model if isinstance(model, Source) else open_model(model)


def _hf_folder(source, out: Path) -> Path:
    """The hf export an engine loads: the folder itself, or a fresh export of the run's newest checkpoint."""
    if source.kind == "hf":
        return source.path
    from nichelm.export import export_hf
    _require("transformers", NEEDS_TRANSFORMERS)
    return export_hf(source.run_model(), out)
