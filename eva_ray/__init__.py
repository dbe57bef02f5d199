"""eva-ray's core: the eva algorithm without Ray.

Config, informativeness, sampling, the prioritized generative buffer, the online phase schedule, evolve operators,
the solver's losses, prompt records and seed-data loading. Everything here is plain Python, NumPy and PyTorch so that
it runs and is tested in milliseconds on a laptop; the Ray actors in ``actors/`` and the driver in ``launch/`` build
on it. This package must never import ``ray`` (a test checks that).
"""

__version__ = "0.1.0"
