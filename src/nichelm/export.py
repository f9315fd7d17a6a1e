"""`nichelm export`: a trained run -> a folder other tools load without nichelm.

  hf    RUN/export/hf/: config.json + model.safetensors (GPT2LMHeadModel or LlamaForCausalLM),
        tokenizer.json + tokenizer_config.json (PreTrainedTokenizerFast), generation_config.json,
        task.json (prompt template and end marker), nichelm.json, README.md (model card)
  gguf  RUN/export/gguf/model.gguf: llama.cpp's tensor names and metadata (f32)
  ct2   RUN/export/ct2/: CTranslate2's converter run on the hf export, plus task.json and nichelm.json
        (so `nichelm apply --backend ct2` and ``load(..., backend="ct2")`` take the folder as it is)

Weights come from the newest complete checkpoint. Our model pads its vocabulary to a
multiple of 128; exports carry only the tokenizer's rows. Configs are built here, never
fetched from a hub, so an export works offline.

An hf export is also a nichelm model: ``load_corrector`` maps its safetensors back onto our
GPT (the exact inverse of the export mapping), so `nichelm apply` and ``nichelm.load`` run
an export with the same engine and the same outputs as the run it came from. Keeping one
copy of the weights (not a second native copy) keeps the folder small and makes any
mapping error show up in nichelm's own tests rather than only in other tools.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from nichelm.checkpoint import latest_checkpoint, load_model_weights
from nichelm.errors import UserError
from nichelm.io import atomic_write_json, atomic_write_text, fsync_tree, replace_dir, staging_dir
from nichelm.model import GPT, ModelConfig

FORMATS = ("hf", "gguf", "ct2")
NICHELM_JSON = "nichelm.json"          # marks a folder as a nichelm hf export; holds our model config
EXPORT_VERSION = 1


# ---------------------------------------------------------------- the run

@dataclass
class RunModel:
    """What every export needs from a run: config, weights, tokenizer, task and provenance."""
    run: Path
    checkpoint: Path
    cfg: ModelConfig
    state: dict                    # our parameter names -> tensors (padded vocabulary)
    task: dict
    trainer: dict

    @property
    def tokenizer_path(self) -> Path:
        return self.run / "tokenizer" / "tokenizer.json"

    def end_id(self) -> int:
        from nichelm.data.tokenizer import load_tokenizer
        end = load_tokenizer(self.tokenizer_path).token_to_id(self.task["end_marker"])
        if end is None:
            raise UserError(f"{self.tokenizer_path}: end marker {self.task['end_marker']!r} is not a token; "
                            "re-run `nichelm prepare --force`")
        return end


def run_dir(path: str | Path, overrides: list[str] = ()) -> Path:
    """A run directory, or a project file that names one (with its --set overrides)."""
    path = Path(path)
    if path.is_dir():
        return path
    from nichelm.config import load_project
    return load_project(path, overrides).run_path


def load_run(run: Path) -> RunModel:
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise UserError(f"{run}: no complete checkpoint; run `nichelm train` first")
    for need in (run / "task.json", run / "tokenizer" / "tokenizer.json"):
        if not need.is_file():
            raise UserError(f"{need}: missing; run `nichelm prepare` for this project")
    trainer = json.loads((ckpt / "trainer.json").read_text())
    cfg = ModelConfig(**trainer["model_config"])
    model = GPT(cfg)
    load_model_weights(model, ckpt / "model.safetensors")
    from nichelm.inference import run_task
    task = run_task(run, ckpt)       # with the guard margin `nichelm evaluate` chose: every export's task.json has it
    return RunModel(run, ckpt, cfg, dict(model.state_dict()), task, trainer)


# ---------------------------------------------------------------- the weight mapping

def check_exportable(cfg: ModelConfig) -> None:
    """Refuse shapes that plain GPT-2 / Llama cannot express, rather than export a wrong model."""
    if cfg.qk_norm:
        raise UserError("model.qk_norm = true has no plain GPT-2/Llama equivalent; train with qk_norm = false "
                        "to export")
    if cfg.arch == "gpt2" and cfg.kv_heads != cfg.n_head:
        raise UserError(f"arch gpt2 with n_kv_head={cfg.n_kv_head} (grouped-query attention) has no GPT-2 "
                        "equivalent; use arch llama or n_kv_head = 0")


def mlp_hidden(cfg: ModelConfig) -> int:
    if cfg.arch == "gpt2":
        return int(cfg.mlp_ratio * cfg.n_embd)
    hidden = int(2 * cfg.mlp_ratio * cfg.n_embd / 3)
    return ((hidden + 63) // 64) * 64


def hf_config(cfg: ModelConfig, end_id: int):
    """A transformers config built from ours (nothing fetched): GPT2Config or LlamaConfig."""
    check_exportable(cfg)
    ids = dict(bos_token_id=None, eos_token_id=end_id, pad_token_id=end_id)
    try:
        from transformers import GPT2Config, LlamaConfig
    except ImportError:
        raise UserError("export --format hf (and ct2, made from it) needs transformers: "
                        "pip install 'nichelm[export]'") from None
    if cfg.arch == "gpt2":
        return GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                          n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=mlp_hidden(cfg),
                          activation_function="gelu_new", layer_norm_epsilon=1e-5, resid_pdrop=0.0,
                          embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
                          architectures=["GPT2LMHeadModel"], **ids)
    return LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=mlp_hidden(cfg),
                       num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                       num_key_value_heads=cfg.kv_heads, head_dim=cfg.n_embd // cfg.n_head,
                       max_position_embeddings=cfg.block_size, rms_norm_eps=1e-6, hidden_act="silu",
                       rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                       tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
                       architectures=["LlamaForCausalLM"], **ids)


def _add_legacy_keys(path: Path, cfg: ModelConfig) -> None:
    """Older transformers (and converters built on them) read rope_theta at the top level."""
    if cfg.arch == "llama":
        data = json.loads(path.read_text())
        data.setdefault("rope_theta", cfg.rope_theta)
        atomic_write_json(path, data)


def _qkv_sizes(cfg: ModelConfig) -> list[int]:
    head_dim = cfg.n_embd // cfg.n_head
    return [cfg.n_head * head_dim, cfg.kv_heads * head_dim, cfg.kv_heads * head_dim]


# Our block parameter names -> GPT2LMHeadModel's, and whether HF's Conv1D stores the matrix transposed.
GPT2_LAYER_NAMES = (("norm1", "ln_1", False), ("attn.qkv", "attn.c_attn", True), ("attn.proj", "attn.c_proj", True),
                    ("norm2", "ln_2", False), ("mlp.up", "mlp.c_fc", True), ("mlp.down", "mlp.c_proj", True))


def to_hf(state: dict, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our parameters -> transformers names and layouts, vocabulary rows cut to the tokenizer's size.

    GPT-2: HF uses Conv1D (weight is (in, out)), so every linear weight is transposed; c_attn
    is our fused qkv as it is. Llama: the fused qkv and gate_up rows are split; our rotary
    already rotates the two halves of each head (HF's rotate_half), so q/k need no permutation.
    """
    check_exportable(cfg)
    V, out = cfg.vocab_size, {}
    if cfg.arch == "gpt2":
        out["transformer.wte.weight"] = state["wte.weight"][:V]
        out["transformer.wpe.weight"] = state["wpe.weight"]
        for i in range(cfg.n_layer):
            s, h = f"blocks.{i}.", f"transformer.h.{i}."
            for ours, theirs, transpose in GPT2_LAYER_NAMES:
                w = state[s + ours + ".weight"]
                out[h + theirs + ".weight"] = w.t() if transpose else w
                out[h + theirs + ".bias"] = state[s + ours + ".bias"]
        out["transformer.ln_f.weight"] = state["norm_f.weight"]
        out["transformer.ln_f.bias"] = state["norm_f.bias"]
    else:
        out["model.embed_tokens.weight"] = state["wte.weight"][:V]
        for i in range(cfg.n_layer):
            s, h = f"blocks.{i}.", f"model.layers.{i}."
            q, k, v = state[s + "attn.qkv.weight"].split(_qkv_sizes(cfg), dim=0)
            gate, up = state[s + "mlp.gate_up.weight"].chunk(2, dim=0)
            out.update({
                h + "input_layernorm.weight": state[s + "norm1.weight"],
                h + "self_attn.q_proj.weight": q, h + "self_attn.k_proj.weight": k,
                h + "self_attn.v_proj.weight": v, h + "self_attn.o_proj.weight": state[s + "attn.proj.weight"],
                h + "post_attention_layernorm.weight": state[s + "norm2.weight"],
                h + "mlp.gate_proj.weight": gate, h + "mlp.up_proj.weight": up,
                h + "mlp.down_proj.weight": state[s + "mlp.down.weight"],
            })
        out["model.norm.weight"] = state["norm_f.weight"]
        out["lm_head.weight"] = state["lm_head.weight"][:V]
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}


