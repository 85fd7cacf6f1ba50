"""Analysis of stored runs: per-feature statistics streamed from the store, candidate labels from the cell
attributes, model-free reconstruction metrics, a static HTML dashboard drawn on ARC grids, and report.md.

Wires `store` (committed rows) to `sae` (exports); knows nothing of the model yet (CE-loss recovered, which
needs the model in the loop, is a later step).
"""

from arcstream.analysis.stats import (ACT_LOG10_EDGES, ATTRIBUTES, EvalAccumulator, FeatureAccumulator, FeatureStats,
                                      Label, attribute_codes, label_features)
from arcstream.analysis.job import AnalyzeOptions, AnalyzeResult, SiteAnalysis, analyze, analyze_site, features_json
from arcstream.analysis.dashboard import ARC_COLOURS, page_id, render_dashboard, write_dashboard
from arcstream.analysis.report import write_report

__all__ = [
    "ACT_LOG10_EDGES", "ARC_COLOURS", "ATTRIBUTES", "AnalyzeOptions", "AnalyzeResult", "EvalAccumulator",
    "FeatureAccumulator", "FeatureStats", "Label", "SiteAnalysis", "analyze", "analyze_site", "attribute_codes",
    "features_json", "label_features", "page_id", "render_dashboard", "write_dashboard", "write_report",
]
