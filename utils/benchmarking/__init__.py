"""Benchmarks: the suite behind ``python -m utils.benchmark`` and the quality benchmark behind
``python -m utils.benchmark_quality`` (those two modules are the command lines).

    report           the report object (CSV rows, markdown blocks, targets), shared names and targets
    sections         each section stored with its commit and code fingerprint; staleness
    timing           timed calls, peak memory, probes (one training stage in a fresh process), training_step
    quality_reports  section 1: the quality reports read back, the quality targets
    speed            section 2: epoch times of both phases, inference parts and growth, samplers, main job
    checkpoints      section 3: checkpoint sizes per stage, earlier vs lean layout, what a run wrote
    memory           sections 4 and 5: GPU memory on a T4 (estimated), peak RSS per stage, `full` projection
    memory_estimate  peak GPU memory of a training step without a GPU (FakeTensorMode + MemTracker)
    scaling          section 6: step time and memory against input size and volume count
    design           section 7: DCG design variants on hard phantoms (phase 1 only)
    suite            run_benchmark (the chosen sections, each stored) and assemble (benchmark.md / .csv)
    quality          the quality benchmark: runs per seed, paired comparisons, quality_<data>.md / .csv
    ablations        the quality benchmark's seed-0 ablations (one design element reverted at a time)
"""
