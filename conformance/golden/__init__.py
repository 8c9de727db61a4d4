"""Golden tensors: what one engine build returned for fixed, seeded cases, and their replay on another.

* :mod:`conformance.golden.store`: the files (safetensors + a hashed manifest), written atomically.
* :mod:`conformance.golden.replay`: record a case on an engine, and replay a golden teacher-forced to
  judge a new build against it and against the fp32 reference.
"""
