"""Latency measurement and what it is reported with.

    latency.py       configurations, the alternating-block measurement, the report (console,
                     Markdown, chart), percentiles
    environment.py   what a timing was measured on: CPU and ISA flags, cores, OS, versions, GPU, load
    stage_chart.py   a stacked-bar chart of stage times, drawn with OpenCV
    inputs.py        inputs that need no download: scikit-image photographs, smooth random class
                     scores, and pydensecrf2's marginals as the CRF's oracle

The command is tools/benchmark.py (deeplab-benchmark); benchmarks/*.py use these too. Importing this
package imports nothing else: each module loads what it needs.
"""
