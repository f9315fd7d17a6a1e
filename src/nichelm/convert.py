"""Pure weight and config mappings between nichelm's GPT and other tools' layouts, in both directions.

  to_hf / from_hf   our parameters <-> transformers' GPT2LMHeadModel / LlamaForCausalLM names and layouts
  hf_config         our ModelConfig -> a transformers config (built here, never fetched)
  to_gguf           our parameters -> llama.cpp's tensor names (through the hf mapping)
  ct2_config        the fields CTranslate2's converter leaves empty in its config.json

Nothing here reads or writes files: export.py writes the folders, artifacts.py reads them back.
from_hf is the exact inverse of to_hf, so an hf export is also a nichelm model (same outputs).
"""

from __future__ import annotations

import torch

from nichelm.errors import UserError
from nichelm.model import ModelConfig


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


# ---------------------------------------------------------------- gguf (llama.cpp)

def _permute_for_gguf(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's llama rotary turns adjacent pairs (x0,x1),(x2,x3)...; ours and HF's turn the two
    halves of each head. Reordering the q/k output rows per head as convert_hf_to_gguf.py does
    makes the two agree."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_gguf(state: dict, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """llama.cpp's tensor names; weights keep PyTorch's (out, in) layout, as its converter writes them."""
    hf = to_hf(state, cfg)
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


def ct2_config(data: dict, end_marker: str, arch: str) -> dict:
    """CTranslate2's config.json with the fields its converter leaves empty filled: our prompts carry no
    BOS, so the end marker stands in for it (as in GPT-2), and the norm eps is the one our model uses."""
    data = dict(data)
    for key, value in (("bos_token", end_marker), ("eos_token", end_marker), ("unk_token", "")):
        if data.get(key) is None:
            data[key] = value
    if data.get("layer_norm_epsilon") is None:
        data["layer_norm_epsilon"] = 1e-5 if arch == "gpt2" else 1e-6
    return data
