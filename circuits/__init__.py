"""Component-level circuit probes (paper_spec §4): which query heads write the note and which read it, attention vs
MLP write attribution, conclusion directions, causal scrubbing. Same contract as probes/ (probes/base.py), run the
same way: python run.py probe=heads ..."""
