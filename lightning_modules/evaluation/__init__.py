"""Evaluation: image metrics on torch-fidelity, ground-truth sample metrics, and text-to-image metrics."""
from .clip_score import CLIPScorer
from .prompt_adherence import prompt_adherence, prompt_labels
