"""nichelm: specialized pre-training of small language models for one job."""

__version__ = "0.1.0"


def load(path, device: str = "cpu", **kwargs):
    """A Corrector for a run directory, project file or hf export: ``nichelm.load(p).correct(texts)``.

    ``backend="ct2"`` or ``"vllm"`` decodes with CTranslate2 or vLLM instead of nichelm's engine
    (nichelm.backends); ct2 also loads a folder made by `nichelm export --format ct2`.

    Imported lazily so `import nichelm` stays cheap (no torch).
    """
    from nichelm.inference import load_corrector
    return load_corrector(path, device=device, **kwargs)
