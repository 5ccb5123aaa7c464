"""Evaluation harness: exact match of greedy answers, multiple-choice log-likelihoods (the
lm-evaluation-harness way) and perplexity / bits per byte; `python -m llmjax.eval` runs them
on a workdir or a Hugging Face checkpoint, and the train loop calls the same functions."""

from llmjax.eval.harness import generate_task, multiple_choice, perplexity, score_rows
from llmjax.eval.scoring import encode_pair, exact_match

# --task name -> the function that runs it; every task returns (metrics, per_record).
TASKS = {'generate': generate_task, 'multiple_choice': multiple_choice, 'perplexity': perplexity}
