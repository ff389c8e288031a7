"""The benchmark evaluation of the global model (eval.benchmarks): loaders of the
published benchmarks by name, scorers, a sandbox for generated code, and the runner."""

from fedsec.evalsuite.runner import LanguageModel, PeftModelLM, Task, run_task
from fedsec.evalsuite.tasks import LOADERS, ChoiceItem, CodeItem, GenerationItem

__all__ = ["LOADERS", "ChoiceItem", "CodeItem", "GenerationItem", "LanguageModel", "PeftModelLM", "Task",
           "run_task"]
