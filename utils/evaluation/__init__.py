"""Evaluation: metrics with confidence intervals, test-split reports, figures.

    metrics        classification metrics, bootstrap CIs, paired comparisons, calibration
    evaluate       predictions of a loader, the results / predictions CSVs, the report
    visualization  every figure (volumes, saliency, guidance, curves, confusion, ROC, ...)
    gradcam        Grad-CAM maps of the baselines
    ood            out-of-distribution flag from the DCG's feature statistics
"""
