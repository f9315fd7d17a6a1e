"""nichelm: specialized pre-training of small language models for one job."""

__version__ = "0.1.0"


def load(path, device: str = "cpu", **kwargs):
    """The runner of a run directory's, project file's or hf export's task: a Corrector
    (``nichelm.load(p).correct(texts)``) for correction, a Classifier (``.classify(texts)``, one label
    per text) for classification; ``.run(texts)`` on either.

    ``backend="ct2"`` or ``"vllm"`` decodes with CTranslate2 or vLLM instead of nichelm's engine
    (nichelm.backends); ct2 also loads a folder made by `nichelm export --format ct2`.

    Imported lazily so `import nichelm` stays cheap (no torch).
    """
    from nichelm.inference import load_runner
    return load_runner(path, device=device, **kwargs)
