"""KV-cache causal probes. Each probe module has `measure(lm, pair, token_ids, ...)` (model work for one aligned
instance, resumable) and `analyse(...)` (readout, inclusion, statistics: no model)."""
