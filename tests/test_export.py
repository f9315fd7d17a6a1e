"""`nichelm export --format hf`: transformers loads the folder with no custom code and computes what
nichelm computes (same next-token logits, same greedy outputs); the export loads back into nichelm."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from nichelm.errors import UserError
from tests.conftest import SENTENCES
from tests.test_apply import build_run

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def run(request, tmp_path_factory):
    torch.set_num_threads(1)
    extra = ["model.n_kv_head=2"] if request.param == "llama" else []    # llama with grouped-query attention
    path = build_run(tmp_path_factory.mktemp(request.param), request.param, extra)
    (path / "eval").mkdir()
    per_source = {name: {"n_examples": n, "cer_before": 0.05, "cer_after": cer, "wer_before": 0.2, "wer_after": 0.1,
                         "worse_fraction": 0.0} for name, n, cer in (("bln600", 5, 0.0432), ("icdar", 4, 0.0125))}
    (path / "eval" / "report.json").write_text(json.dumps(
        {"cer_before": 0.05, "cer_after": 0.02, "wer_before": 0.2, "wer_after": 0.1, "n_examples": 9,
         "worse_fraction": 0.1, "per_source": per_source,
         "guard": {"max_change": 0.15, "max_deleted_letters": 4},
         "margin_guard": {"margin": 0.25, "chosen_on": "val", "min_chars_per_token": 1.9, "unfamiliar_share": 0.02,
                          "calibration": {"val": {
             "documents": 7, "per_source": {**per_source, "bln600": {**per_source["bln600"], "cer_after": 0.0398}}}}}}))
    (path / "eval" / "external" / "nl1").mkdir(parents=True)
    (path / "eval" / "external" / "nl1" / "report.json").write_text(json.dumps(
        {"cer_before": 0.3204, "cer_after": 0.3201, "wer_before": 0.5, "wer_after": 0.5, "n_examples": 49,
         "worse_fraction": 0.0204, "data": {"name": "NL1", "format": "icdar"}}))
    return path


@pytest.fixture(scope="module")
def exported(run):
    from nichelm.export import export
    return export(run, "hf")


def prompts_from(folder: Path, n: int = 20) -> list[str]:
    task = json.loads((folder / "task.json").read_text())
    texts = [SENTENCES[i % len(SENTENCES)][: 15 + 3 * i].replace("e", "c", 1) for i in range(n)]
    return [task["prompt_template"].format(input=t) for t in texts]


def test_transformers_loads_the_export_without_custom_code(run, exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model, info = AutoModelForCausalLM.from_pretrained(exported, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    arch = json.loads((exported / "nichelm.json").read_text())["model_config"]["arch"]
    assert type(model).__name__ == {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}[arch]
    tok = AutoTokenizer.from_pretrained(exported)
    task = json.loads((exported / "task.json").read_text())
    assert tok.eos_token == task["end_marker"] == tok.pad_token
    assert model.config.vocab_size == len(tok) == tok.backend_tokenizer.get_vocab_size()
    from nichelm.data.tokenizer import load_tokenizer
    ours = load_tokenizer(run / "tokenizer" / "tokenizer.json")
    for p in prompts_from(exported, 5):
        assert tok(p).input_ids == ours.encode(p).ids
    card = (exported / "README.md").read_text()
    for needle in ("test text licence", "test pairs licence", "### Correction ###", "CER", "2.00%",
                   "Guard margin 0.250 nats/token, chosen on 7 validation documents", "| bln600 | 5 | 5.00% | 4.32% |",
                   "| icdar | 4 | 5.00% | 1.25% |", "| bln600 | 5 | 5.00% | 3.98% |",
                   "| NL1 (icdar) | 49 | 32.04% | 32.01% | 50.00% | 50.00% | 2.0% |",
                   "output changes more than 0.15 of its window or deletes 4 letters or more in one place",
                   "fewer than 1.90 characters per token (all but 2% of the validation documents reach it)"):
        assert needle in card, needle
    assert json.loads((exported / "generation_config.json").read_text())["eos_token_id"] == tok.eos_token_id


def test_logits_and_greedy_outputs_match_nichelm(exported):
    from transformers import AutoModelForCausalLM
    from nichelm import load
    from nichelm.generate import generate
    corrector = load(exported)
    ours = corrector.model
    theirs = AutoModelForCausalLM.from_pretrained(exported).eval()
    prompts = [corrector.tokenizer.encode(p).ids for p in prompts_from(exported)]
    with torch.no_grad():
        for ids in prompts[:5]:
            a, _ = ours(torch.tensor([ids]))
            b = theirs(torch.tensor([ids])).logits
            assert a.shape == b.shape and a.std() > 0.1
            assert (a - b).abs().max().item() < 1e-4
    budgets = [min(30, ours.cfg.block_size - len(p)) for p in prompts]
    gens = generate(ours, prompts, budgets, corrector.end_id, torch.device("cpu"), batch_size=8)
    for ids, budget, g in zip(prompts, budgets, gens):
        out = theirs.generate(torch.tensor([ids]), max_new_tokens=budget, do_sample=False)[0, len(ids):].tolist()
        assert out == g.tokens + ([] if g.hit_limit else [corrector.end_id])


def test_export_loads_back_into_nichelm_with_the_same_outputs(run, exported):
    import nichelm
    texts = [SENTENCES[i].replace("e", "c", 2) for i in range(4)] + ["", "  short  text\n\n" + SENTENCES[0] * 3]
    from_run, from_export = nichelm.load(run, guard_max_change=-1), nichelm.load(exported, guard_max_change=-1)
    ids = torch.tensor([from_run.tokenizer.encode(prompts_from(exported, 1)[0]).ids])
    with torch.no_grad():
        assert torch.equal(from_run.model(ids)[0], from_export.model(ids)[0])
    assert from_run.correct(texts, guard=False) == from_export.correct(texts, guard=False)


def test_export_cli_default_folder_and_errors(run, tmp_path, capsys):
    from nichelm.cli import main
    assert main(["export", str(run.parent / "project.toml"), "--format", "hf"]) == 0
    assert Path(capsys.readouterr().out.strip()) == run / "export" / "hf"
    assert not [p for p in (run / "export").iterdir() if p.name.startswith(".")]   # no staging folders left
    empty = tmp_path / "empty_run"
    shutil.copytree(run, empty, ignore=shutil.ignore_patterns("checkpoints", "export"))
    assert main(["export", str(empty)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no complete checkpoint" in err and "\n" not in err


def test_shapes_without_a_plain_equivalent_are_refused():
    from nichelm.export import hf_config, to_hf
    from nichelm.model import GPT, ModelConfig
    with pytest.raises(UserError, match="qk_norm"):
        hf_config(ModelConfig(arch="llama", qk_norm=True), end_id=0)
    cfg = ModelConfig(arch="gpt2", n_head=4, n_kv_head=2, n_embd=64, n_layer=1)
    with pytest.raises(UserError, match="grouped-query"):
        to_hf(GPT(cfg).state_dict(), cfg)


def test_ct2_export_decodes_like_nichelm(run, exported):
    ctranslate2 = pytest.importorskip("ctranslate2")
    from nichelm import load
    from nichelm.export import export
    from nichelm.generate import generate
    out = export(run, "ct2")
    corrector = load(exported)
    generator = ctranslate2.Generator(str(out), device="cpu", intra_threads=1)
    prompts = [corrector.tokenizer.encode(p).ids for p in prompts_from(out)]
    gens = generate(corrector.model, prompts, [30] * len(prompts), corrector.end_id, torch.device("cpu"))
    tokens = [[corrector.tokenizer.id_to_token(i) for i in p] for p in prompts]
    results = generator.generate_batch(tokens, max_length=30, sampling_topk=1, include_prompt_in_result=False,
                                       end_token=json.loads((out / "task.json").read_text())["end_marker"])
    assert [r.sequences_ids[0] for r in results] == [g.tokens for g in gens]


def _rope_pairs(x, theta):
    """llama.cpp's llama rotary: turns adjacent pairs (x0, x1), (x2, x3), ... of each head."""
    T, D = x.shape[0], x.shape[-1]
    angles = torch.arange(T).float()[:, None] * (1.0 / theta ** (torch.arange(0, D, 2).float() / D))[None]
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)


