"""forkcore's benchmark suite: forkcore and its peers measured side by side in one run.

Run `python -m benchmarks --help`. Every measured party is a pair of processes (server and
client) started by the runner; see docs/performance.md for what is measured and how.
"""
