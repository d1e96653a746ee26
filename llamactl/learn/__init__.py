"""Memory that learns: every ready instance is a measurement, and the next plan uses it.

- `observe.py` (effects): after an instance is ready, what llama-server logged per buffer, what NVML
  reports for its process on each GPU, its RSS; an out-of-memory failure at load with its shortfall.
- `store.py` (effects): the observations in SQLite (`calibration.db` in the state dir, WAL, bounded).
- `calibrate.py` (pure): observations → `Learned`, which corrects a MemoryEstimate from the most specific
  knowledge to the most general: the same file and settings and placement → what was seen; the same GPU
  model, driver and build → the measured per-process overhead; the same architecture and backend → a
  correction of the compute term. Growing a reservation takes one observation; shrinking one takes three
  that agree, and never goes below what any of them saw.
"""