def ggml_forward(t: dict, cfg, ids: list[int]) -> torch.Tensor:
    """A plain reading of the GGUF tensors the way llama.cpp computes gpt2/llama (no nichelm code)."""
    F = torch.nn.functional
    T, H, KV, D = len(ids), cfg.n_head, cfg.kv_heads, cfg.n_embd // cfg.n_head
    gpt2 = cfg.arch == "gpt2"

    def norm(v, name):
        if gpt2:
            return F.layer_norm(v, (v.shape[-1],), t[name + ".weight"], t[name + ".bias"], 1e-5)
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6) * t[name + ".weight"]

    def lin(v, name):
        return v @ t[name + ".weight"].T + (t[name + ".bias"] if gpt2 else 0)

    x = t["token_embd.weight"][ids] + (t["position_embd.weight"][:T] if gpt2 else 0)
    causal = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
    for i in range(cfg.n_layer):
        b = f"blk.{i}."
        h = norm(x, b + "attn_norm")
        if gpt2:
            q, k, v = lin(h, b + "attn_qkv").view(T, 3, H, D).unbind(1)
        else:
            q = _rope_pairs(lin(h, b + "attn_q").view(T, H, D), cfg.rope_theta)
            k = _rope_pairs(lin(h, b + "attn_k").view(T, KV, D), cfg.rope_theta).repeat_interleave(H // KV, 1)
            v = lin(h, b + "attn_v").view(T, KV, D).repeat_interleave(H // KV, 1)
        att = (torch.einsum("thd,shd->hts", q, k) / D ** 0.5).masked_fill(causal, float("-inf")).softmax(-1)
        x = x + lin(torch.einsum("hts,shd->thd", att, v).reshape(T, -1), b + "attn_output")
        h = norm(x, b + "ffn_norm")
        if gpt2:
            x = x + lin(F.gelu(lin(h, b + "ffn_up"), approximate="tanh"), b + "ffn_down")
        else:
            x = x + lin(F.silu(lin(h, b + "ffn_gate")) * lin(h, b + "ffn_up"), b + "ffn_down")
    return norm(x, "output_norm") @ t["output.weight"].T


def test_gguf_export_follows_llama_cpp_conventions(run, exported):
    gguf = pytest.importorskip("gguf")
    from nichelm import load
    from nichelm.export import export
    out = export(run, "gguf") / "model.gguf"
    reader = gguf.GGUFReader(str(out))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    corrector = load(exported)
    cfg, tok = corrector.model.cfg, corrector.tokenizer
    assert fields["general.architecture"] == cfg.arch
    assert fields[f"{cfg.arch}.block_count"] == cfg.n_layer and fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.tokens"] == [tok.id_to_token(i) for i in range(cfg.vocab_size)]
    assert fields["tokenizer.ggml.eos_token_id"] == corrector.end_id
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    ids = tok.encode(prompts_from(exported, 1)[0]).ids
    with torch.no_grad():
        ours, _ = corrector.model(torch.tensor([ids]))
        assert (ggml_forward(tensors, cfg, ids) - ours[0]).abs().max().item() < 1e-4


def test_llama_cpp_runs_the_gguf_like_nichelm(run, exported):
    """llama.cpp itself (llama-cpp-python, built from the registry's sdist; .ci/run installs it) loads
    the GGUF, tokenizes prompts to the same ids, and decodes greedily to the same outputs."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed "
                                    "(pip install llama-cpp-python builds llama.cpp, ~7 min on 2 cores)")
    import numpy as np

    from nichelm import load
    from nichelm.export import export
    gguf_file = export(run, "gguf") / "model.gguf"
    corrector = load(exported)
    cfg = corrector.model.cfg
    llm = llama_cpp.Llama(model_path=str(gguf_file), n_ctx=cfg.block_size, logits_all=True, verbose=False,
                          n_threads=1)
    for prompt in prompts_from(exported, 6):
        ids = corrector.tokenizer.encode(prompt).ids
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids
        llm.reset()
        llm.eval(ids)
        theirs = np.array(llm.scores[len(ids) - 1])[: cfg.vocab_size]
        with torch.no_grad():
            ours, _ = corrector.model(torch.tensor([ids]))
        assert np.abs(theirs - ours[0, -1].numpy()).max() < 1e-2      # llama.cpp's own f32 kernels
        budget = min(30, cfg.block_size - len(ids))
        got = []
        for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            if token == corrector.end_id or len(got) == budget:
                break
            got.append(token)
        want = corrector.backend.generate([ids], [budget])[0].tokens
        assert got == want
