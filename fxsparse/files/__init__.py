"""Files fxsparse writes and reads: save / load of a sparsified model (persist.py) in one container format
(safetensors plus a JSON header, safefile.py), resume files of long runs (resume.py), and the MeanSparse
authors' published checkpoints (authors_checkpoint.py)."""
