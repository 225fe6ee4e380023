"""softlabels trainer: train students from stored soft labels (never loads the teacher; no Ray)."""
