"""Analysis of stored runs: per-feature statistics streamed from the store, candidate labels from the cell
attributes, model-free reconstruction metrics, a static HTML dashboard drawn on ARC grids, and report.md.

Wires `store` (committed rows) to `sae` (exports) and, for CE loss recovered (`arcstream.analysis.ce`,
imported on demand), to `model`; invariance across augmentations maps cells back through `data.augment`.
"""

from arcstream.analysis.stats import (ACT_LOG10_EDGES, ATTRIBUTES, EvalAccumulator, FeatureAccumulator, FeatureStats,
                                      Label, attribute_codes, label_features)
from arcstream.analysis.job import AnalyzeOptions, AnalyzeResult, SiteAnalysis, analyze, analyze_site, features_json
from arcstream.analysis.dashboard import ARC_COLOURS, page_id, render_dashboard, write_dashboard
from arcstream.analysis.report import write_report
from arcstream.analysis.invariance import CLASSES as INVARIANCE_CLASSES
from arcstream.analysis.invariance import InvarianceAccumulator, cell_keys

__all__ = [
    "ACT_LOG10_EDGES", "ARC_COLOURS", "ATTRIBUTES", "INVARIANCE_CLASSES", "InvarianceAccumulator", "cell_keys",
    "AnalyzeOptions", "AnalyzeResult", "EvalAccumulator",
    "FeatureAccumulator", "FeatureStats", "Label", "SiteAnalysis", "analyze", "analyze_site", "attribute_codes",
    "features_json", "label_features", "page_id", "render_dashboard", "write_dashboard", "write_report",
]
