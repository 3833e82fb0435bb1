"""Benchmarks: the suite behind ``python -m utils.benchmark`` and the quality benchmark behind
``python -m utils.benchmark_quality`` (those two modules are the command lines).

    report           the report object (CSV rows, markdown blocks, targets), shared names and targets
    timing           timed calls, peak memory, and probes (one training stage in a fresh process)
    quality_reports  suite section 1: the quality reports read back, the quality targets
    speed            suite section 2: epoch times of both phases, inference per sampler
    memory           suite sections 3 and 5: peak memory per stage, projected wall time of `full`
    scaling          suite section 4: step time and memory against input size and volume count
    design           suite section 6: DCG design variants on hard phantoms (phase 1 only)
    suite            run_benchmark: every section in order, benchmark.md / benchmark.csv
    quality          the quality benchmark: runs per seed, paired comparisons, quality_<data>.md / .csv
    ablations        the quality benchmark's seed-0 ablations (one design element reverted at a time)
"""
