"""Refusal direction (Arditi et al. 2024): find, ablate, add and bake out the direction that mediates refusal.

    lm = load_chat_lm("path/to/Qwen2-1.5B-Instruct")           # or a moeformer checkpoint + template
    result = extract(lm, harmful_train, harmless_train, harmful_val, harmless_val)
    with ablate(lm, result.selection.direction):               # the model can no longer represent it
        ...
    orthogonalize(lm, result.selection.direction, prompts)     # the same, baked into the weights
"""

from moeformer.refusal.directions import Candidates, candidate_directions, mean_activations
from moeformer.refusal.evaluation import EvalReport, evaluate, save_evaluation
from moeformer.refusal.extract import Extraction, ExtractOptions, extract, load_direction, save_extraction
from moeformer.refusal.instructions import InstructionError, load_instructions, sample_instructions
from moeformer.refusal.interventions import Intervention, ablate, add, project_out
from moeformer.refusal.lm import ChatLM, PromptFormat, RefusalError
from moeformer.refusal.loading import load_chat_lm
from moeformer.refusal.openers import RefusalOpeners
from moeformer.refusal.orthogonalize import orthogonalize, save_model
from moeformer.refusal.routing import routing_report
from moeformer.refusal.scoring import REFUSAL_SUBSTRINGS, is_refusal, score_completions
from moeformer.refusal.selection import refusal_metric, select_direction

__all__ = [
    "REFUSAL_SUBSTRINGS", "Candidates", "ChatLM", "EvalReport", "ExtractOptions", "Extraction", "InstructionError",
    "Intervention", "PromptFormat", "RefusalError", "RefusalOpeners", "ablate", "add", "candidate_directions",
    "evaluate", "extract", "is_refusal", "load_chat_lm", "load_direction", "load_instructions", "mean_activations",
    "orthogonalize", "project_out", "refusal_metric", "routing_report", "sample_instructions", "save_evaluation",
    "save_extraction", "save_model", "score_completions", "select_direction",
]
