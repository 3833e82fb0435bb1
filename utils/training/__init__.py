"""Training: run configuration, the resumable loop, and each stage's recipe.

    profiles     TrainConfig and the named profiles (smoke, demo, full)
    loop         the generic resumable fit loop (early stopping, EMA, AMP, checkpoints)
    checkpoint   atomic, weights_only-loadable checkpoints
    stage        what every stage shares: its FitConfig, batch inputs, the eval loader, val metrics
    dcg          phase 1: the DCG, and its cached guidance per volume
    diffusion    phase 2: prior generator + denoiser on the frozen DCG's guidance
    baselines    the MONAI 3D ResNet-18 / DenseNet-121 baselines
    precise_bn   BatchNorm statistics recomputed over the training split
    nonfinite    naming the module that produced a NaN / inf loss
    epoch_log    what a stage prints: a progress line every few epochs, one summary at its end
    sanity       the denoiser overfits one batch (a cheap check that phase 2 can learn)
"""