def _pad_rows(w: torch.Tensor, rows: int) -> torch.Tensor:
    """Zero rows for the padding tokens: never an input, and their logits are cut off."""
    return torch.cat([w, w.new_zeros(rows - w.shape[0], *w.shape[1:])]) if rows > w.shape[0] else w


def from_hf(tensors: dict, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse of ``to_hf``: transformers names -> our parameters (vocabulary padded again)."""
    P, out = cfg.padded_vocab_size, {}
    if cfg.arch == "gpt2":
        out["wte.weight"] = _pad_rows(tensors["transformer.wte.weight"], P)
        out["wpe.weight"] = tensors["transformer.wpe.weight"]
        for i in range(cfg.n_layer):
            s, h = f"blocks.{i}.", f"transformer.h.{i}."
            for ours, theirs, transpose in GPT2_LAYER_NAMES:
                w = tensors[h + theirs + ".weight"]
                out[s + ours + ".weight"] = w.t() if transpose else w
                out[s + ours + ".bias"] = tensors[h + theirs + ".bias"]
        out["norm_f.weight"] = tensors["transformer.ln_f.weight"]
        out["norm_f.bias"] = tensors["transformer.ln_f.bias"]
        out["lm_head.weight"] = out["wte.weight"]
    else:
        out["wte.weight"] = _pad_rows(tensors["model.embed_tokens.weight"], P)
        for i in range(cfg.n_layer):
            s, h = f"blocks.{i}.", f"model.layers.{i}."
            out[s + "norm1.weight"] = tensors[h + "input_layernorm.weight"]
            out[s + "attn.qkv.weight"] = torch.cat([tensors[h + f"self_attn.{x}_proj.weight"] for x in "qkv"])
            out[s + "attn.proj.weight"] = tensors[h + "self_attn.o_proj.weight"]
            out[s + "norm2.weight"] = tensors[h + "post_attention_layernorm.weight"]
            out[s + "mlp.gate_up.weight"] = torch.cat([tensors[h + "mlp.gate_proj.weight"],
                                                       tensors[h + "mlp.up_proj.weight"]])
            out[s + "mlp.down.weight"] = tensors[h + "mlp.down_proj.weight"]
        out["norm_f.weight"] = tensors["model.norm.weight"]
        out["lm_head.weight"] = _pad_rows(tensors["lm_head.weight"], P)
    return {k: v.contiguous() for k, v in out.items()}


# ---------------------------------------------------------------- writing folders

def _replace_dir(tmp: Path, out: Path) -> None:
    """Swap a finished folder into place, durably, so a reader never sees half an export."""
    fsync_tree(tmp)
    replace_dir(tmp, out)


def _staging(out: Path) -> Path:
    return staging_dir(out.parent, f".{out.name}.tmp-")


def tokenizer_config(task: dict, block_size: int) -> dict:
    """For PreTrainedTokenizerFast: the end marker ends and pads; prompts are left-padded for batching."""
    end = task["end_marker"]
    return {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": end, "pad_token": end,
            "bos_token": None, "unk_token": None, "add_bos_token": False, "add_eos_token": False,
            "model_max_length": block_size, "padding_side": "left", "clean_up_tokenization_spaces": False}


def generation_config(end_id: int) -> dict:
    """Greedy, stopping at the end marker. No max_length: callers bound max_new_tokens by the input."""
    return {"eos_token_id": end_id, "pad_token_id": end_id, "do_sample": False, "num_beams": 1}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def task_json(task: dict) -> dict:
    """An export's task.json: the run's task, plus how user text must be encoded: with special tokens
    split (as plain text), the markers added by id, so a marker quoted in the text stays text."""
    return {**task, "user_text_encoding": "split_special_tokens"}


def model_card(rm: RunModel) -> str:
    """README.md: what the model does, how to prompt it, how well it did, and what it was trained on."""
    from nichelm.data.tokenizer import load_tokenizer, transformers_prompt_code
    task, cfg = rm.task, rm.cfg
    arch = "GPT2LMHeadModel" if cfg.arch == "gpt2" else "LlamaForCausalLM"
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             f"tags: [nichelm, {task.get('name', 'task')}]", "---", "",
             f"# nichelm model: {task.get('name', 'task')}", "",
             f"A small {arch} ({rm.trainer.get('params', _n_params(rm.state, cfg)):,} parameters, "
             f"{cfg.n_layer} layers, width {cfg.n_embd}, context {cfg.block_size} tokens) trained from scratch "
             f"with nichelm for one job: `{task.get('name', 'task')}`.",
             f"Checkpoint: `{rm.checkpoint.name}` (step {rm.trainer.get('step', '?')}).", "",
             "## Prompt format", "",
             "The model reads the prompt below with `{input}` replaced by at most "
             f"~{task.get('window_chars', '?')} characters of text, writes its output, then the end "
             f"marker `{task['end_marker']}`. Decode greedily. Longer texts must be cut into windows "
             "(`nichelm apply` does this, and keeps the input where the output drifts too far).", "",
             "```", task["prompt_template"].rstrip("\n"), "```", "",
             "`task.json` holds the template and end marker for programs.", "",
             "## Usage", "",
             "The markers are special tokens, and a tokenizer matches special tokens inside any text it is "
             "given: `tok(template.format(input=text))` turns a marker string quoted in the text into the "
             "marker itself, and the model then reads a different prompt. So build the prompt from the "
             "markers' ids and the text encoded with `split_special_tokens=True` (task.json: "
             "`\"user_text_encoding\": \"split_special_tokens\"`); `text` is one window:", "",
             "```python", "import torch",
             "from transformers import AutoModelForCausalLM, AutoTokenizer",
             "tok = AutoTokenizer.from_pretrained(PATH)",
             "model = AutoModelForCausalLM.from_pretrained(PATH)",
             transformers_prompt_code(load_tokenizer(rm.tokenizer_path), task["prompt_template"]),
             "x = torch.tensor([ids])",
             "out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=2 * len(ids),",
             "                     do_sample=False)",
             "print(tok.decode(out[0, len(ids):], skip_special_tokens=True))", "```", "",
             "Or with nichelm: `nichelm apply --model PATH --input texts/ --output corrected/`.", ""]
    lines += _metrics_section(rm.run / "eval" / "report.json")
    lines += _data_section(rm.run / "data" / "manifest.json")
    lines += _selection_section(rm.run)
    return "\n".join(lines) + "\n"


def _n_params(state: dict, cfg: ModelConfig) -> int:
    n = sum(t.numel() for k, t in state.items() if not (cfg.arch == "gpt2" and k == "lm_head.weight"))
    return n


def _metrics_section(path: Path) -> list[str]:
    report = _read_json(path)
    if not report:
        return ["## Evaluation", "", "No evaluation report (run `nichelm evaluate` before exporting).", ""]
    rows = [("CER (corpus)", "cer_before", "cer_after"), ("WER (corpus)", "wer_before", "wer_after")]
    lines = ["## Evaluation", "", f"Held-out test split, {report.get('n_examples', '?')} examples.", "",
             "| metric | input | model output |", "|---|---|---|"]
    for name, before, after in rows:
        if before in report and after in report:
            lines.append(f"| {name} | {100 * report[before]:.2f}% | {100 * report[after]:.2f}% |")
    if "worse_fraction" in report:
        lines.append(f"| share of examples made worse | | {100 * report['worse_fraction']:.1f}% |")
    return lines + [""]


def _data_section(path: Path) -> list[str]:
    manifest = _read_json(path)
    if not manifest:
        return ["## Training data", "", "No data manifest found.", ""]
    lines = ["## Training data", "", "| source | format | role | licence | documents |", "|---|---|---|---|---|"]
    for s in manifest.get("sources", []):
        lines.append(f"| {s.get('name', '?')} | {s.get('format', '?')} | {s.get('role', '?')} | "
                     f"{s.get('licence', 'unspecified')} | {s.get('documents', '?')} |")
    ex = manifest.get("examples", {})
    if ex:
        lines += ["", f"Examples train/val/test: {ex.get('train', '?')}/{ex.get('val', '?')}/{ex.get('test', '?')}; "
                  f"training tokens: {manifest.get('tokens', {}).get('train', '?')}."]
    lines += ["", "The licences of the sources above apply to this model's training data; check them before "
              "redistributing the model.", ""]
    return lines


def _selection_section(run: Path) -> list[str]:
    """The generic sources `nichelm select` chose training text from, with their shares of the selection and
    the licences of the chosen documents, when the run's data holds a selection (the manifest's "selected"
    source). RUN/select/selection.json must be the report of the selected.jsonl prepare read (same sha256)."""
    manifest = _read_json(run / "data" / "manifest.json") or {}
    used = next((s for s in manifest.get("sources", []) if s.get("name") == "selected"), None)
    if used is None:
        return []
    sel = _read_json(run / "select" / "selection.json")
    head = ["## Selected generic data", "",
            f"{used.get('documents', '?')} training documents were chosen from generic sources by `nichelm select`; "
            f"each keeps its source, id, cluster, weight and licence in `{used.get('path')}` "
            f"(sha256 `{used.get('sha256', '?')}`, as prepare read it).", ""]
    if not sel or sel.get("output_sha256") != used.get("sha256"):
        return head + ["The selection report of that file (select/selection.json) is missing or describes another "
                       "selection, so the shares per generic source are not listed here; the licences are in the "
                       "file, one per document.", ""]
    size = ", ".join(f"{v:,} {k}" for k, v in (sel.get("settings", {}).get("size") or {}).items())
    kl = sel.get("kl") or {}
    lines = head + [f"Method `{sel.get('method')}`, size {size}; KL(target ‖ generic) over hashed n-grams "
                    f"{kl.get('target_vs_generic', 0):.4f}, KL(target ‖ selection) "
                    f"{kl.get('target_vs_selected') or 0:.4f}.", "",
                    "| generic source | documents read | selected | share of the selection "
                    "| licences (selected documents) |",
                    "|---|---|---|---|---|"]
    for name, s in (sel.get("per_source") or {}).items():
        licences = "; ".join(f"{lic} ({n:,})" for lic, n in (s.get("licences") or {}).items()).replace("|", "\\|")
        lines.append(f"| {name} | {s.get('seen_documents', 0):,} | {s.get('documents', 0):,} | "
                     f"{100 * s.get('share', 0):.1f}% | {licences} |")
    domains = [(d, s["share"]) for d, s in (sel.get("per_domain") or {}).items() if s.get("share")]
    if domains:
        lines += ["", "Domains of the selection: " + ", ".join(f"{d} {100 * x:.1f}%" for d, x in domains[:10]) + "."]
    return lines + ["", "Selected documents keep their own licences (above); check them before redistributing "
                    "the model.", ""]


def export_hf(rm: RunModel, out: Path) -> Path:
    from safetensors.torch import save_file
    end_id = rm.end_id()
    config = hf_config(rm.cfg, end_id)
    tmp = _staging(out)
    try:
        config.save_pretrained(tmp)
        _add_legacy_keys(tmp / "config.json", rm.cfg)
        save_file(to_hf(rm.state, rm.cfg), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        shutil.copyfile(rm.tokenizer_path, tmp / "tokenizer.json")
        atomic_write_json(tmp / "tokenizer_config.json", tokenizer_config(rm.task, rm.cfg.block_size))
        atomic_write_json(tmp / "special_tokens_map.json",
                          {"eos_token": rm.task["end_marker"], "pad_token": rm.task["end_marker"]})
        atomic_write_json(tmp / "generation_config.json", generation_config(end_id))
        atomic_write_json(tmp / "task.json", task_json(rm.task))
        atomic_write_json(tmp / NICHELM_JSON, {"export_version": EXPORT_VERSION, "model_config": rm.cfg.to_dict(),
                                               "run": str(rm.run), "checkpoint": rm.checkpoint.name,
                                               "step": rm.trainer.get("step")})
        atomic_write_text(tmp / "README.md", model_card(rm))
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export_ct2(rm: RunModel, out: Path, quantization: str | None = None) -> Path:
    """CTranslate2's own converter run on a fresh hf export."""
    tmp = _staging(out)
    try:
        hf_to_ct2(export_hf(rm, tmp / "hf"), tmp / "ct2", quantization)
        _replace_dir(tmp / "ct2", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def hf_to_ct2(hf: Path, out: Path, quantization: str | None = None) -> Path:
    """Convert an hf export folder (out must not exist), then fill the config fields CTranslate2
    refuses to find empty: our prompts carry no BOS, so the end marker stands in for it (as in
    GPT-2), and the norm eps is the one our model uses."""
    try:
        from ctranslate2.converters import TransformersConverter
    except ImportError:
        raise UserError("export --format ct2 needs ctranslate2: pip install 'nichelm[export]'") from None
    files = ["tokenizer.json", "tokenizer_config.json", "task.json", "README.md", NICHELM_JSON]
    TransformersConverter(str(hf), copy_files=files).convert(str(out), quantization=quantization)
    end = json.loads((hf / "task.json").read_text())["end_marker"]
    arch = json.loads((hf / NICHELM_JSON).read_text())["model_config"]["arch"]
    data = json.loads((out / "config.json").read_text())
    for key, value in (("bos_token", end), ("eos_token", end), ("unk_token", "")):
        if data.get(key) is None:
            data[key] = value
    if data.get("layer_norm_epsilon") is None:
        data["layer_norm_epsilon"] = 1e-5 if arch == "gpt2" else 1e-6
    atomic_write_json(out / "config.json", data)
    return out


# ---------------------------------------------------------------- gguf (llama.cpp)

def _permute_for_gguf(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's llama rotary turns adjacent pairs (x0,x1),(x2,x3)...; ours and HF's turn the two
    halves of each head. Reordering the q/k output rows per head as convert_hf_to_gguf.py does
    makes the two agree."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(rm: RunModel) -> dict[str, torch.Tensor]:
    """llama.cpp's tensor names; weights keep PyTorch's (out, in) layout, as its converter writes them."""
    cfg, hf = rm.cfg, to_hf(rm.state, rm.cfg)
    out = {}
    if cfg.arch == "gpt2":
        out["token_embd.weight"] = hf["transformer.wte.weight"]
        out["position_embd.weight"] = hf["transformer.wpe.weight"]
        out["output.weight"] = hf["transformer.wte.weight"]          # tied in GPT-2; llama.cpp wants both
        names = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
                 "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
        for i in range(cfg.n_layer):
            for theirs, ggml in names.items():
                w = hf[f"transformer.h.{i}.{theirs}.weight"]
                out[f"blk.{i}.{ggml}.weight"] = w if w.dim() == 1 else w.t().contiguous()   # undo Conv1D
                out[f"blk.{i}.{ggml}.bias"] = hf[f"transformer.h.{i}.{theirs}.bias"]
        out["output_norm.weight"] = hf["transformer.ln_f.weight"]
        out["output_norm.bias"] = hf["transformer.ln_f.bias"]
        return out
    out["token_embd.weight"] = hf["model.embed_tokens.weight"]
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for i in range(cfg.n_layer):
        for theirs, ggml in names.items():
            w = hf[f"model.layers.{i}.{theirs}.weight"]
            if ggml == "attn_q":
                w = _permute_for_gguf(w, cfg.n_head)
            elif ggml == "attn_k":
                w = _permute_for_gguf(w, cfg.kv_heads)
            out[f"blk.{i}.{ggml}.weight"] = w.contiguous()
    out["output_norm.weight"] = hf["model.norm.weight"]
    out["output.weight"] = hf["lm_head.weight"]
    return out


def _gguf_vocab(tokenizer_path: Path) -> tuple[list[str], list[int], list[str]]:
    """Tokens in id order, their llama.cpp types, and the BPE merges as 'a b' strings."""
    import gguf
    data = json.loads(tokenizer_path.read_text())
    vocab = data["model"]["vocab"]
    special = {t["id"]: t for t in data.get("added_tokens", [])}
    for t in special.values():
        vocab.setdefault(t["content"], t["id"])
    by_id = {i: tok for tok, i in vocab.items()}
    tokens = [by_id[i] for i in range(len(by_id))]
    types = [int(gguf.TokenType.CONTROL if i in special and special[i].get("special") else gguf.TokenType.NORMAL)
             for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
    return tokens, types, merges


def export_gguf(rm: RunModel, out: Path) -> Path:
    """RUN/export/gguf/model.gguf in f32, with the byte-level BPE vocabulary (pre-tokenizer 'gpt-2')."""
    try:
        import gguf
    except ImportError:
        raise UserError("export --format gguf needs the gguf package: pip install 'nichelm[export]'") from None
    check_exportable(rm.cfg)
    cfg, end_id = rm.cfg, rm.end_id()
    tmp = _staging(out)
    try:
        w = gguf.GGUFWriter(str(tmp / "model.gguf"), "gpt2" if cfg.arch == "gpt2" else "llama")
        w.add_name(f"nichelm-{rm.task.get('name', 'task')}")
        w.add_block_count(cfg.n_layer)
        w.add_context_length(cfg.block_size)
        w.add_embedding_length(cfg.n_embd)
        w.add_feed_forward_length(mlp_hidden(cfg))
        w.add_head_count(cfg.n_head)
        if cfg.arch == "gpt2":
            w.add_layer_norm_eps(1e-5)
        else:
            w.add_head_count_kv(cfg.kv_heads)
            w.add_layer_norm_rms_eps(1e-6)
            w.add_rope_freq_base(cfg.rope_theta)
            w.add_rope_dimension_count(cfg.n_embd // cfg.n_head)
            w.add_vocab_size(cfg.vocab_size)
        w.add_file_type(gguf.LlamaFileType.ALL_F32)
        tokens, types, merges = _gguf_vocab(rm.tokenizer_path)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(end_id)
        w.add_eos_token_id(end_id)
        w.add_pad_token_id(end_id)
        w.add_add_bos_token(False)
        for name, t in gguf_tensors(rm).items():
            w.add_tensor(name, t.float().numpy())
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        atomic_write_json(tmp / "task.json", task_json(rm.task))
        atomic_write_text(tmp / "README.md", model_card(rm))
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ---------------------------------------------------------------- entry points

def export(path: str | Path, fmt: str = "hf", out: str | Path | None = None, overrides: list[str] = ()) -> Path:
    """Export the newest complete checkpoint of a run (or project file) in one format; returns the folder."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    rm = load_run(run_dir(path, overrides))
    out = Path(out) if out else rm.run / "export" / fmt
    return {"hf": export_hf, "gguf": export_gguf, "ct2": export_ct2}[fmt](rm, out)


def is_export(path: Path) -> bool:
    return (Path(path) / NICHELM_JSON).is_file()


def is_ct2_export(path: Path) -> bool:
    """A folder written by CTranslate2's converter (`nichelm export --format ct2`; it also holds nichelm.json)."""
    return (Path(path) / "model.bin").is_file()


def model_shape(path: Path) -> tuple[ModelConfig, Path, dict]:
    """(model config, tokenizer.json, task) of a run, project file or export folder; no weights are read."""
    if path.is_dir() and (is_export(path) or is_ct2_export(path)):
        if not is_export(path):
            raise UserError(f"{path}: no {NICHELM_JSON} (exported by an older nichelm); re-run "
                            "`nichelm export --format ct2`, or give the run or its hf export")
        meta = json.loads((path / NICHELM_JSON).read_text())
        task = json.loads((path / "task.json").read_text())
        return ModelConfig(**meta["model_config"]), path / "tokenizer.json", task
    run = run_dir(path)
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise UserError(f"{run}: no complete checkpoint; run `nichelm train` first")
    cfg = ModelConfig(**json.loads((ckpt / "trainer.json").read_text())["model_config"])
    from nichelm.inference import run_task
    return cfg, run / "tokenizer" / "tokenizer.json", run_task(run, ckpt)


def load_corrector(path: str | Path, device: str = "cpu", backend: str = "torch", **kwargs):
    """A Corrector for a run directory, a project file, or an hf export folder (same engine for all).

    backend (nichelm.backends): "torch" decodes with nichelm's own engine; "ct2" and "vllm" run the
    same weights in CTranslate2 or vLLM, and the Corrector's model then only gives the shape (on the
    meta device: no weights read). "ct2" also takes a folder made by `nichelm export --format ct2`."""
    from nichelm.backends import BACKENDS, open_backend
    from nichelm.inference import Corrector
    path = Path(path)
    if backend not in BACKENDS:
        raise UserError(f"--backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if not path.exists():
        raise UserError(f"{path}: not found; give a run directory, a project file or an export folder")
    if path.is_dir() and not is_export(path) and not is_ct2_export(path) and not (path / "checkpoints").is_dir():
        raise UserError(f"{path}: neither a run directory (no checkpoints/) nor an hf export (no {NICHELM_JSON}); "
                        "give a run, a project file, or a folder made by `nichelm export --format hf`")
    if is_ct2_export(path) and backend != "ct2":
        raise UserError(f"{path}: a CTranslate2 export runs only with --backend ct2; give the run or its hf "
                        f"export for --backend {backend}")
    if backend != "torch":
        from nichelm.data.tokenizer import load_tokenizer
        cfg, tokenizer, task = model_shape(path)
        with torch.device("meta"):
            model = GPT(cfg)
        corrector = Corrector(model, load_tokenizer(tokenizer), task, device=device, **kwargs)
        corrector.backend = open_backend(backend, path, corrector, device)
        return corrector
    if not is_export(path):
        corrector = Corrector.from_run(run_dir(path), device=device, **kwargs)
    else:
        from safetensors.torch import load_file

        from nichelm.data.tokenizer import load_tokenizer
        meta = json.loads((path / NICHELM_JSON).read_text())
        cfg = ModelConfig(**meta["model_config"])
        model = GPT(cfg)
        model.load_state_dict(from_hf(load_file(str(path / "model.safetensors")), cfg), strict=True)
        task = json.loads((path / "task.json").read_text())
        corrector = Corrector(model.to(device), load_tokenizer(path / "tokenizer.json"), task, device=device,
                              **kwargs)
    return corrector

