"""The weight-update tier: weights pushed into a running engine reach the model, the cache and the head.

* :mod:`conformance.weights.state`: named weight sets and the trainer stand-in (W0 -> W1).
* :mod:`conformance.weights.paths`: the ways weights reach vLLM, probes, and the recommended sequence.
* :mod:`conformance.weights.verdict`: the update verdict and its diagnosis.
* :mod:`conformance.weights.hidden_states`: per-module hidden states of the engine vs the reference.
"""
