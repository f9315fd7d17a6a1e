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

An hf export is also a nichelm model: nichelm.artifacts reads it back, mapping its safetensors
onto our GPT with convert.from_hf (the exact inverse of the export mapping), so `nichelm apply`
and ``nichelm.load`` run an export with the same engine and the same outputs as the run it came from. Keeping one
copy of the weights (not a second native copy) keeps the folder small and makes any
mapping error show up in nichelm's own tests rather than only in other tools.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from nichelm.artifacts import (NICHELM_JSON, RunModel, is_ct2_export, is_export, load_run,  # noqa: F401
                               model_shape, run_dir)
from nichelm.convert import (GPT2_LAYER_NAMES, check_exportable, ct2_config, from_hf, hf_config,  # noqa: F401
                             mlp_hidden, to_gguf, to_hf)
from nichelm.errors import UserError
from nichelm.io import atomic_write_json, atomic_write_text, fsync_tree, replace_dir, staging_dir
from nichelm.metrics import markdown_score_table
from nichelm.model import ModelConfig

# The weight mappings live in nichelm.convert and the reading of runs and exports in nichelm.artifacts;
# their names are imported above so `from nichelm.export import ...` keeps working.

FORMATS = ("hf", "gguf", "ct2")
EXPORT_VERSION = 1


def __getattr__(name: str):
    """`from nichelm.export import load_corrector`, the old home of nichelm.inference.load_corrector,
    resolved only when asked for: export itself never imports inference (nor backends)."""
    if name == "load_corrector":
        from nichelm.inference import load_corrector
        return load_corrector
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _add_legacy_keys(path: Path, cfg: ModelConfig) -> None:
    """Older transformers (and converters built on them) read rope_theta at the top level."""
    if cfg.arch == "llama":
        data = json.loads(path.read_text())
        data.setdefault("rope_theta", cfg.rope_theta)
        atomic_write_json(path, data)


# ---------------------------------------------------------------- writing folders

def _replace_dir(tmp: Path, out: Path) -> None:
    """Swap a finished folder into place, durably, so a reader never sees half an export."""
    fsync_tree(tmp)
    replace_dir(tmp, out)


def _staging(out: Path) -> Path:
    return staging_dir(out.parent, f".{out.name}.tmp-")


def tokenizer_config(task, block_size: int) -> dict:
    """For PreTrainedTokenizerFast: the end marker ends and pads; prompts are left-padded for batching."""
    end = task.end_marker
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


def task_json(task) -> dict:
    """An export's task.json: the run's task (Task.to_json: its type, prompt, markers, labels...), plus how
    user text must be encoded: with special tokens split (as plain text), the markers added by id, so a
    marker quoted in the text stays text. nichelm.artifacts reads it back with tasks.get_task."""
    return {**task.to_json(), "user_text_encoding": "split_special_tokens"}


def model_card(rm: RunModel) -> str:
    """README.md: what the model does, how to prompt it, how well it did, and what it was trained on."""
    from nichelm.data.tokenizer import load_tokenizer, transformers_prompt_code
    task, cfg = rm.task, rm.cfg
    arch = "GPT2LMHeadModel" if cfg.arch == "gpt2" else "LlamaForCausalLM"
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             f"tags: [nichelm, {task.name}]", "---", "",
             f"# nichelm model: {task.name}", "",
             f"A small {arch} ({rm.trainer.get('params', _n_params(rm.state, cfg)):,} parameters, "
             f"{cfg.n_layer} layers, width {cfg.n_embd}, context {cfg.block_size} tokens) trained from scratch "
             f"with nichelm for one job: `{task.name}`.",
             f"Checkpoint: `{rm.checkpoint.name}` (step {rm.trainer.get('step', '?')}).", ""]
    lines += task.card(transformers_prompt_code(load_tokenizer(rm.tokenizer_path), task.prompt_template))
    lines += _metrics_section(task, rm.run / "eval" / "report.json")
    lines += _external_section(rm.run / "eval" / "external")
    lines += _data_section(rm.run / "data" / "manifest.json")
    lines += _selection_section(rm.run)
    return "\n".join(lines) + "\n"


def _n_params(state: dict, cfg: ModelConfig) -> int:
    n = sum(t.numel() for k, t in state.items() if not (cfg.arch == "gpt2" and k == "lm_head.weight"))
    return n


def _metrics_section(task, path: Path) -> list[str]:
    report = _read_json(path)
    if not report:
        return ["## Evaluation", "", "No evaluation report (run `nichelm evaluate` before exporting).", ""]
    return ["## Evaluation", "", *task.card_metrics(report), ""]


def _external_section(folder: Path) -> list[str]:
    """The run's evaluations on other pair sets (`nichelm evaluate --data PATH --model RUN` writes them to
    RUN/eval/external/NAME/report.json): what the model does to text it was not trained on."""
    reports = [r for p in sorted(folder.glob("*/report.json")) if (r := _read_json(p)) and "cer_before" in r]
    if not reports:
        return []
    named = []
    for r in reports:
        data = r.get("data") or {}
        named.append((f"{data.get('name', '?')} ({data.get('format', '?')})", r))
    return ["## Other evaluations", "", "Whole documents cut as `apply` cuts them, guard as shipped.", "",
            *markdown_score_table("data", named), ""]


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
                          {"eos_token": rm.task.end_marker, "pad_token": rm.task.end_marker})
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
    refuses to find empty (convert.ct2_config)."""
    try:
        from ctranslate2.converters import TransformersConverter
    except ImportError:
        raise UserError("export --format ct2 needs ctranslate2: pip install 'nichelm[export]'") from None
    files = ["tokenizer.json", "tokenizer_config.json", "task.json", "README.md", NICHELM_JSON]
    TransformersConverter(str(hf), copy_files=files).convert(str(out), quantization=quantization)
    end = json.loads((hf / "task.json").read_text())["end_marker"]
    arch = json.loads((hf / NICHELM_JSON).read_text())["model_config"]["arch"]
    atomic_write_json(out / "config.json", ct2_config(json.loads((out / "config.json").read_text()), end, arch))
    return out


# ---------------------------------------------------------------- gguf (llama.cpp)

def gguf_tensors(rm: RunModel) -> dict:
    """llama.cpp's tensor names and layouts for a run's weights (convert.to_gguf)."""
    return to_gguf(rm.state, rm.cfg)


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
        w.add_name(f"nichelm-{rm.task.name}")
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
    if rm.cfg.projected is not None:        # no engine runs a projected MLP: export one of its experts
        raise UserError(f"{rm.run}: a projected network (model.projected) is not exported as it is: make a plain "
                        f"model of one expert first (nichelm specialize PROJECT --cluster I | --target), "
                        f"then export that run")
    out = Path(out) if out else rm.run / "export" / fmt
    return {"hf": export_hf, "gguf": export_gguf, "ct2": export_ct2}[fmt](rm, out)
