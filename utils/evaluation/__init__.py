"""Evaluation: metrics with confidence intervals, test-split reports, figures.

    metrics        classification metrics, bootstrap CIs, the results table and CSV
    paired         paired bootstrap of two models' AUC difference, mean and spread over seeds
    calibration    reliability curves and expected calibration error
    evaluate       predictions of a loader, the results / predictions CSVs, the report
    visualization  every figure (volumes, saliency, guidance, curves, confusion, ROC, ...)
    gradcam        Grad-CAM maps of the baselines
    ood            out-of-distribution flag from the DCG's feature statistics
    showcase       which scans a saliency figure shows (a stated rule), notebook 03's figure
    roi_anatomy    where the DCG's ROI boxes lie: lesion, lung, other tissue, air
"""
