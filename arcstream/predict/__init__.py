"""Predictions: greedy answers under augmentations, voting, ARC Prize scoring and submission files.

Layout: `vote.py` (candidates and the two selections), `score.py` (the ARC
Prize score), `generator.py` (the `Generator` interface the job talks to, and
`ModelGenerator` over an arcstream model), `job.py` (the resumable job),
`__main__.py` (the `python -m arcstream.predict` entry point).
"""

from arcstream.predict.generator import Generation, Generator, ModelGenerator
from arcstream.predict.job import (FAILURE_REASONS, FALLBACKS, SELECTIONS, PredictResult, default_predict_section,
                                   failure_code, predict_config_from_run, predict_tasks, run_predictions)
from arcstream.predict.score import Score, score_predictions
from arcstream.predict.vote import Answer, Candidate, attempts, grid_key, rank_by_product, vote

__all__ = [
    "FAILURE_REASONS", "FALLBACKS", "SELECTIONS", "Answer", "Candidate", "Generation", "Generator", "ModelGenerator",
    "PredictResult", "Score", "attempts", "default_predict_section", "failure_code", "grid_key",
    "predict_config_from_run", "predict_tasks", "rank_by_product", "run_predictions", "score_predictions", "vote",
]
