"""Offline eva: the paper's iterative preference optimisation, with the prompt set evolved between iterations.

Ray-free pieces the offline driver (``launch/offline.py``) assembles:

- :mod:`eva_ray.offline.next_set`: which prompts an iteration trains on (the evolve step's draw and mix, or the
  static baseline's fresh slice of D);
- :mod:`eva_ray.offline.pairs`: preference pairs from k scored responses (and SPPO's win probabilities);
- :mod:`eva_ray.offline.recipe`: the training recipe, ``offline.*`` or the loss's published values;
- :mod:`eva_ray.offline.store`: each iteration's prompts, responses and pairs as Parquet files, written shard by
  shard so that a resumed run keeps what was finished.
"""
