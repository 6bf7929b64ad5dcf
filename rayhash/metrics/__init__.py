"""Binary codes and retrieval metrics (mAHP@k, mAP@k, precision within a Hamming radius)."""
from __future__ import annotations

from rayhash.metrics.codes import distance_matrix, hamming_distances, pack_codes, unpack_codes
from rayhash.metrics.retrieval import (average_hierarchical_precision_ranked, average_precision_ranked,
                                       hierarchical_precision_ranked, hierarchical_precision_values,
                                       mean_average_hierarchical_precision, mean_average_precision,
                                       precision_at_radius, precision_at_radius_ranked, rank_dense,
                                       trapezoid_ahp)
from rayhash.metrics.protocol import code_statistics, flat_classifier_mahp, random_codes_mahp, reference_metrics

__all__ = ["pack_codes", "unpack_codes", "hamming_distances", "distance_matrix",
           "mean_average_hierarchical_precision", "average_hierarchical_precision_ranked",
           "hierarchical_precision_ranked", "hierarchical_precision_values",
           "mean_average_precision", "average_precision_ranked", "precision_at_radius",
           "precision_at_radius_ranked", "rank_dense", "trapezoid_ahp",
           "reference_metrics", "code_statistics", "flat_classifier_mahp", "random_codes_mahp"]
